"""Opening what ``search`` and ``remove`` work on: an existing index folder or existing Qdrant galleries,
never creating one."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mssan_infer.bundle import BUNDLE_FILES, Bundle, check_index_bundle
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.base import Gallery
from mssan_infer.gallery.folder import (
    load_index,
    read_index_manifest,
    recover_interrupted_save,
    save_index,
    saved_layout,
)
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.storage import LAYOUTS, Layout
from mssan_infer.names import IMAGES, INDEX_MANIFEST, TEXTS
from mssan_infer.options import BackendOptions, GalleryOptions, Stage1Options
from mssan_infer.qdrant.gallery import QdrantGallery
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer, parse_gallery
from mssan_infer.qdrant.places import missing_qdrant_galleries, open_qdrant_galleries
from mssan_infer.retriever import Retriever

__all__ = [
    "GalleryArg",
    "ExistingGalleries",
    "layout_flags",
    "no_pixel_graph",
    "open_existing",
    "open_galleries",
    "qdrant_spec",
    "require_index",
    "spec_text",
]


GalleryArg = GalleryOptions | QdrantEdge | QdrantServer | str | None


def no_pixel_graph(b: Bundle, flag: str) -> InputError:
    return InputError(
        f"{flag} names image files, but bundle {b.root} has no pixel graph (it takes region features "
        f"[N, R, {b.manifest.img_dim}] from a .npy); to index and search image files, export it with one: "
        f"`python -m export --checkpoint CKPT --out {b.root} --pixels --features DATA --backbone-weights "
        "WEIGHTS`"
    )


def require_index(index: str | os.PathLike[str], *, recover: bool = True) -> None:
    """Refuse, in CLI words, a path that holds no index (with ``recover``, after putting back one that a
    killed save left aside, as loading does)."""
    root = Path(index)
    if recover:
        recover_interrupted_save(root)
    if not (root / INDEX_MANIFEST).is_file():
        raise IndexFileError(
            f"--index {root} is not an mssan index ({INDEX_MANIFEST} missing); build one with "
            f"`python -m mssan_infer index --bundle BUNDLE --images ... --out {root}`"
        )


def _require_qdrant(spec: QdrantEdge | QdrantServer, where: str) -> None:
    """Refuse, creating nothing, Qdrant galleries that do not exist."""
    missing = missing_qdrant_galleries(spec, (IMAGES, TEXTS))
    if missing:
        raise IndexFileError(
            f"--gallery {where}: no mssan gallery there (missing: {', '.join(missing)}), and none was "
            "created; check the spec, or build it with `python -m mssan_infer index --bundle BUNDLE "
            f"--gallery {where} --images ...`"
        )


def spec_text(gallery: Any, spec: QdrantEdge | QdrantServer | None) -> str:
    """``--gallery`` as the user wrote it, or the same form for a spec object."""
    if isinstance(gallery, str) or spec is None:
        return str(gallery)
    if isinstance(spec, QdrantEdge):
        return f"qdrant-edge:{spec.path}"
    return f"qdrant:{spec.url or 'client'}?prefix={spec.prefix}"


def qdrant_spec(gallery: GalleryArg) -> QdrantEdge | QdrantServer | None:
    """``--gallery`` as Qdrant galleries (None: an in-memory gallery's options, or none), refused in the
    flag's words."""
    return None if isinstance(gallery, GalleryOptions) else parse_gallery(gallery, name="--gallery")


def layout_flags(layout: Layout) -> str:
    """The ``index`` flags that ask for ``layout``."""
    if layout.name in LAYOUTS:
        return f"--layout {layout.name}"
    return f"layout stage1={layout.stage1}, local={layout.local} (no flag gives it)"


def _check_stage1(index: str | os.PathLike[str], stage1: Stage1Options) -> None:
    """Refuse ``--stage1 faiss-ivf`` on an index whose stage 1 is compressed (it scans its own codes)."""
    if stage1.method == "numpy":
        return
    try:
        saved = [saved_layout(e, f"index {index}") for e in read_index_manifest(index)["galleries"].values()]
    except (KeyError, TypeError, ValueError, InputError):
        return  # a damaged manifest: loading the index reports it
    compressed = sorted({lay.name for lay in saved if lay.compressed_stage1})
    if compressed:
        flags = " and ".join(layout_flags(LAYOUTS[n]) if n in LAYOUTS else n for n in compressed)
        raise InputError(
            f"--stage1 {stage1.method} searches float32 stage-1 vectors, but the index at {index} was built "
            f"with {flags}, whose stage 1 is scanned by its own compressed codes: search it with --stage1 "
            "numpy (the default)"
        )


def _locate(
    index: str | os.PathLike[str] | None, gallery: GalleryArg
) -> tuple[QdrantEdge | QdrantServer | None, str]:
    """The existing Qdrant galleries (never created: ``create=False``) or index folder to open, refused in
    CLI words when there is none, and where they are in CLI words."""
    spec = qdrant_spec(gallery)
    if (spec is not None) == (index is not None):
        raise InputError("give --index FOLDER or --gallery SPEC (Qdrant), exactly one of them")
    if spec is not None:
        _require_qdrant(spec, spec_text(gallery, spec))
        # never creates, even if one vanished meanwhile
        return dataclasses.replace(spec, create=False), f"--gallery {spec_text(gallery, spec)}"
    assert index is not None
    require_index(index)
    return None, f"the index at {index}"


def open_existing(
    b: Bundle,
    index: str | os.PathLike[str] | None,
    gallery: GalleryArg,
    backend: str | BackendOptions,
) -> tuple[Retriever, str]:
    """A retriever on an existing index folder or existing Qdrant galleries (never creating one), and where
    they are in CLI words."""
    spec, where = _locate(index, gallery)
    if spec is None and isinstance(gallery, GalleryOptions):
        assert index is not None
        _check_stage1(index, gallery.stage1)
    return Retriever.load(b, backend, index=index, gallery=spec or gallery), where


@dataclass
class ExistingGalleries:
    """The image and caption galleries of an existing index folder or existing Qdrant galleries, opened
    without a backend (for ``remove``: nothing is encoded). :meth:`keep` makes changes durable."""

    bundle: Bundle
    index: str | os.PathLike[str] | None
    where: str
    galleries: dict[str, Gallery]

    def keep(self) -> None:
        """Save an index folder (atomically), or flush Qdrant galleries."""
        if self.index is not None:
            own = {n: g for n, g in self.galleries.items() if isinstance(g, MemoryGallery)}
            save_index(
                self.index, own, bundle_id=self.bundle.bundle_id, extra={BUNDLE_FILES: self.bundle.id_files}
            )
        else:
            for g in self.galleries.values():
                if isinstance(g, QdrantGallery):
                    g.flush()

    def close(self) -> None:
        for g in self.galleries.values():
            if isinstance(g, QdrantGallery):
                g.close()


def open_galleries(b: Bundle, index: str | os.PathLike[str] | None, gallery: GalleryArg) -> ExistingGalleries:
    """The galleries of an existing index folder or existing Qdrant galleries (never creating one), checked
    against bundle ``b``'s id, without loading any graph."""
    spec, where = _locate(index, gallery)
    d = b.manifest.embed_size
    galleries: dict[str, Gallery]
    if spec is not None:
        galleries = dict(open_qdrant_galleries(spec, (IMAGES, TEXTS), 2 * d, d, b.bundle_id))
    else:
        assert index is not None
        check_index_bundle(index, b)
        loaded, _ = load_index(index, bundle_id=b.bundle_id)
        galleries = {n: loaded[n] if n in loaded else MemoryGallery(2 * d, d) for n in (IMAGES, TEXTS)}
    return ExistingGalleries(b, index, where, galleries)
