"""The search core of MSSAN: galleries, saved indexes, the tokenizer and two-stage search, in numpy alone.

Everything here imports only the standard library, numpy and (lazily, when asked for)
faiss, and only modules of this package, with relative imports. That makes the package
self-contained: ``python -m export --triton`` copies it beside the Triton ``retriever``
model (as ``mssan_core``), which then runs the very code :class:`mssan_infer.Retriever`
runs, inside NVIDIA's container, without mssan_infer or torch installed.

- :mod:`.contract`: what search needs from a gallery (``Gallery``, ``GalleryView``), item ids.
- :mod:`.memory`: the in-memory (numpy / memory-mapped) gallery.
- :mod:`.stage1`: exact and FAISS maximum-inner-product top-k.
- :mod:`.store`: index folders (atomic saves, verified loads).
- :mod:`.search`: two-stage search.
- :mod:`.inputs`: checks of features, captions, ids and search options.
- :mod:`.tokenizer`, :mod:`.layout`, :mod:`.files`, :mod:`.errors`.
"""
from __future__ import annotations

from . import inputs, layout
from .contract import Gallery, GalleryView, ItemId, check_id, extent, id_text
from .errors import (
    BackendUnavailableError,
    BundleError,
    IndexFileError,
    IndexWriteError,
    InputError,
    MssanError,
    ParityError,
)
from .memory import ArrayView, GalleryIndex
from .search import Encoded, Ranked, ScoreFn, ScorerLimits, search
from .store import load_index, read_index_manifest, save_index
from .tokenizer import Tokenizer

__all__ = [
    "inputs", "layout", "Gallery", "GalleryView", "ItemId", "check_id", "extent", "id_text", "ArrayView", "GalleryIndex",
    "Encoded", "Ranked", "ScoreFn", "ScorerLimits", "search", "load_index", "read_index_manifest", "save_index",
    "Tokenizer", "MssanError", "BundleError", "IndexFileError", "IndexWriteError", "InputError",
    "BackendUnavailableError", "ParityError",
]
