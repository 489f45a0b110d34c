"""Galleries and saved indexes (defined in :mod:`mssan_infer.core`, re-exported here).

- :class:`GalleryIndex`: the in-memory gallery (:mod:`mssan_infer.core.memory`).
- :func:`save_index` / :func:`load_index`: index folders (:mod:`mssan_infer.core.store`).
- :func:`topk_inner_product`: exact stage 1 (:mod:`mssan_infer.core.stage1`).
- :data:`LAYOUTS` / :class:`Layout`: how a gallery stores items (:mod:`mssan_infer.core.quant`).
"""
from __future__ import annotations

from .core.contract import Gallery, GalleryView, ItemId, check_id, extent
from .core.layout import INDEX_FORMAT, INDEX_FORMAT_VERSION, INDEX_MANIFEST
from .core.memory import ArrayView, GalleryIndex
from .core.quant import LAYOUTS, Layout
from .core.stage1 import STAGE1_METHODS, default_ivf_nlist, topk_inner_product
from .core.store import load_index, read_index_manifest, save_index

__all__ = [
    "Gallery",
    "GalleryView",
    "GalleryIndex",
    "ArrayView",
    "LAYOUTS",
    "Layout",
    "ItemId",
    "check_id",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_MANIFEST",
    "STAGE1_METHODS",
    "topk_inner_product",
    "save_index",
    "load_index",
    "read_index_manifest",
    "extent",
    "default_ivf_nlist",
]
