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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, Union, cast

import numpy as np

from .backends import Backend, create_backend
from .bundle import Bundle, load_bundle
from .errors import BundleError, InputError
from .index import GalleryIndex, GalleryView, ItemId, _check_id, extent, load_index, save_index
from .preprocess import ImageSource, Preprocessing, describe, is_image_source, preprocess
from .subword import KIND as SUBWORD_KIND, SubwordTokenizer
from .tokenizer import APOSTROPHE_PATTERN, UNK_ID, WORD_PATTERN, Tokenizer

__all__ = ["Retriever", "Hit", "Encoded", "ImageInput"]

log = logging.getLogger(__name__)

ImageInput = Union[np.ndarray, Sequence[np.ndarray]]
# With a bundle exported with --pixels: image files, PIL images or uint8 HWC arrays (one or a list).
PixelInput = Union[ImageSource, Sequence[ImageSource]]
IMAGES, TEXTS = "images", "texts"
PIXEL_GRAPH = "image_encoder_pixels"


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery item's id, its final score and its stage-1 score."""

    id: ItemId
    score: float
    stage1: float


@dataclass(frozen=True)
class Encoded:
    """Encoded items of one modality (numpy, float32), padded to the longest item.

    Attributes:
        stage1: ``[N, 2D]`` stage-1 vectors.
        local: ``[N, P, D]`` unfused locals, zero at padding.
        mask: ``[N, P]`` 1 for real regions/words.
        gram: ``[N, P, P]`` ``local @ local^T``.
    """

    stage1: np.ndarray
    local: np.ndarray
    mask: np.ndarray
    gram: np.ndarray

    def __len__(self) -> int:
        return int(self.stage1.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """``[N]`` number of real regions/words per item."""
        return (self.mask > 0).sum(1)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="item")


