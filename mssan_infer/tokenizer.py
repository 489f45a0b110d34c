"""The word tokenizer of MSSAN (defined in :mod:`mssan_infer.core.tokenizer`, re-exported here)."""
from __future__ import annotations

from .core.tokenizer import (
    APOSTROPHE_PATTERN,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    WORD_PATTERN,
    Tokenizer,
    build_vocab,
    tokenize,
)

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "PAD", "UNK", "PAD_ID", "UNK_ID", "tokenize", "build_vocab",
           "WORD_PATTERN", "APOSTROPHE_PATTERN"]
