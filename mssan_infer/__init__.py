"""mssan_infer: torch-free two-stage image-text retrieval with exported MSSAN bundles.

    from mssan_infer import Retriever
    r = Retriever.load("bundle/")
    r.add_images(region_feats, ids=[...])           # [N, R, Dv]
    hits = r.search(text="a dog on the beach", k=10, rerank=100)

Imports numpy only; onnxruntime, faiss, tensorrt and tritonclient are imported
when first needed. Never imports torch.
"""
from __future__ import annotations

import logging

from .backends import Backend, available_backends, create_backend, register_backend
from .bundle import Bundle, load_bundle
from .errors import BackendUnavailableError, BundleError, IndexFileError, InputError, MssanError, ParityError
from .index import GalleryIndex, load_index, save_index
from .retriever import Encoded, Hit, Retriever, tokenizer_from_bundle
from .tokenizer import Tokenizer, tokenize

__all__ = [
    "Retriever",
    "Hit",
    "Encoded",
    "GalleryIndex",
    "Bundle",
    "load_bundle",
    "load_index",
    "save_index",
    "Tokenizer",
    "tokenize",
    "tokenizer_from_bundle",
    "Backend",
    "available_backends",
    "create_backend",
    "register_backend",
    "MssanError",
    "BundleError",
    "IndexFileError",
    "InputError",
    "BackendUnavailableError",
    "ParityError",
    "__version__",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
