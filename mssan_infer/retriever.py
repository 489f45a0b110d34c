"""Two-stage image-text retrieval over a bundle: encode, add to galleries, search, save/load.

Stage 1 ranks a gallery by the inner product of stage-1 vectors (exactly
``lam_gg*S_gg + lam_gl*S_gl``); stage 2 runs the scorer graph once over the top
``rerank`` candidates and adds ``s_ll`` (``lam_ll*S_ll``). The final score is the
PyTorch model's ``score`` (DESIGN §2). Text queries search the image gallery,
image queries the caption gallery.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import numpy as np

from mssan_infer import checks
from mssan_infer.backends import backend_options, create_backend
from mssan_infer.backends.base import Backend
from mssan_infer.bundle import BUNDLE_FILES, Bundle, check_index_bundle, load_bundle, tokenizer_from_bundle
from mssan_infer.errors import InputError
from mssan_infer.gallery.base import Gallery, GalleryView, ItemId, check_labels, raise_colliding
from mssan_infer.gallery.filters import parse_where
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.stage1 import scan_threads
from mssan_infer.images.encoder import PixelEncoder, encode_regions, has_pixel_graph, pixel_sources
from mssan_infer.images.preprocess import ImageSource
from mssan_infer.names import IMAGES, TEXTS
from mssan_infer.options import BackendOptions, GalleryOptions, SearchOptions, fast_path
from mssan_infer.qdrant.gallery import QdrantGallery
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer, parse_gallery
from mssan_infer.qdrant.places import open_qdrant_galleries
from mssan_infer.search import (
    Encoded,
    ScoreFn,
    ScorerLimits,
    backend_score_fn,
    holds_query_scorers,
    search,
)
from mssan_infer.text.base import TextTokenizer
from mssan_infer.text.encoder import encode_token_ids

__all__ = ["Retriever", "Hit", "ImageInput"]

log = logging.getLogger(__name__)

ImageInput = Union[np.ndarray, Sequence[np.ndarray]]
# With a bundle exported with --pixels: image files, PIL images or uint8 HWC arrays (one or a list).
PixelInput = Union[ImageSource, Sequence[ImageSource]]


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery item's id, its final score and its stage-1 score, and what the
    gallery keeps of the item to show it.

    Attributes:
        id: the id the item was added with (str or int, as given).
        score: final score (stage 1 + ``s_ll``; stage 1 alone when not reranked).
        stage1: stage-1 score.
        text: the caption's text (items added with :meth:`Retriever.add_texts` from str captions; ``None``
            for images and for captions added as an :class:`Encoded`).
        source: the file an image was indexed from (:meth:`Retriever.add_images` with paths, or its
            ``sources=``); ``None`` otherwise.
        metadata: the item's metadata as given to ``add_images``/``add_texts`` (a copy; ``None`` when it has
            none or an empty one).
    """

    id: ItemId
    score: float
    stage1: float
    text: str | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = field(default=None, hash=False)


