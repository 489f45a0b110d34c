"""``python -m mssan_infer index``: region features, image files and captions into an index folder or Qdrant
galleries, with the same ``--append``/``--overwrite``/``--new-ids`` rules for both."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mssan_infer.bundle import Bundle, load_bundle
from mssan_infer.cli.files import check_finite, load_features, read_lines, read_metadata
from mssan_infer.cli.galleries import GalleryArg, layout_flags, no_pixel_graph, qdrant_spec, spec_text
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.base import ItemId, colliding_ids
from mssan_infer.gallery.folder import read_index_manifest, saved_layout
from mssan_infer.gallery.storage import Layout
from mssan_infer.images.encoder import PixelEncoder, has_pixel_graph
from mssan_infer.images.files import ImageFile, collect_images, is_features_file
from mssan_infer.images.preprocess import preprocess
from mssan_infer.names import IMAGES, INDEX_MANIFEST, TEXTS
from mssan_infer.options import (
    BackendOptions,
    GalleryOptions,
    SearchOptions,
)
from mssan_infer.progress import batches
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer
from mssan_infer.qdrant.places import (
    missing_qdrant_galleries,
    open_qdrant_galleries,
    replacing_qdrant_galleries,
)
from mssan_infer.retriever import Retriever

__all__ = ["PARTIAL_EXIT", "IndexSummary", "run_index"]

log = logging.getLogger("mssan_infer")


PARTIAL_EXIT = 3  # `index` of image files: indexed, but some files could not be read (listed on stderr)


def _gallery_ids(
    gallery: Any,
    n: int,
    ids_file: str | os.PathLike[str] | None,
    new_ids: bool,
    what: str,
    flag: str,
    where: str,
    named: Sequence[str] | None = None,
) -> list[ItemId]:
    """Ids for ``n`` new items: from ``ids_file`` (str, one per line), the files' ``named`` ids, fresh ints
    (``new_ids``), or ``0..n-1``.

    Raises:
        InputError: a count mismatch, duplicates, or ids already in the index (with what to do).
    """
    if ids_file is not None:
        ids: list[ItemId] = list(read_lines(ids_file, f"{what} ids", flag))
        if len(ids) != n:
            raise InputError(f"{ids_file} has {len(ids)} ids for {n} {what}s")
        source = f"{flag} {ids_file}"
    elif named is not None:
        ids, source = list(named), "the file paths"
    elif new_ids:
        return list(gallery.next_ids(n))
    else:
        ids = list(range(n))
        source = "row numbers 0.." + str(n - 1)
    seen: set[ItemId] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dup:
        raise InputError(f"{source} has duplicate ids {dup[:5]}; every {what} needs its own id")
    same, text = colliding_ids(ids, gallery)
    if same or text:
        clash = same or text
        how = "are already in" if same else "read the same as ids (of another type) in"
        if named is not None and ids_file is None:
            todo = (
                "index only the new files (name them, or list them in a .txt file), give other ids with "
                f"{flag}, or replace everything with --overwrite"
            )
        else:
            nxt = gallery.next_ids(1)[0]
            todo = (
                f"Pass --new-ids to number them after the index's largest id ({nxt}, {nxt + 1}, ...), or "
                f"give other ids with {flag}"
            )
        raise InputError(
            f"{len(clash)} of the {n} {what} ids ({source}) {how} {where}, e.g. {clash[:3]}; were these "
            f"{what}s indexed before? {todo}"
        )
    return ids


@dataclass(frozen=True)
class IndexSummary:
    """What :func:`run_index` did.

    Attributes:
        where: the index folder or the ``--gallery`` spec.
        images, texts: items added by this run.
        total_images, total_texts: items held afterwards.
        failed: ``(file, error)`` of each image file that could not be read (not indexed); the error names
            the file (``PATH: reason``).
        skipped: files in the folders given whose extension is not an image format's (not indexed).
    """

    where: str
    images: int
    texts: int
    total_images: int
    total_texts: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one summary line the CLI prints."""
        failed = f" ({len(self.failed)} failed)" if self.failed else ""
        text = f"indexed {self.images} images{failed} and {self.texts} captions into {self.where}"
        if (self.total_images, self.total_texts) != (self.images, self.texts):
            text += f"; it now holds {self.total_images} images and {self.total_texts} captions"
        return text


@dataclass
class _Inputs:
    """Everything ``index`` reads before touching a gallery (so a bad file changes nothing)."""

    feats: np.ndarray | None = None
    files: list[ImageFile] | None = None
    skipped: list[str] = field(default_factory=list)
    captions: list[str] | None = None
    image_meta: list[dict[str, Any] | None] | None = None
    caption_meta: list[dict[str, Any] | None] | None = None

    @property
    def n_images(self) -> int:
        if self.feats is not None:
            return int(self.feats.shape[0])
        return len(self.files) if self.files is not None else 0


