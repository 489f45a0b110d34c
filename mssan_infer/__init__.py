"""mssan_infer: torch-free two-stage image-text retrieval with exported MSSAN bundles.

    from mssan_infer import Retriever
    r = Retriever.load("bundle/")
    r.add_images(region_feats, ids=[...])           # [N, R, Dv]
    hits = r.search(text="a dog on the beach", k=10, rerank=100)

Imports numpy only; onnxruntime, faiss, tensorrt, tritonclient, qdrant and tokenizers are imported
when first needed. Never imports torch. Each public name is exported here once; the modules that
define them are grouped by job (``gallery/``, ``qdrant/``, ``text/``, ``images/``, ``backends/``,
``triton/``).
"""

from __future__ import annotations

import logging

from mssan_infer.backends import available_backends, create_backend, register_backend
from mssan_infer.backends.base import Backend
from mssan_infer.bundle import Bundle, Manifest, load_bundle, tokenizer_from_bundle
from mssan_infer.errors import (
    BackendUnavailableError,
    BundleError,
    IndexFileError,
    IndexWriteError,
    InputError,
    MssanError,
    ParityError,
)
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.storage import LAYOUTS, Layout
from mssan_infer.options import (
    BackendOptions,
    GalleryOptions,
    OnnxRuntimeOptions,
    SearchOptions,
    Stage1Options,
    TensorRTOptions,
    TritonOptions,
)
from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions, QdrantServer
from mssan_infer.retriever import Hit, Retriever
from mssan_infer.search import Encoded
from mssan_infer.text.base import TextTokenizer
from mssan_infer.text.subword import SubwordTokenizer
from mssan_infer.text.words import Tokenizer, tokenize

__all__ = [
    "Retriever",
    "Hit",
    "Encoded",
    "GalleryOptions",
    "Stage1Options",
    "SearchOptions",
    "BackendOptions",
    "OnnxRuntimeOptions",
    "TensorRTOptions",
    "TritonOptions",
    "QdrantEdge",
    "QdrantServer",
    "QdrantOptions",
    "MemoryGallery",
    "LAYOUTS",
    "Layout",
    "Bundle",
    "Manifest",
    "load_bundle",
    "load_index",
    "save_index",
    "TextTokenizer",
    "Tokenizer",
    "SubwordTokenizer",
    "tokenize",
    "tokenizer_from_bundle",
    "Backend",
    "available_backends",
    "create_backend",
    "register_backend",
    "MssanError",
    "BundleError",
    "IndexFileError",
    "IndexWriteError",
    "InputError",
    "BackendUnavailableError",
    "ParityError",
    "__version__",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
