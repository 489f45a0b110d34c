"""``python -m mssan_infer search``: a caption against the image gallery, or an image (file or features)
against the captions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, TextIO

import numpy as np

from mssan_infer.bundle import load_bundle
from mssan_infer.cli.files import check_finite, load_features
from mssan_infer.cli.galleries import GalleryArg, no_pixel_graph, open_existing
from mssan_infer.errors import InputError
from mssan_infer.images.encoder import has_pixel_graph
from mssan_infer.images.files import LIST_SUFFIXES, is_features_file
from mssan_infer.options import (
    BackendOptions,
)
from mssan_infer.retriever import Hit

__all__ = ["run_search", "where_filter", "print_hits"]


def run_search(
    bundle: str | os.PathLike[str],
    index: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    image: str | os.PathLike[str] | None = None,
    row: int | None = None,
    k: int = 10,
    rerank: int = 100,
    where: Mapping[str, Any] | None = None,
    gallery: GalleryArg = None,
    backend: str | BackendOptions = "onnxruntime",
) -> list[Hit]:
    """Search an index (or Qdrant galleries) with a caption (-> images), or with an image (-> captions):
    an image file (a bundle exported with ``--pixels``) or row ``row`` (default 0) of a ``.npy`` of region
    features; optionally filtered by metadata (``where``). Never creates a gallery.

    Raises:
        InputError: neither or both queries, neither or both of ``index`` and ``gallery``, a row outside
            the file, ``row`` with an image file, an image file without the pixel graph, bad k/rerank or
            filter, an empty gallery.
        IndexFileError: no index or gallery there.
    """
    if (text is None) == (image is None):
        raise InputError(
            "give a caption to search images, or --image FILE (an image file, or FEATS.npy with --row N) to "
            "search captions"
        )
    b = load_bundle(bundle)
    query: Any = text
    if image is not None:
        if is_features_file(image):
            feats = load_features(image, "--image")
            row = 0 if row is None else row
            if not 0 <= row < feats.shape[0]:
                raise InputError(f"--row {row} is outside {image}, which has {feats.shape[0]} images")
            check_finite(feats[row : row + 1], image, "--image", first=row)
            query = np.asarray(feats[row], dtype=np.float32)
        else:
            if row is not None:
                raise InputError(f"--row picks a row of a .npy features file; {image} is an image file")
            if Path(image).suffix.lower() in LIST_SUFFIXES or Path(image).is_dir():
                raise InputError(f"--image takes one image file (or a .npy of features), not {image}")
            if not has_pixel_graph(b):
                raise no_pixel_graph(b, "--image")
            query = os.fspath(image)
    r, place = open_existing(b, index, gallery, backend)
    try:
        if text is not None:
            if r.n_images == 0:
                raise InputError(
                    f"{place} holds no images to search with a caption; add some with `python -m mssan_infer "
                    "index ... --images ... --append`"
                )
            return r.search(text=text, k=k, rerank=rerank, where=where)
        if r.n_texts == 0:
            raise InputError(
                f"{place} holds no captions to search with an image; add some with `python -m mssan_infer "
                "index ... --texts CAPTIONS.txt --append`"
            )
        return r.search(image=query, k=k, rerank=rerank, where=where)
    finally:
        r.close()


def where_filter(text: str | None) -> dict[str, Any] | None:
    """``--where`` as a mapping. Raises InputError for text that is not a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InputError(f'--where must be a JSON object, e.g. \'{{"album": "beach"}}\' ({e})') from None
    if not isinstance(value, dict):
        raise InputError(f"--where must be a JSON object, got {type(value).__name__}")
    return value


def print_hits(hits: list[Hit], query: str, out: TextIO) -> None:
    """The hits as a table: rank, id, scores and, when any hit has one, its caption text or source file."""
    print(query, file=out)
    if not hits:
        print("  (no results)", file=out)
        return
    width = max(len(str(h.id)) for h in hits)
    shown = [h.text if h.text is not None else h.source for h in hits]
    what = "  text" if any(h.text is not None for h in hits) else "  source"
    label = what if any(x is not None for x in shown) else ""
    print(f"  {'rank':>4}  {'id':<{width}}  {'score':>8}  {'stage1':>8}{label}".rstrip(), file=out)
    for i, (h, x) in enumerate(zip(hits, shown), 1):
        line = f"  {i:>4}  {str(h.id):<{width}}  {h.score:8.4f}  {h.stage1:8.4f}"
        print(f"{line}  {x}" if label and x is not None else line, file=out)