def _image_inputs(images: Any) -> list[str] | None:
    if images is None:
        return None
    if isinstance(images, (str, os.PathLike)):
        return [os.fspath(images)]
    return [os.fspath(x) for x in images]


def _read_inputs(
    b: Bundle,
    images: list[str] | None,
    recursive: bool,
    texts: Any,
    metadata: Any,
    text_metadata: Any,
) -> _Inputs:
    inp = _Inputs()
    if images is not None:
        if len(images) == 1 and is_features_file(images[0]):
            inp.feats = load_features(images[0])
            if inp.feats.shape[2] != b.manifest.img_dim:
                raise InputError(
                    f"--images {images[0]} holds features [N, R, {inp.feats.shape[2]}], but the bundle's "
                    f"images are [N, R, {b.manifest.img_dim}]"
                )
            check_finite(inp.feats, images[0], "--images")
        else:
            if not any(is_features_file(x) for x in images) and not has_pixel_graph(b):
                raise no_pixel_graph(b, "--images")
            found = collect_images(
                images,
                recursive=recursive,
                read_list=lambda p: read_lines(p, "image paths", "--images"),
            )
            inp.files, inp.skipped = found.files, [str(p) for p in found.skipped]
    elif recursive:
        raise InputError("--recursive is for --images FOLDER")
    if texts is not None:
        inp.captions = read_lines(texts, "captions", "--texts")
    if metadata is not None:
        inp.image_meta = read_metadata(metadata, inp.n_images, "metadata", "--metadata")
    if text_metadata is not None and inp.captions is not None:
        inp.caption_meta = read_metadata(text_metadata, len(inp.captions), "text metadata", "--text-metadata")
    return inp


def run_index(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    recursive: bool = False,
    ids: str | os.PathLike[str] | None = None,
    texts: str | os.PathLike[str] | None = None,
    text_ids: str | os.PathLike[str] | None = None,
    metadata: str | os.PathLike[str] | None = None,
    text_metadata: str | os.PathLike[str] | None = None,
    append: bool = False,
    overwrite: bool = False,
    new_ids: bool = False,
    chunk: int = 1024,
    progress: bool = True,
    gallery: GalleryArg = None,
    backend: str | BackendOptions = "onnxruntime",
    search: SearchOptions | None = None,
) -> IndexSummary:
    """Encode images and/or captions into an index folder ``out``, or into Qdrant galleries.

    The same rules hold for both: an index or gallery that holds items is extended only with ``append``
    and replaced only with ``overwrite`` (atomically: see :func:`replacing_qdrant_galleries` for Qdrant).

    Ids: from ``ids`` / ``text_ids`` files (one per line, kept as str); image files are named by their path
    (relative to the folder given; a file or list entry as given); else row / line numbers ``0..N-1``
    (ints); with ``new_ids``, ints after the largest int id in the index.

    Args:
        images: a ``.npy`` ``[N, R, Dv]`` of region features, or (with a bundle exported with ``--pixels``)
            image folders, image files and ``.txt`` lists of image paths (see
            :func:`~mssan_infer.images.files.collect_images`). An image file that cannot be read is
            reported in :attr:`IndexSummary.failed` and the others are indexed.
        recursive: walk the subfolders of image folders too.
        texts: captions, one per line.
        append: add to the index or galleries already there (ids must not be in them yet).
        overwrite: replace them.
        new_ids: number items without ids after the index's largest int id.
        metadata, text_metadata: JSON lines, one object per image / caption (for ``--where`` filters).
        chunk: rows of a ``.npy`` encoded and added per step (bounds memory for large files); image files go
            ``search.batch_size`` at a time.
        gallery: the in-memory gallery's :class:`~mssan_infer.options.GalleryOptions` (layout...), or Qdrant
            galleries (``"qdrant-edge:PATH"``, ``"qdrant:URL"``) instead of ``out``.
        backend, search: as in :meth:`Retriever.load`.
    Raises:
        InputError: nothing to index, neither or both of ``out`` and ``gallery``, an index or gallery that
            holds items without ``append``/``overwrite``, id count mismatch, ids already in the index, bad
            files, or no image file that could be read.
        IndexFileError / BundleError: as in :meth:`Retriever.load` and :meth:`Retriever.save`.
    """
    image_args = _image_inputs(images)
    if image_args is None and texts is None:
        raise InputError(
            "nothing to index: give --images (a folder or files of images, or FEATS.npy) and/or --texts "
            "CAPTIONS.txt"
        )
    if ids is not None and image_args is None:
        raise InputError("--ids needs --images")
    if text_ids is not None and texts is None:
        raise InputError("--text-ids needs --texts")
    if append and overwrite:
        raise InputError("--append adds to what is there and --overwrite replaces it; choose one")
    if (metadata is not None and image_args is None) or (text_metadata is not None and texts is None):
        raise InputError("--metadata needs --images and --text-metadata needs --texts")
    spec = qdrant_spec(gallery)
    if (spec is not None) == (out is not None):
        raise InputError(
            "give --out FOLDER (an index folder) or --gallery SPEC (Qdrant), exactly one of them"
        )
    b = load_bundle(bundle)
    inp = _read_inputs(b, image_args, recursive, texts, metadata, text_metadata)
    image_named = inp.files is not None and ids is None
    if (
        new_ids
        and (image_args is None or ids is not None or image_named)
        and (texts is None or text_ids is not None)
    ):
        raise InputError(
            "--new-ids numbers items that have no ids: here every item has one (an ids file, or an image "
            "file's path)"
        )

    def fill(r: Retriever, where: str) -> IndexSummary:
        return _add_inputs(r, inp, ids, text_ids, new_ids, where, chunk, progress)

    if spec is not None:
        return _index_qdrant(b, spec, spec_text(gallery, spec), fill, append, overwrite, backend, search)
    memory = gallery if isinstance(gallery, GalleryOptions) else None
    assert out is not None
    return _index_folder(b, Path(out), memory, fill, append, overwrite, backend, search, os.fspath(out))