class Retriever:
    """Image-text retrieval with a bundle's graphs and two in-memory (or memory-mapped) galleries.

    Make one with :meth:`load`. Searching is thread-safe; adding and removing
    items takes a lock per gallery and never disturbs a search in progress.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        tokenizer: TextTokenizer,
        images: Gallery,
        texts: Gallery,
        search: SearchOptions | None = None,
    ) -> None:
        opts = search if search is not None else SearchOptions()
        if not isinstance(opts, SearchOptions):
            raise InputError(f"search must be a SearchOptions, got {type(opts).__name__}")
        self.bundle = bundle
        self.backend = backend
        self.search_options = opts
        self.tokenizer = tokenizer
        self.embed_size = bundle.manifest.embed_size
        self.img_dim = bundle.manifest.img_dim
        self.batch_size = opts.batch_size
        self.scorer_batch = opts.scorer_batch
        self.gather_threads = opts.gather_threads if opts.gather_threads is not None else 1
        self.rerank_threads = opts.rerank_threads if opts.rerank_threads is not None else scan_threads()
        self._gather_pool: ThreadPoolExecutor | None = None
        self._gather_pid = os.getpid()
        self._gather_pool_lock = threading.Lock()
        self._scorers: dict[bool, tuple[ScoreFn, ScorerLimits]] = {}
        # whether the backend runs the query scorers of float32 (False) and int8 (True) candidates
        self._query_scorers = {i8: holds_query_scorers(backend, int8=i8) for i8 in (False, True)}
        for name, g in ((IMAGES, images), (TEXTS, texts)):
            if g.stage1_dim != 2 * self.embed_size or g.local_dim != self.embed_size:
                raise InputError(
                    f"{name} gallery has dims (2D={g.stage1_dim}, D={g.local_dim}) but the bundle has "
                    f"D={self.embed_size}"
                )
        self._galleries: dict[str, Gallery] = {IMAGES: images, TEXTS: texts}
        self._pixels = PixelEncoder(bundle, backend, self.embed_size)  # its session is made on first use

    # ---- construction -------------------------------------------------------
    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike[str] | Bundle,
        backend: str | BackendOptions = "onnxruntime",
        *,
        index: str | os.PathLike[str] | None = None,
        gallery: GalleryOptions | QdrantEdge | QdrantServer | str | None = None,
        search: SearchOptions | None = None,
        verify: bool = True,
        fast: bool = False,
    ) -> "Retriever":
        """Open a bundle (and optionally a saved index or Qdrant galleries) for retrieval.

        Args:
            bundle: bundle folder (or an already loaded :class:`Bundle`).
            backend: a backend name (``"onnxruntime"``; ``"tensorrt"``, ``"triton"`` where installed) or its
                options (:class:`~mssan_infer.options.OnnxRuntimeOptions`, ``TensorRTOptions``,
                ``TritonOptions``: device, precision, threads...).
            index: a folder written by :meth:`save`; must come from the same bundle.
            gallery: how in-memory galleries store items (:class:`~mssan_infer.options.GalleryOptions`:
                layout, memory mapping, stage-1 method; default: fp32, or the saved index's layout), or
                where Qdrant galleries live: :class:`~mssan_infer.qdrant.options.QdrantEdge`,
                :class:`~mssan_infer.qdrant.options.QdrantServer`, or the same as a string
                (``"qdrant-edge:PATH"``, ``"qdrant:URL"``; ``"memory"``: in this process).
            search: batching and threads (:class:`~mssan_infer.options.SearchOptions`).
            verify: check the sha256 of every bundle and index file.
            fast: the fast query path: the int8 text encoder (``precision="int8"``) and the ``int8`` layout
                (a layout or precision given otherwise is an error). Default: the exact path.

        Raises:
            BundleError: missing/tampered bundle or one exported with another tokenizer.
            IndexFileError: index missing, tampered, newer, or built with another bundle.
            BackendUnavailableError: the backend's package is not installed.
            InputError: unknown backend name or bad option.
        """
        # every option is checked before anything is loaded, opened or created
        if fast:
            backend, gallery = fast_path(backend, gallery)
        backend_options(backend)  # checked before anything is loaded
        opts = search if search is not None else SearchOptions()
        if not isinstance(opts, SearchOptions):
            raise InputError(f"search must be a SearchOptions, got {type(opts).__name__}")
        memory = gallery if isinstance(gallery, GalleryOptions) else GalleryOptions()
        spec = None if isinstance(gallery, GalleryOptions) else parse_gallery(gallery)
        if spec is not None and index is not None:
            raise InputError("give index= (a saved in-memory index) or a Qdrant gallery=, not both")
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        tokenizer = tokenizer_from_bundle(b)
        d = b.manifest.embed_size
        if index is not None:
            check_index_bundle(index, b)
        be = create_backend(
            backend, b
        )  # before the galleries: a backend error leaves no gallery made or open
        images: Gallery
        texts: Gallery
        qd: dict[str, QdrantGallery] = {}
        try:
            if spec is not None:
                qd = open_qdrant_galleries(spec, (IMAGES, TEXTS), 2 * d, d, b.bundle_id)
                images, texts = qd[IMAGES], qd[TEXTS]
            elif index is not None:
                galleries, _ = load_index(index, bundle_id=b.bundle_id, verify=verify, options=memory)
                # a saved empty gallery is falsy: keep it (and its layout), make only the missing one
                images = galleries[IMAGES] if IMAGES in galleries else MemoryGallery(2 * d, d, memory)
                texts = galleries[TEXTS] if TEXTS in galleries else MemoryGallery(2 * d, d, memory)
            else:
                images, texts = MemoryGallery(2 * d, d, memory), MemoryGallery(2 * d, d, memory)
            r = cls(b, be, tokenizer, images, texts, opts)
        except BaseException:
            be.close()
            for g in qd.values():
                g.close()
            raise
        log.info(
            "retriever ready: bundle %s (%s), %d images, %d texts",
            b.root,
            b.bundle_id,
            len(images),
            len(texts),
        )
        return r

    # ---- properties -----------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def images(self) -> Gallery:
        """The image gallery (searched by text queries)."""
        return self._galleries[IMAGES]

    @property
    def texts(self) -> Gallery:
        """The caption gallery (searched by image queries)."""
        return self._galleries[TEXTS]

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    def __len__(self) -> int:
        """Items in both galleries together."""
        return self.n_images + self.n_texts

    def __repr__(self) -> str:
        return (
            f"Retriever(bundle={str(self.bundle.root)!r}, backend={self.backend.name!r}, "
            f"images={self.n_images}, texts={self.n_texts})"
        )

    def close(self) -> None:
        self.backend.close()
        with self._gather_pool_lock:
            if self._gather_pool is not None:
                self._gather_pool.shutdown(wait=True)
                self._gather_pool = None
        self._pixels.close()
        for g in self._galleries.values():
            if isinstance(g, QdrantGallery):
                g.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- encoding ---------------------------------------------------------------
    def encode_images(
        self, feats: ImageInput | PixelInput, mask: np.ndarray | None = None, *, progress: bool = False
    ) -> Encoded:
        """Encode images from region features, or from pixels when the bundle has the pixel graph.

        Args:
            feats: ``[N, R, Dv]`` array, or a list of ``[R_i, Dv]`` arrays (padded here); or, with a
                bundle exported with ``--pixels``, image paths, image file bytes (JPEG, PNG, WebP...), PIL
                images or uint8 ``[H,W(,C)]`` arrays (one, a list, or ``[N,H,W,C]`` uint8), preprocessed as
                the manifest says.
            mask: ``[N, R]`` 1 for real regions (only with an array; default all ones).
            progress: show a tqdm bar.
        Returns:
            :class:`Encoded` with ``local [N, R, D]``, ``gram [N, R, R]``.
        Raises:
            InputError: wrong ndim/feature size, NaN/inf, an image without regions; an image file
                that is missing, truncated or not an image (named); pixels without the pixel graph.
            BundleError: the bundle's pixel graph or preprocessing entry is damaged.
        """
        sources = pixel_sources(feats)
        if sources is not None:
            if mask is not None:
                raise InputError("mask is only for region features; images from pixels use every grid cell")
            return self._pixels.encode(sources, self.batch_size, progress=progress)
        regions, m = checks.region_batch(feats, mask, self.img_dim)
        return encode_regions(self.backend, regions, m, self.embed_size, self.batch_size, progress=progress)

    @property
    def has_pixel_graph(self) -> bool:
        """Whether the bundle can encode images from pixels (exported with ``--pixels``)."""
        return has_pixel_graph(self.bundle)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption.

        Raises:
            InputError: a caption that is not a str, is empty, or has only unknown words.
        """
        return checks.token_ids(self.tokenizer, texts)

    def encode_texts(self, texts: str | Sequence[str], *, progress: bool = False) -> Encoded:
        """Encode captions (batched internally, grouped by length).

        Args:
            texts: one caption or a sequence of captions.
        Returns:
            :class:`Encoded` with ``local [N, L, D]``, ``gram [N, L, L]`` (``L`` the longest caption).
        Raises:
            InputError: empty caption, only unknown words, or not a str.
        """
        ids = self.tokenize(checks.caption_list(texts))
        return encode_token_ids(self.backend, ids, self.embed_size, self.batch_size, progress=progress)

    # ---- galleries ----------------------------------------------------------------
    def add_images(
        self,
        feats: ImageInput | PixelInput | Encoded,
        ids: Sequence[ItemId] | None = None,
        *,
        mask: np.ndarray | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        sources: Sequence[str | None] | None = None,
        progress: bool = False,
    ) -> list[ItemId]:
        """Encode images and append them to the image gallery.

        Args:
            feats: ``[N, R, Dv]`` array, a list of ``[R_i, Dv]``, or an :class:`Encoded` from
                :meth:`encode_images` (added without re-encoding); with a ``--pixels`` bundle also
                image paths, PIL images, uint8 arrays or encoded file bytes (see :meth:`encode_images`).
            ids: ``N`` unique str/int ids (default: consecutive ints).
            mask: ``[N, R]`` region mask for an array input.
            metadata: one JSON object (or None) per image, for ``search(..., where=...)`` filters; returned
                with hits (:attr:`Hit.metadata`).
            sources: one str (or None) per image, kept as the image's source and returned with its hits
                (:attr:`Hit.source`). Default: each image given as a path (str or PathLike) keeps that path,
                as given; other inputs keep none.
        Returns:
            The ids added.
        Raises:
            InputError: bad shapes/values, duplicate ids or ids already present, bad metadata or sources.
        """
        self._check_ids_free(self.images, ids)
        given = None if isinstance(feats, Encoded) else pixel_sources(feats)
        if sources is None and given is not None:
            paths = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else None for s in given]
            sources = paths if any(p is not None for p in paths) else None
        elif sources is not None and (
            given is not None or isinstance(feats, (Encoded, list, tuple, np.ndarray))
        ):
            # refused before encoding (the gallery checks again)
            n = len(given) if given is not None else len(feats)  # type: ignore[arg-type]
            sources = check_labels(sources, n, "sources")
        enc = feats if isinstance(feats, Encoded) else self.encode_images(feats, mask, progress=progress)
        return self.images.add(
            enc.stage1, enc.local, enc.mask, enc.gram, ids, metadata=metadata, sources=sources
        )

    def add_texts(
        self,
        texts: str | Sequence[str] | Encoded,
        ids: Sequence[ItemId] | None = None,
        *,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        progress: bool = False,
    ) -> list[ItemId]:
        """Encode captions and append them to the caption gallery, each with its text.

        Args:
            texts: captions (each kept as given and returned with its hits, :attr:`Hit.text`), or an
                :class:`Encoded` from :meth:`encode_texts` (added without re-encoding, and without texts).
            ids: unique str/int ids (default: consecutive ints).
            metadata: one JSON object (or None) per caption, for ``search(..., where=...)`` filters; returned
                with hits (:attr:`Hit.metadata`).
        Returns:
            The ids added.
        Raises:
            InputError: empty/all-unknown captions, duplicate ids or ids already present, bad metadata.
        """
        self._check_ids_free(self.texts, ids)
        if isinstance(texts, Encoded):
            enc, captions = texts, None
        else:
            captions = checks.caption_list(texts)
            enc = self.encode_texts(captions, progress=progress)
        return self.texts.add(
            enc.stage1, enc.local, enc.mask, enc.gram, ids, metadata=metadata, texts=captions
        )

    @staticmethod
    def _check_ids_free(gallery: Gallery, ids: Sequence[ItemId] | None) -> None:
        """Fail before encoding when ids collide (the gallery checks again under its lock)."""
        if ids is None:
            return
        ids = checks.id_list(ids)
        if len(set(ids)) != len(ids):
            raise InputError("duplicate ids in this batch")
        raise_colliding(ids, gallery)

    def remove(self, ids: Iterable[ItemId], *, gallery: Literal["images", "texts"] | None = None) -> None:
        """Remove items by id (all or nothing).

        Args:
            ids: ids to remove.
            gallery: ``"images"`` or ``"texts"``; by default each id is looked up in
                both galleries and must be in exactly one.
        Raises:
            InputError: unknown ids, or an id present in both galleries without ``gallery``.
        """
        ids = checks.id_list(ids)
        if gallery is not None:
            if gallery not in self._galleries:
                raise InputError(f"gallery must be 'images' or 'texts', got {gallery!r}")
            self._galleries[gallery].remove(ids)
            return
        both = [i for i in ids if i in self.images and i in self.texts]
        if both:
            raise InputError(
                f"ids {both[:5]} are in both galleries; pass gallery='images' or gallery='texts'"
            )
        unknown = [i for i in ids if i not in self.images and i not in self.texts]
        if unknown:
            raise InputError(f"unknown ids {unknown[:5]}; nothing was removed")
        self.images.remove([i for i in ids if i in self.images])
        self.texts.remove([i for i in ids if i in self.texts])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save both galleries to the folder ``path`` atomically (with sha256 and the bundle id).

        Raises:
            IndexFileError: ``path`` exists and is not an index folder.
            InputError: a gallery that is not kept in this process (it persists on its own).
        """
        own = {name: g for name, g in self._galleries.items() if isinstance(g, MemoryGallery)}
        if len(own) != len(self._galleries):
            raise InputError(
                "these galleries live in Qdrant and persist on their own: call flush() instead of save()"
            )
        return save_index(path, own, bundle_id=self.bundle_id, extra={BUNDLE_FILES: self.bundle.id_files})

    def flush(self) -> None:
        """Make every acknowledged add/remove durable in galleries that persist on their own (Qdrant).

        In-memory galleries have nothing to flush: they are kept with :meth:`save`.
        """
        for g in self._galleries.values():
            if isinstance(g, QdrantGallery):
                g.flush()

    # ---- search -------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image: np.ndarray | ImageSource | None = None,
        *,
        k: int = 10,
        rerank: int = 100,
        where: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """Search the image gallery with a caption, or the caption gallery with an image.

        Args:
            text: a caption (text -> image).
            image: ``[R, Dv]`` region features of one image (image -> text); ``[1, R, Dv]`` also accepted;
                with a ``--pixels`` bundle also an image path, image file bytes, a PIL image or a uint8
                ``[H,W(,C)]`` array.
            k: results to return.
            rerank: stage-1 candidates rescored by the scorer. ``0``: stage 1 only (final
                score = stage-1 score); ``0 < rerank < k`` is raised to ``k``.
            where: only items whose metadata passes this filter, e.g. ``{"album": "x"}``,
                ``{"album": ["x", "y"]}``, ``{"year": {"gte": 2000}}`` (see
                :mod:`mssan_infer.gallery.filters`).
        Returns:
            Up to ``k`` :class:`Hit` sorted by decreasing final score.
        Raises:
            InputError: both or neither query given, bad shapes, k <= 0, rerank < 0,
                empty/unknown caption, a malformed filter, or an empty gallery.
        """
        if (text is None) == (image is None):
            raise InputError("give exactly one of text= (searches images) or image= (searches captions)")
        if text is not None:
            if not isinstance(text, str):
                raise InputError(
                    f"text must be a str, got {type(text).__name__}; use search_batch for several"
                )
            return self.search_batch(texts=[text], k=k, rerank=rerank, where=where)[0]
        sources = pixel_sources(image)
        if sources is not None:
            if len(sources) != 1:
                raise InputError(
                    f"image= takes one image, got {len(sources)}; use search_batch(images=[...])"
                )
            return self.search_batch(images=sources, k=k, rerank=rerank, where=where)[0]  # type: ignore[arg-type]
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise InputError(
                f"image must be [R, {self.img_dim}] region features of one image, got shape {arr.shape}"
            )
        return self.search_batch(images=[arr], k=k, rerank=rerank, where=where)[0]

    def search_batch(
        self,
        texts: Sequence[str] | None = None,
        images: ImageInput | None = None,
        *,
        k: int = 10,
        rerank: int = 100,
        image_mask: np.ndarray | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[list[Hit]]:
        """Search for several queries at once (one encoder pass, one stage-1 product).

        Args:
            texts: captions (text -> image).
            images: ``[Q, R, Dv]`` or a list of ``[R_i, Dv]`` (image -> text).
            k, rerank, where: as in :meth:`search`.
            image_mask: ``[Q, R]`` for an array of images.
        Returns:
            One list of hits per query.
        Raises:
            InputError: as in :meth:`search`.
        """
        k, rerank = checks.check_k(k, rerank)
        parse_where(where)  # refuse a malformed filter before encoding
        if (texts is None) == (images is None):
            raise InputError("give exactly one of texts= (searches images) or images= (searches captions)")
        if texts is not None:
            if isinstance(texts, str):
                raise InputError("texts must be a sequence of captions; use search(text=...) for one")
            gallery, name = self.images, IMAGES
            view = gallery.view()
            if view.n == 0:
                raise InputError("the image gallery is empty: add_images(...) before searching with text")
            q = self.encode_texts(texts)
        else:
            assert images is not None
            gallery, name = self.texts, TEXTS
            view = gallery.view()
            if view.n == 0:
                raise InputError(
                    "the caption gallery is empty: add_texts(...) before searching with an image"
                )
            q = self.encode_images(images, image_mask)
        return self._search_encoded(q, view, query_is_text=(name == IMAGES), k=k, rerank=rerank, where=where)

    def search_encoded(
        self,
        query: Encoded,
        *,
        query_is_text: bool,
        k: int = 10,
        rerank: int = 100,
        where: Mapping[str, Any] | None = None,
    ) -> list[list[Hit]]:
        """Search with queries already encoded (``query_is_text``: search the image gallery)."""
        k, rerank = checks.check_k(k, rerank)
        view = (self.images if query_is_text else self.texts).view()
        if view.n == 0:
            raise InputError(f"the {'image' if query_is_text else 'caption'} gallery is empty")
        return self._search_encoded(query, view, query_is_text=query_is_text, k=k, rerank=rerank, where=where)

    def _search_encoded(
        self,
        q: Encoded,
        view: GalleryView,
        *,
        query_is_text: bool,
        k: int,
        rerank: int,
        where: Mapping[str, Any] | None = None,
    ) -> list[list[Hit]]:
        score, limits = self._scoring(query_is_text)
        ranked = search(
            q,
            view,
            score,
            query_is_text=query_is_text,
            k=k,
            rerank=rerank,
            batch=self.scorer_batch,
            limits=limits,
            executor=self._gatherer(),
            parts=self.gather_threads,
            where=where,
            similarity=self._query_scorers[False],
            shares=self._shares(view),
        )
        # texts, sources and metadata of the returned hits only (never of every reranked candidate)
        return [
            [
                Hit(rec.id, f, s, rec.text, rec.source, rec.metadata)
                for rec, f, s in zip(view.records_at(r.rows), r.score.tolist(), r.stage1.tolist())
            ]
            for r in ranked
        ]

    def _scoring(self, query_is_text: bool) -> tuple[ScoreFn, ScorerLimits]:
        """The backend's scorer of a query direction and its limits (a TensorRT engine's profile maxima;
        none for ONNX Runtime), made on first use: neither changes while the backend is open."""
        got = self._scorers.get(query_is_text)
        if got is None:
            got = (
                backend_score_fn(self.backend, query_is_text=query_is_text),
                ScorerLimits.from_axes(self.backend.limits("scorer"), query_is_text=query_is_text),
            )
            self._scorers[query_is_text] = got
        return got

    def _shares(self, view: GalleryView) -> int:
        """Shares a rerank of ``view``'s candidates is cut into (``SearchOptions.rerank_threads``) when the
        backend's query scorers score them as the view stores them (int8 codes, or float32 locals as their
        similarities to the query); 1 otherwise (Qdrant's locals in hand, older bundles, TensorRT)."""
        layout = getattr(view, "layout", None)
        if layout is None:
            return 1
        return self.rerank_threads if self._query_scorers[layout.local == "int8"] else 1

    def _gatherer(self) -> ThreadPoolExecutor | None:
        """The helper threads of candidate gathers and rerank shares (made on first use; none when both
        run on one thread)."""
        helpers = max(self.gather_threads, self.rerank_threads) - 1
        if helpers == 0:
            return None
        with self._gather_pool_lock:
            # a forked child inherits the pool object but not its threads: make a new one there
            if self._gather_pool is None or self._gather_pid != os.getpid():
                self._gather_pool = ThreadPoolExecutor(helpers, thread_name_prefix="mssan-rerank")
                self._gather_pid = os.getpid()
            return self._gather_pool
