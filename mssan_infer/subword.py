"""The subword tokenizer of transformer text towers (defined in :mod:`mssan_infer.core.subword`, re-exported here)."""
from __future__ import annotations

from .core.subword import FILE, KIND, SubwordTokenizer, import_tokenizers, load_text_tokenizer

__all__ = ["SubwordTokenizer", "KIND", "FILE", "import_tokenizers", "load_text_tokenizer"]