def _index_folder(
    b: Bundle,
    outp: Path,
    memory: GalleryOptions | None,
    fill: Any,
    append: bool,
    overwrite: bool,
    backend: str | BackendOptions,
    search: SearchOptions | None,
    shown: str,
) -> IndexSummary:
    existing = outp.exists() and (outp / INDEX_MANIFEST).is_file()
    if outp.exists() and not existing and (not outp.is_dir() or any(outp.iterdir())):
        raise InputError(f"--out {outp} exists and is not an mssan index; choose another path")
    if existing and not append and not overwrite:
        galleries = read_index_manifest(outp)["galleries"]
        nouns = {IMAGES: "images", TEXTS: "captions"}
        held = (
            ", ".join(f"{e.get('n', '?')} {nouns.get(name, name)}" for name, e in galleries.items())
            or "nothing"
        )
        raise InputError(
            f"--out {outp} already holds an index ({held}); pass --append to add to it, or --overwrite to "
            "replace it"
        )
    if append and not existing:
        log.info("%s holds no index yet: starting a new one", outp)
    if append and existing and memory is not None and memory.layout is not None:
        _check_same_layout(outp, memory.resolved_layout())
    r = Retriever.load(b, backend, index=outp if append and existing else None, gallery=memory, search=search)
    try:
        summary = fill(r, f"the index at {outp}")
        r.save(outp)
    finally:
        r.close()
    return dataclasses.replace(summary, where=shown)


def _check_same_layout(outp: Path, wanted: Layout) -> None:
    """Refuse ``--append`` with a ``--layout`` other than the saved index's: loading it in
    another layout would rewrite every item it holds (and a coarser one loses their exact values)."""
    try:
        galleries = read_index_manifest(outp)["galleries"].values()
        where = f"the index at --out {outp}"
        saved = {saved_layout(e, where) for e in galleries if int(e.get("n", 1)) > 0}  # items to convert
    except (KeyError, TypeError, ValueError, InputError):
        return  # a damaged manifest: loading the index reports it
    other = sorted((lay for lay in saved if lay != wanted), key=lambda lay: lay.name)
    if other:
        held = " and ".join(layout_flags(lay) for lay in other)
        raise InputError(
            f"--out {outp} holds an index built with {held}, but this --append asks for "
            f"{layout_flags(wanted)}, which would convert every item already there: append without "
            "--layout (the index keeps its layout), or rebuild it in the new layout with "
            "--overwrite"
        )


def _index_qdrant(
    b: Bundle,
    spec: QdrantEdge | QdrantServer,
    where: str,
    fill: Any,
    append: bool,
    overwrite: bool,
    backend: str | BackendOptions,
    search: SearchOptions | None,
) -> IndexSummary:
    names = (IMAGES, TEXTS)

    def fill_flushed(galleries: QdrantEdge | QdrantServer) -> IndexSummary:
        r = Retriever.load(b, backend, gallery=galleries, search=search)
        try:
            summary = fill(r, f"--gallery {where}")
            r.flush()
        finally:
            r.close()
        return dataclasses.replace(summary, where=where)

    if overwrite:
        with replacing_qdrant_galleries(spec, names) as staged:
            return fill_flushed(staged)
    held = _qdrant_counts(b, spec, names, where) if not append else {}
    if any(held.values()):
        raise InputError(
            f"--gallery {where} already holds {held.get(IMAGES, 0)} images and {held.get(TEXTS, 0)} "
            "captions; pass --append to add to it, or --overwrite to replace it"
        )
    return fill_flushed(spec)


