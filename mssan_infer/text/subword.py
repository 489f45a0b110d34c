"""The subword tokenizer of transformer text towers: Hugging Face ``tokenizers`` on the bundle's
``tokenizer.json``.

One definition shared by training (``training.data``), export and the runtime:

- ``ids = Tokenizer.from_file("tokenizer.json").encode(text, add_special_tokens=False).ids``
  -- normalisation, pre-tokenisation and the subword model all come from the file
  (the Rust library, torch-free);
- no special tokens: the text encoder graph adds ``[CLS]``/``[SEP]`` itself
  (``manifest.tokenizer.prefix_ids`` / ``suffix_ids``), so ``tokens`` and the word
  locals line up one to one;
- truncation keeps the first ``max_len`` subwords (it may cut a word between two of
  its pieces), with a warning; the file's own padding/truncation settings are
  switched off (the exported copy has none);
- padding: zeros to the longest caption of a batch, with ``token_mask`` 1 for real subwords.

The Triton ``retriever`` model tokenizes the same way (DESIGN §10 "Subword tokenizer").
Imports only the standard library, numpy and (when a tokenizer is made) ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mssan_infer.deps import optional_import
from mssan_infer.errors import BundleError, InputError
from mssan_infer.text.words import pad_ids

__all__ = ["SubwordTokenizer", "KIND", "FILE", "import_tokenizers"]

log = logging.getLogger(__name__)

KIND = "subword"
FILE = "tokenizer.json"


def import_tokenizers() -> Any:
    """The ``tokenizers`` module, or a ``BackendUnavailableError`` saying how to install it."""
    return optional_import(
        "tokenizers",
        "'mssan[subword]'",
        "a transformer text tower (its captions are tokenized by Hugging Face tokenizers)",
    )


class SubwordTokenizer:
    """Captions -> subword ids (no special tokens) with a ``tokenizer.json``.

    Args:
        text: the ``tokenizer.json`` content.
        max_len: captions with more subwords are truncated to the first ``max_len`` (with a warning).
    Raises:
        BackendUnavailableError: ``tokenizers`` is not installed.
        BundleError: the text is not a tokenizer ``tokenizers`` can load.
        InputError: ``max_len < 1``.
    """

    kind = KIND

    def __init__(self, text: str, max_len: int = 64) -> None:
        tk = import_tokenizers()
        if not isinstance(max_len, int) or max_len < 1:
            raise InputError(f"max_len must be a positive int, got {max_len!r}")
        try:
            tok = tk.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise BundleError(f"not a Hugging Face tokenizer.json ({e}); re-export the bundle") from e
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.max_len = int(max_len)
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        unk = _unk_token(tok)
        self.unk_id: int | None = tok.token_to_id(unk) if unk is not None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_len: int = 64) -> "SubwordTokenizer":
        """Load a ``tokenizer.json``.

        Raises:
            BundleError: the file is missing, unreadable or not a tokenizer.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"cannot read the subword tokenizer {path}: {e}. Re-export the bundle.") from e
        return cls(text, max_len=max_len)

    def to_str(self) -> str:
        """The ``tokenizer.json`` text, without padding/truncation settings."""
        return str(self._tok.to_str())

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    def __len__(self) -> int:
        """Vocabulary size, added tokens included (ids are in ``[0, len)``)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _check(self, text: object, i: int | None = None) -> str:
        if not isinstance(text, str):
            where = "caption" if i is None else f"caption {i}"
            hint = "; decode bytes as UTF-8 first" if isinstance(text, (bytes, bytearray)) else ""
            raise InputError(f"{where} must be str, got {type(text).__name__}{hint}")
        return text

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) > self.max_len:
            log.warning("caption of %d subwords truncated to max_len=%d", len(ids), self.max_len)
            return ids[: self.max_len]
        return ids

    def encode(self, text: str) -> list[int]:
        """Subword ids of one caption (no special tokens), truncated to ``max_len``.

        Raises:
            InputError: ``text`` is not a str.
        """
        ids = self._tok.encode(self._check(text), add_special_tokens=False).ids
        return self._truncate(list(ids))

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each caption (one call into the Rust library for the whole list)."""
        checked = [self._check(t, i) for i, t in enumerate(texts)]
        return [
            self._truncate(list(e.ids)) for e in self._tok.encode_batch(checked, add_special_tokens=False)
        ]

    def unknown_words(self, text: str) -> list[str]:
        """The caption itself (cut to 60 characters): which words became unknown subwords is the
        tokenizer's business."""
        return [text[:60]]

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pad a batch of captions.

        Returns:
            tokens: int64 ``[B, L]`` with ``L`` the longest caption (at least 1), zero at padding,
            mask: float32 ``[B, L]``, 1 for real subwords.
        """
        return pad_ids(self.encode_many(texts))


def _unk_token(tok: Any) -> str | None:
    """The unknown token of the tokenizer's model (WordPiece/BPE/Unigram keep it differently)."""
    import json

    model = json.loads(tok.to_str()).get("model") or {}
    unk = model.get("unk_token")
    if isinstance(unk, str):
        return unk
    unk_id = model.get("unk_id")  # Unigram: an index into its vocab
    vocab = model.get("vocab")
    if isinstance(unk_id, int) and isinstance(vocab, list) and 0 <= unk_id < len(vocab):
        entry = vocab[unk_id]
        return str(entry[0] if isinstance(entry, list) else entry)
    return None