class Retriever:
    """Image-text retrieval with a bundle's graphs and two in-memory (or memory-mapped) galleries.

    Make one with :meth:`load`. Searching is thread-safe; adding and removing
    items takes a lock per gallery and never disturbs a search in progress.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        tokenizer: Tokenizer | SubwordTokenizer,
        images: GalleryIndex,
        texts: GalleryIndex,
        *,
        batch_size: int = 32,
        scorer_batch: int = 256,
        gather_threads: int | None = None,
    ) -> None:
        cfg = bundle.model_config
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = tokenizer
        self.embed_size = int(cfg["embed_size"])
        self.img_dim = int(cfg["img_dim"])
        self.batch_size = _positive("batch_size", batch_size)
        self.scorer_batch = _positive("scorer_batch", scorer_batch)
        # Copying the reranked candidates out of the gallery is bound by one thread's memory
        # reads; more threads fetch more rows at once (2 threads: 1.6 -> 0.9 ms for 100 images).
        self.gather_threads = _positive("gather_threads", gather_threads if gather_threads is not None
                                        else min(4, os.cpu_count() or 1))
        self._gather_pool: ThreadPoolExecutor | None = None
        self._gather_pid = os.getpid()
        self._gather_pool_lock = threading.Lock()
        for name, g in ((IMAGES, images), (TEXTS, texts)):
            if g.stage1_dim != 2 * self.embed_size or g.local_dim != self.embed_size:
                raise InputError(
                    f"{name} gallery has dims (2D={g.stage1_dim}, D={g.local_dim}) but the bundle has D={self.embed_size}"
                )
        self._galleries = {IMAGES: images, TEXTS: texts}
        self._pixel_lock = threading.Lock()
        self._pixel_runner: tuple[Backend, Preprocessing] | None = None     # made on first image input

    # ---- construction -------------------------------------------------------
    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike[str] | Bundle,
        backend: str = "onnxruntime",
        device: str = "cpu",
        index: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        *,
        stage1: str = "numpy",
        faiss_options: Mapping[str, int] | None = None,
        local_dtype: str | None = None,
        mmap: bool = False,
        spill_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        scorer_batch: int = 256,
        gather_threads: int | None = None,
        verify: bool = True,
        **backend_options: Any,
    ) -> "Retriever":
        """Open a bundle (and optionally a saved index) for retrieval.

        Args:
            bundle: bundle folder (or an already loaded :class:`Bundle`).
            backend: ``"onnxruntime"`` (``"tensorrt"``, ``"triton"`` where installed).
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            index: a folder written by :meth:`save`; must come from the same bundle.
            threads: intra-op threads of the backend (``None``: its default).
            precision: ``"fp32"``, ``"fp16"`` graphs (fp16 needs an ``--fp16`` export) or ``"int8"``
                (the dynamically quantized text encoder of an ``--int8`` export, CPU).
            stage1: ``"numpy"`` (exact, default), ``"faiss"`` (exact), ``"faiss-ivf"``, ``"faiss-hnsw"``.
            faiss_options: ``nlist``/``nprobe`` (IVF) or ``M``/``ef_search`` (HNSW).
            local_dtype: storage of locals/Grams, ``"float32"`` or ``"float16"``
                (default: float32, or what the saved index holds).
            mmap: keep gallery arrays in memory-mapped files (for galleries larger than RAM).
            spill_dir: where new memory-mapped files go (default: a temp folder).
            batch_size: encoder batch size.
            scorer_batch: most candidates per scorer call.
            gather_threads: threads that copy rerank candidates out of the gallery (default:
                ``threads``, else the CPU count up to 4).
            verify: check the sha256 of every bundle and index file.
            backend_options: passed to the backend (e.g. ``graph_optimization``, ``inter_op_threads``).

        Raises:
            BundleError: missing/tampered bundle or one exported with another tokenizer.
            IndexFileError: index missing, tampered, newer, or built with another bundle.
            BackendUnavailableError: the backend's package is not installed.
            InputError: unknown backend name or bad option.
        """
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        tokenizer = tokenizer_from_bundle(b)
        d = int(b.model_config["embed_size"])
        opts: dict[str, Any] = {"stage1": stage1, "faiss_options": faiss_options, "spill_dir": spill_dir}
        if index is not None:
            galleries, _ = load_index(index, bundle_id=b.bundle_id, verify=verify, mmap=mmap, dtype=local_dtype, **opts)
            images = galleries.get(IMAGES) or GalleryIndex(2 * d, d, dtype=local_dtype or "float32", mmap=mmap, **opts)
            texts = galleries.get(TEXTS) or GalleryIndex(2 * d, d, dtype=local_dtype or "float32", mmap=mmap, **opts)
        else:
            images = GalleryIndex(2 * d, d, dtype=local_dtype or "float32", mmap=mmap, **opts)
            texts = GalleryIndex(2 * d, d, dtype=local_dtype or "float32", mmap=mmap, **opts)
        be = create_backend(backend, b, device=device, precision=precision, threads=threads, **backend_options)
        r = cls(b, be, tokenizer, images, texts, batch_size=batch_size, scorer_batch=scorer_batch,
                gather_threads=gather_threads if gather_threads is not None else threads)
        log.info("retriever ready: bundle %s (%s), %d images, %d texts", b.root, b.bundle_id, len(images), len(texts))
        return r

    # ---- properties -----------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def images(self) -> GalleryIndex:
        """The image gallery (searched by text queries)."""
        return self._galleries[IMAGES]

    @property
    def texts(self) -> GalleryIndex:
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
        if self._pixel_runner is not None and self._pixel_runner[0] is not self.backend:
            self._pixel_runner[0].close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- encoding ---------------------------------------------------------------
    def _image_batch(self, feats: ImageInput, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Validate image input -> ``(regions [N,R,Dv] float32, mask [N,R] float32)``."""
        dv = self.img_dim
        if isinstance(feats, np.ndarray) or (not isinstance(feats, (list, tuple)) and hasattr(feats, "shape")):
            arr = np.asarray(feats)
            if arr.ndim != 3 or arr.shape[2] != dv:
                raise InputError(
                    f"image features must be [N, R, {dv}] (or a list of [R_i, {dv}] arrays); got shape {arr.shape}"
                )
            if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
                raise InputError(f"image features must be real numbers, got dtype {arr.dtype}")
            with np.errstate(over="ignore"):          # values beyond float32 become inf: refused below
                regions = np.asarray(arr, dtype=np.float32)
            if mask is None:
                m = np.ones(regions.shape[:2], np.float32)
            else:
                m = np.asarray(mask, dtype=np.float32)
                if m.shape != regions.shape[:2]:
                    raise InputError(f"mask must be [N, R] = {regions.shape[:2]}, got {m.shape}")
        else:
            if mask is not None:
                raise InputError("mask is only accepted with an [N, R, Dv] array; a list of [R_i, Dv] makes its own")
            try:
                items = [np.asarray(x) for x in feats]
            except TypeError:
                raise InputError(
                    f"image features must be an [N, R, {dv}] array or a list of [R_i, {dv}] arrays, "
                    f"got {type(feats).__name__}"
                ) from None
            for i, x in enumerate(items):
                if x.ndim != 2 or x.shape[1] != dv:
                    raise InputError(f"image {i}: region features must be [R_i, {dv}], got shape {x.shape}")
                if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
                    raise InputError(f"image {i}: features must be real numbers, got dtype {x.dtype}")
            r = max([1] + [x.shape[0] for x in items])
            regions = np.zeros((len(items), r, dv), np.float32)
            m = np.zeros((len(items), r), np.float32)
            for i, x in enumerate(items):
                regions[i, : x.shape[0]] = x
                m[i, : x.shape[0]] = 1.0
        if regions.shape[0] == 0:
            raise InputError(f"no images given (an empty batch); pass at least one image of [R, {dv}] region features")
        if not np.isin(m, (0.0, 1.0)).all():
            raise InputError("mask must hold only 1 (real region) and 0 (padding); got other values or NaN")
        real = m > 0
        empty = np.flatnonzero(~real.any(1))
        if empty.size:
            raise InputError(f"images {empty[:5].tolist()} have no regions (mask all zero); every image needs >= 1")
        if not np.isfinite(regions[real]).all():
            raise InputError("image features contain NaN or inf")
        return regions, m

    def encode_images(
        self, feats: ImageInput | PixelInput, mask: np.ndarray | None = None, *, progress: bool = False
    ) -> Encoded:
        """Encode images from region features, or from pixels when the bundle has the pixel graph.

        Args:
            feats: ``[N, R, Dv]`` array, or a list of ``[R_i, Dv]`` arrays (padded here); or, with a
                bundle exported with ``--pixels``, image paths, PIL images or uint8 ``[H,W(,C)]`` arrays
                (one, a list, or ``[N,H,W,C]`` uint8), preprocessed as the manifest says.
            mask: ``[N, R]`` 1 for real regions (only with an array; default all ones).
            progress: show a tqdm bar.
        Returns:
            :class:`Encoded` with ``local [N, R, D]``, ``gram [N, R, R]``.
        Raises:
            InputError: wrong ndim/feature size, NaN/inf, an image without regions; an image file
                that is missing, truncated or not an image (named); pixels without the pixel graph.
            BundleError: the bundle's pixel graph or preprocessing entry is damaged.
        """
        sources = _pixel_sources(feats)
        if sources is not None:
            if mask is not None:
                raise InputError("mask is only for region features; images from pixels use every grid cell")
            return self._encode_pixels(sources, progress=progress)
        regions, m = self._image_batch(cast(ImageInput, feats), mask)
        return self._encode_regions(regions, m, progress=progress)

    def _encode_regions(self, regions: np.ndarray, m: np.ndarray, *, progress: bool = False) -> Encoded:
        n, r = m.shape
        d = self.embed_size
        out = Encoded(
            np.zeros((n, 2 * d), np.float32), np.zeros((n, r, d), np.float32),
            m.astype(np.float32, copy=True), np.zeros((n, r, r), np.float32),
        )
        bar = _progress(n, "encode images", progress)
        for a, b in _batches(n, self.batch_size):
            w = max(1, extent(m[a:b]))                      # trim the batch's padding
            res = self.backend.run("image_encoder", {"regions": regions[a:b, :w], "region_mask": m[a:b, :w]})
            out.stage1[a:b] = res["img_stage1"]
            out.local[a:b, :w] = res["img_local"]
            out.gram[a:b, :w, :w] = res["img_gram"]
            if bar is not None:
                bar.update(b - a)
        if bar is not None:
            bar.close()
        return out

    @property
    def has_pixel_graph(self) -> bool:
        """Whether the bundle can encode images from pixels (exported with ``--pixels``)."""
        return PIXEL_GRAPH in (self.bundle.manifest.get("optional_graphs") or {})

    def _pixels(self) -> tuple[Backend, Preprocessing]:
        """The pixel graph's runner and preprocessing, made on first use (the backend's own when it has
        the graph, else an ONNX Runtime session on the backend's device)."""
        with self._pixel_lock:
            if self._pixel_runner is None:
                m = self.bundle.manifest
                entry = (m.get("optional_graphs") or {}).get(PIXEL_GRAPH)
                if not isinstance(entry, dict):
                    raise InputError(
                        f"bundle {self.bundle.root} has no pixel graph, so images must be region features "
                        f"[N, R, {self.img_dim}]; to index image files re-export it with `python -m export "
                        "--checkpoint CKPT --out DIR --pixels --features DATA --backbone-weights PATH`"
                    )
                prep = (m.get("preprocessing") or {}).get("image")
                if not isinstance(prep, dict):
                    raise BundleError(
                        f"bundle {self.bundle.root} has a pixel graph but no preprocessing.image entry; re-export it"
                    )
                cfg = Preprocessing.from_dict(prep)
                if PIXEL_GRAPH in getattr(self.backend, "graphs", ()):
                    runner: Backend = self.backend
                else:
                    from .backends.onnxruntime import OnnxRuntimeBackend

                    name = str(entry.get("file", ""))
                    if name not in m.get("files", {}):
                        raise BundleError(
                            f"bundle {self.bundle.root}: pixel graph {name!r} has no sha256 in the manifest; re-export it"
                        )
                    device = getattr(self.backend, "device", "cpu")
                    runner = OnnxRuntimeBackend({PIXEL_GRAPH: self.bundle.path(name)},
                                                device=device if isinstance(device, str) else "cpu")
                self._pixel_runner = (runner, cfg)
            return self._pixel_runner

    def _encode_pixels(self, sources: Sequence[ImageSource], *, progress: bool = False) -> Encoded:
        runner, cfg = self._pixels()
        n = len(sources)
        if n == 0:
            raise InputError("no images given")
        pixels = np.stack([preprocess(s, cfg, describe(s, i)) for i, s in enumerate(sources)])   # [N,3,S,S]
        out: Encoded | None = None
        bar = _progress(n, "encode images", progress)
        for a, b in _batches(n, self.batch_size):
            res = runner.run(PIXEL_GRAPH, {"pixels": pixels[a:b]})
            if out is None:
                r, d = res["img_local"].shape[1], self.embed_size
                out = Encoded(np.zeros((n, 2 * d), np.float32), np.zeros((n, r, d), np.float32),
                              np.ones((n, r), np.float32), np.zeros((n, r, r), np.float32))
            out.stage1[a:b] = res["img_stage1"]
            out.local[a:b] = res["img_local"]
            out.gram[a:b] = res["img_gram"]
            if bar is not None:
                bar.update(b - a)
        if bar is not None:
            bar.close()
        assert out is not None
        return out

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption.

        Raises:
            InputError: a caption that is not a str, is empty, or has only unknown words.
        """
        ids: list[list[int]] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                hint = "; decode bytes as UTF-8 first" if isinstance(t, (bytes, bytearray)) else ""
                raise InputError(f"caption {i} must be str, got {type(t).__name__}{hint}")
            x = self.tokenizer.encode(t)
            if not x:
                raise InputError(f"caption {i} {t[:60]!r} has no words; captions need at least one word")
            unk = self.tokenizer.unk_id if isinstance(self.tokenizer, SubwordTokenizer) else UNK_ID
            if all(tok == unk for tok in x):
                raise InputError(
                    f"caption {i} {t[:60]!r}: none of its words is in the model's vocabulary "
                    f"({len(self.tokenizer)} tokens); rephrase it"
                )
            ids.append(x)
        return ids

    def encode_texts(self, texts: str | Sequence[str], *, progress: bool = False) -> Encoded:
        """Encode captions (batched internally, grouped by length).

        Args:
            texts: one caption or a sequence of captions.
        Returns:
            :class:`Encoded` with ``local [N, L, D]``, ``gram [N, L, L]`` (``L`` the longest caption).
        Raises:
            InputError: empty caption, only unknown words, or not a str.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (bytes, bytearray)):
            raise InputError("captions must be str, got bytes; decode them as UTF-8 first")
        try:
            texts = list(texts)
        except TypeError:
            raise InputError(f"captions must be a str or a sequence of str, got {type(texts).__name__}") from None
        if not texts:
            raise InputError("no captions given (an empty batch); pass at least one caption")
        return self._encode_ids(self.tokenize(texts), progress=progress)

    def _encode_ids(self, ids: list[list[int]], *, progress: bool = False) -> Encoded:
        n = len(ids)
        d = self.embed_size
        lmax = max([1] + [len(x) for x in ids])
        out = Encoded(
            np.zeros((n, 2 * d), np.float32), np.zeros((n, lmax, d), np.float32),
            np.zeros((n, lmax), np.float32), np.zeros((n, lmax, lmax), np.float32),
        )
        order = np.argsort([len(x) for x in ids], kind="stable")
        bar = _progress(n, "encode texts", progress)
        for a, b in _batches(n, self.batch_size):
            rows = order[a:b]
            w = max(len(ids[i]) for i in rows)
            tokens = np.zeros((len(rows), w), np.int64)
            mask = np.zeros((len(rows), w), np.float32)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = 1.0
            res = self.backend.run("text_encoder", {"tokens": tokens, "token_mask": mask})
            out.stage1[rows] = res["txt_stage1"]
            out.local[rows, :w] = res["txt_local"]
            out.mask[rows, :w] = mask
            out.gram[rows, :w, :w] = res["txt_gram"]
            if bar is not None:
                bar.update(b - a)
        if bar is not None:
            bar.close()
        return out

    # ---- galleries ----------------------------------------------------------------
    def add_images(
        self,
        feats: ImageInput | PixelInput | Encoded,
        ids: Sequence[ItemId] | None = None,
        *,
        mask: np.ndarray | None = None,
        progress: bool = False,
    ) -> list[ItemId]:
        """Encode images and append them to the image gallery.

        Args:
            feats: ``[N, R, Dv]`` array, a list of ``[R_i, Dv]``, or an :class:`Encoded` from
                :meth:`encode_images` (added without re-encoding); with a ``--pixels`` bundle also
                image paths, PIL images or uint8 arrays (see :meth:`encode_images`).
            ids: ``N`` unique str/int ids (default: consecutive ints).
            mask: ``[N, R]`` region mask for an array input.
        Returns:
            The ids added.
        Raises:
            InputError: bad shapes/values, duplicate ids or ids already present.
        """
        self._check_ids_free(self.images, ids)
        enc = feats if isinstance(feats, Encoded) else self.encode_images(feats, mask, progress=progress)
        return self.images.add(enc.stage1, enc.local, enc.mask, enc.gram, ids)

    def add_texts(
        self, texts: str | Sequence[str] | Encoded, ids: Sequence[ItemId] | None = None, *, progress: bool = False
    ) -> list[ItemId]:
        """Encode captions and append them to the caption gallery.

        Args:
            texts: captions, or an :class:`Encoded` from :meth:`encode_texts`.
            ids: unique str/int ids (default: consecutive ints).
        Returns:
            The ids added.
        Raises:
            InputError: empty/all-unknown captions, duplicate ids or ids already present.
        """
        self._check_ids_free(self.texts, ids)
        enc = texts if isinstance(texts, Encoded) else self.encode_texts(texts, progress=progress)
        return self.texts.add(enc.stage1, enc.local, enc.mask, enc.gram, ids)

    @staticmethod
    def _check_ids_free(gallery: GalleryIndex, ids: Sequence[ItemId] | None) -> None:
        """Fail before encoding when ids collide (the gallery checks again under its lock)."""
        if ids is None:
            return
        ids = _id_list(ids)
        if len(set(map(_hashable, ids))) != len(ids):
            raise InputError("duplicate ids in this batch")
        clash = [i for i in ids if i in gallery]
        if clash:
            raise InputError(f"ids already in the gallery: {clash[:5]}; remove them first or use other ids")

    def remove(self, ids: Iterable[ItemId], *, gallery: Literal["images", "texts"] | None = None) -> None:
        """Remove items by id (all or nothing).

        Args:
            ids: ids to remove.
            gallery: ``"images"`` or ``"texts"``; by default each id is looked up in
                both galleries and must be in exactly one.
        Raises:
            InputError: unknown ids, or an id present in both galleries without ``gallery``.
        """
        ids = _id_list(ids)
        if gallery is not None:
            if gallery not in self._galleries:
                raise InputError(f"gallery must be 'images' or 'texts', got {gallery!r}")
            self._galleries[gallery].remove(ids)
            return
        both = [i for i in ids if i in self.images and i in self.texts]
        if both:
            raise InputError(f"ids {both[:5]} are in both galleries; pass gallery='images' or gallery='texts'")
        unknown = [i for i in ids if i not in self.images and i not in self.texts]
        if unknown:
            raise InputError(f"unknown ids {unknown[:5]}; nothing was removed")
        self.images.remove([i for i in ids if i in self.images])
        self.texts.remove([i for i in ids if i in self.texts])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save both galleries to the folder ``path`` atomically (with sha256 and the bundle id).

        Raises:
            IndexFileError: ``path`` exists and is not an index folder.
        """
        return save_index(path, self._galleries, bundle_id=self.bundle_id)

    # ---- search -------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image: np.ndarray | ImageSource | None = None,
        *,
        k: int = 10,
        rerank: int = 100,
    ) -> list[Hit]:
        """Search the image gallery with a caption, or the caption gallery with an image.

        Args:
            text: a caption (text -> image).
            image: ``[R, Dv]`` region features of one image (image -> text); ``[1, R, Dv]`` also accepted;
                with a ``--pixels`` bundle also an image path, a PIL image or a uint8 ``[H,W(,C)]`` array.
            k: results to return.
            rerank: stage-1 candidates rescored by the scorer. ``0``: stage 1 only (final
                score = stage-1 score); ``0 < rerank < k`` is raised to ``k``.
        Returns:
            Up to ``k`` :class:`Hit` sorted by decreasing final score.
        Raises:
            InputError: both or neither query given, bad shapes, k <= 0, rerank < 0,
                empty/unknown caption, or an empty gallery.
        """
        if (text is None) == (image is None):
            raise InputError("give exactly one of text= (searches images) or image= (searches captions)")
        if text is not None:
            if not isinstance(text, str):
                raise InputError(f"text must be a str, got {type(text).__name__}; use search_batch for several")
            return self.search_batch(texts=[text], k=k, rerank=rerank)[0]
        sources = _pixel_sources(image)
        if sources is not None:
            if len(sources) != 1:
                raise InputError(f"image= takes one image, got {len(sources)}; use search_batch(images=[...])")
            return self.search_batch(images=sources, k=k, rerank=rerank)[0]  # type: ignore[arg-type]
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise InputError(f"image must be [R, {self.img_dim}] region features of one image, got shape {arr.shape}")
        return self.search_batch(images=[arr], k=k, rerank=rerank)[0]

    def search_batch(
        self,
        texts: Sequence[str] | None = None,
        images: ImageInput | None = None,
        *,
        k: int = 10,
        rerank: int = 100,
        image_mask: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Search for several queries at once (one encoder pass, one stage-1 product).

        Args:
            texts: captions (text -> image).
            images: ``[Q, R, Dv]`` or a list of ``[R_i, Dv]`` (image -> text).
            k, rerank: as in :meth:`search`.
            image_mask: ``[Q, R]`` for an array of images.
        Returns:
            One list of hits per query.
        Raises:
            InputError: as in :meth:`search`.
        """
        k, rerank = _check_k(k, rerank)
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
                raise InputError("the caption gallery is empty: add_texts(...) before searching with an image")
            q = self.encode_images(images, image_mask)
        return self._search_encoded(q, view, query_is_text=(name == IMAGES), k=k, rerank=rerank)

    def search_encoded(self, query: Encoded, *, query_is_text: bool, k: int = 10, rerank: int = 100) -> list[list[Hit]]:
        """Search with queries already encoded (``query_is_text``: search the image gallery)."""
        k, rerank = _check_k(k, rerank)
        view = (self.images if query_is_text else self.texts).view()
        if view.n == 0:
            raise InputError(f"the {'image' if query_is_text else 'caption'} gallery is empty")
        return self._search_encoded(query, view, query_is_text=query_is_text, k=k, rerank=rerank)

    def _search_encoded(
        self, q: Encoded, view: GalleryView, *, query_is_text: bool, k: int, rerank: int
    ) -> list[list[Hit]]:
        depth = max(k, rerank) if rerank > 0 else k
        rows, s1 = view.topk(q.stage1, depth)                                 # [Q, K]
        results: list[list[Hit]] = []
        for qi in range(len(q)):
            r, s = rows[qi], s1[qi]
            if rerank > 0 and len(r):
                final = s + self._rerank(q, qi, view, r, query_is_text)
                order = np.lexsort((r, -final))[:k]
            else:
                final = s
                order = np.arange(min(k, len(r)))
            results.append([Hit(view.ids[int(r[j])], float(final[j]), float(s[j])) for j in order])
        return results

    def _gatherer(self) -> ThreadPoolExecutor | None:
        """The helper threads of candidate gathers (made on first use; none for one thread)."""
        if self.gather_threads == 1:
            return None
        with self._gather_pool_lock:
            # a forked child inherits the pool object but not its threads: make a new one there
            if self._gather_pool is None or self._gather_pid != os.getpid():
                self._gather_pool = ThreadPoolExecutor(self.gather_threads - 1, thread_name_prefix="mssan-gather")
                self._gather_pid = os.getpid()
            return self._gather_pool

    def _rerank(self, q: Encoded, qi: int, view: GalleryView, rows: np.ndarray, query_is_text: bool) -> np.ndarray:
        """``s_ll`` of query ``qi`` against gallery ``rows`` -> ``[K]``."""
        width = max(1, extent(q.mask[qi : qi + 1]))
        q_local = q.local[qi : qi + 1, :width]                                 # [1, P, D]
        q_mask = q.mask[qi : qi + 1, :width]
        q_gram = q.gram[qi : qi + 1, :width, :width]
        out = np.empty(len(rows), np.float32)
        for a, b in _batches(len(rows), self.scorer_batch):
            local, mask, gram = view.gather(rows[a:b], self._gatherer(), self.gather_threads)  # [K, P', D] ...
            if query_is_text:
                feeds = {"img_local": local, "region_mask": mask, "img_gram": gram,
                         "txt_local": q_local, "token_mask": q_mask, "txt_gram": q_gram}
                out[a:b] = self.backend.run("scorer", feeds)["s_ll"][:, 0]     # [K, 1]
            else:
                feeds = {"img_local": q_local, "region_mask": q_mask, "img_gram": q_gram,
                         "txt_local": local, "token_mask": mask, "txt_gram": gram}
                out[a:b] = self.backend.run("scorer", feeds)["s_ll"][0, :]     # [1, K]
        return out