def _qdrant_counts(
    b: Bundle, spec: QdrantEdge | QdrantServer, names: Sequence[str], where: str
) -> dict[str, int]:
    """Items in each existing gallery of ``spec`` (creates nothing)."""
    present = [n for n in names if n not in missing_qdrant_galleries(spec, names)]
    d = b.manifest.embed_size
    try:
        opened = open_qdrant_galleries(
            dataclasses.replace(spec, create=False), present, 2 * d, d, b.bundle_id
        )
    except IndexFileError as e:
        raise IndexFileError(f"--gallery {where}: {e}; to replace it, pass --overwrite") from e
    counts = {}
    for name, g in opened.items():
        counts[name] = len(g)
        g.close()
    return counts


def _add_inputs(
    r: Retriever,
    inp: _Inputs,
    ids: Any,
    text_ids: Any,
    new_ids: bool,
    where: str,
    chunk: int,
    progress: bool,
) -> IndexSummary:
    """Check every input, then add. Ids and metadata are checked and the captions encoded (each needs a word
    the model knows) before the first item is added, so a bad one changes nothing, in Qdrant too; image
    files that cannot be read are collected, not fatal, unless none can."""
    named = [f.id for f in inp.files] if inp.files is not None else None
    image_ids = (
        _gallery_ids(r.images, inp.n_images, ids, new_ids, "image", "--ids", where, named)
        if inp.n_images
        else []
    )
    cap_ids = (
        _gallery_ids(r.texts, len(inp.captions), text_ids, new_ids, "caption", "--text-ids", where)
        if inp.captions is not None
        else []
    )
    # captions are encoded first: one the model cannot encode (no known word) fails before anything is added
    captions = r.encode_texts(inp.captions, progress=progress) if inp.captions is not None else None
    meta = inp.image_meta
    failed: list[tuple[str, str]] = []
    if inp.feats is not None:
        feats = inp.feats
        for a, b in batches(feats.shape[0], chunk, "encode images", progress):
            r.add_images(
                np.asarray(feats[a:b], dtype=np.float32),
                ids=image_ids[a:b],
                metadata=meta[a:b] if meta is not None else None,
            )
    elif inp.files is not None:
        failed = _add_image_files(r, inp.files, image_ids, meta, progress)
        if len(failed) == len(inp.files):
            shown = "; ".join(why for _, why in failed[:3])
            more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
            raise InputError(
                f"none of the {len(failed)} image files could be read, so nothing was indexed: {shown}{more}"
            )
    n_images = inp.n_images - len(failed)
    if captions is not None:
        r.texts.add(
            captions.stage1,
            captions.local,
            captions.mask,
            captions.gram,
            cap_ids,
            metadata=inp.caption_meta,
            texts=inp.captions,
        )
    return IndexSummary(
        where,
        n_images,
        len(inp.captions or []),
        r.n_images,
        r.n_texts,
        failed=failed,
        skipped=inp.skipped,
    )


def _add_image_files(
    r: Retriever,
    files: list[ImageFile],
    ids: list[ItemId],
    meta: list[dict[str, Any] | None] | None,
    progress: bool,
) -> list[tuple[str, str]]:
    """Preprocess image files one by one and encode and add the readable ones in full batches of
    ``r.batch_size``. Each image keeps its absolute path as its source. Returns ``(file, error)`` of the
    files that could not be read (not indexed); the error names the file."""
    failed: list[tuple[str, str]] = []
    pending: list[int] = []
    pixels: list[np.ndarray] = []
    encoder = PixelEncoder(r.bundle, r.backend, r.embed_size)

    def add() -> None:
        enc = encoder.encode_pixels(np.stack(pixels), r.batch_size)
        r.add_images(
            enc,
            ids=[ids[i] for i in pending],
            metadata=[meta[i] for i in pending] if meta is not None else None,
            sources=[str(files[i].path.absolute()) for i in pending],
        )
        pending.clear()
        pixels.clear()

    try:
        cfg = encoder.preprocessing
        for a, b in batches(len(files), r.batch_size, "index images", progress):
            for i in range(a, b):
                path = files[i].path
                try:
                    pixels.append(preprocess(path, cfg, str(path)))
                except InputError as e:
                    why = str(e)
                    failed.append((str(path), why if str(path) in why else f"{path}: {why}"))
                    continue
                pending.append(i)
                if len(pending) == r.batch_size:
                    add()
        if pending:
            add()
    finally:
        encoder.close()
    return failed
