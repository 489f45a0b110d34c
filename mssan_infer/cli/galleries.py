"""Opening what ``search`` and ``remove`` work on: an existing index folder or existing Qdrant galleries,
never creating one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from mssan_infer.bundle import Bundle
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.folder import recover_interrupted_save
from mssan_infer.names import IMAGES, INDEX_MANIFEST, TEXTS
from mssan_infer.options import (
    BackendOptions,
    GalleryOptions,
)
from mssan_infer.qdrant.gallery import (
    missing_qdrant_galleries,
)
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer, parse_gallery
from mssan_infer.retriever import Retriever

__all__ = ["GalleryArg", "no_pixel_graph", "require_index", "spec_text", "open_existing"]


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


def open_existing(
    b: Bundle,
    index: str | os.PathLike[str] | None,
    gallery: GalleryArg,
    backend: str | BackendOptions,
) -> tuple[Retriever, str]:
    """A retriever on an existing index folder or existing Qdrant galleries (never creating one), and where
    they are in CLI words."""
    spec = None if isinstance(gallery, GalleryOptions) else parse_gallery(gallery)
    if (spec is not None) == (index is not None):
        raise InputError("give --index FOLDER or --gallery SPEC (Qdrant), exactly one of them")
    if spec is not None:
        _require_qdrant(spec, spec_text(gallery, spec))
        where = f"--gallery {spec_text(gallery, spec)}"
        gallery = dataclasses.replace(spec, create=False)  # never creates, even if one vanished meanwhile
    else:
        assert index is not None
        require_index(index)
        where = f"the index at {index}"
    return Retriever.load(b, backend, index=index, gallery=gallery), where