def _id_list(ids: Any) -> list[ItemId]:
    """``ids`` as a list of checked str/int ids; InputError for a single string or a non-sequence."""
    if isinstance(ids, (str, bytes)):
        raise InputError("ids must be a sequence of str/int, not a single string; wrap it in a list")
    try:
        return [_check_id(i) for i in ids]
    except TypeError:
        raise InputError(f"ids must be a sequence of str/int, got {type(ids).__name__}") from None


def _pixel_sources(x: object) -> list[ImageSource] | None:
    """``x`` as a list of images (paths, PIL images, uint8 arrays), or None when it is region features."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] in (1, 3, 4):
        return list(x)                                                   # [N,H,W,C] uint8
    if is_image_source(x):
        return [x]  # type: ignore[list-item]
    if isinstance(x, (list, tuple)) and x and all(is_image_source(i) for i in x):
        return list(x)
    return None


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        raise InputError(f"ids must be str or int, got {type(x).__name__}") from None


def _positive(name: str, v: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _check_k(k: int, rerank: int) -> tuple[int, int]:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise InputError(f"k must be a positive int, got {k!r}")
    if not isinstance(rerank, (int, np.integer)) or isinstance(rerank, bool) or rerank < 0:
        raise InputError(f"rerank must be an int >= 0 (0 = stage 1 only), got {rerank!r}")
    return int(k), int(rerank)


def tokenizer_from_bundle(bundle: Bundle) -> Tokenizer | SubwordTokenizer:
    """The bundle's tokenizer with the manifest's ``max_len``: the word ``Tokenizer`` on ``vocab.json``
    (Bi-GRU tower), or the ``SubwordTokenizer`` on ``tokenizer.json`` (transformer tower).

    Raises:
        BundleError: the bundle was exported with a different tokenizer definition, or its
            tokenizer file does not match the sha256 the manifest records for it.
        BackendUnavailableError: a subword tokenizer without the ``tokenizers`` package.
    """
    tk = bundle.manifest.get("tokenizer") or {}
    if tk.get("kind", "word") == SUBWORD_KIND:
        name = str(tk.get("file", ""))
        digest = tk.get("sha256")
        if not name or digest != bundle.manifest["files"].get(name):
            raise BundleError(f"bundle {bundle.root}: the tokenizer entry names {name!r} with sha256 {digest!r}, "
                              "which the manifest's file list does not confirm; re-export the bundle")
        return SubwordTokenizer.from_file(bundle.path(name), max_len=int(tk.get("max_len", 64)))
    if tk.get("kind", "word") != "word":
        raise BundleError(f"bundle {bundle.root} has a tokenizer of kind {tk.get('kind')!r}, which this mssan_infer "
                          "does not know; upgrade mssan_infer")
    for key, here in (("word_pattern", WORD_PATTERN.pattern), ("apostrophe_pattern", APOSTROPHE_PATTERN.pattern)):
        if key in tk and tk[key] != here:
            raise BundleError(
                f"bundle {bundle.root} was exported with another tokenizer ({key} {tk[key]!r} != {here!r}); "
                "use the mssan_infer version it was exported with, or re-export"
            )
    if tk.get("normalization", "NFKC") != "NFKC" or tk.get("lowercase", True) is not True:
        raise BundleError(f"bundle {bundle.root} uses tokenizer settings this mssan_infer does not support: {tk}")
    max_len = int(tk.get("max_len", bundle.model_config.get("max_len", 64)))
    return Tokenizer.from_file(bundle.path(tk.get("vocab", "vocab.json")), max_len=max_len)
