"""What the runtime needs of a tokenizer (:class:`TextTokenizer`), and the one loader of a recorded
tokenizer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mssan_infer.errors import BundleError
from mssan_infer.text.subword import KIND, SubwordTokenizer
from mssan_infer.text.words import KIND as WORD_KIND
from mssan_infer.text.words import Tokenizer, check_settings

__all__ = ["TextTokenizer", "load_text_tokenizer"]


@runtime_checkable
class TextTokenizer(Protocol):
    """Captions -> token ids, as the text encoder graph takes them (word :class:`~.words.Tokenizer`
    or :class:`~.subword.SubwordTokenizer`)."""

    max_len: int

    def __len__(self) -> int:
        """Tokens in the vocabulary."""
        ...

    @property
    def unk_id(self) -> int | None:
        """The id of unknown words (``None``: the tokenizer has none)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of one caption (at most ``max_len``)."""
        ...

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each caption."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``tokens`` int64 ``[B, L]`` and ``mask`` float32 ``[B, L]``."""
        ...

    def unknown_words(self, text: str) -> list[str]:
        """What of ``text`` maps to the unknown id, for messages."""
        ...

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer's file (``vocab.json`` or ``tokenizer.json``)."""
        ...


def load_text_tokenizer(spec: Mapping[str, Any], path_of: Callable[[str], Path], where: str) -> TextTokenizer:
    """The tokenizer a recorded entry describes: a bundle manifest's ``tokenizer`` or the Triton
    retriever's ``tokenizer.json`` (one loader for both, so they give the same ids).

    Args:
        spec: ``kind`` ``"word"`` (default) with ``vocab`` (a file name or the word -> id object) and the
            word tokenizer's settings; or ``kind`` ``"subword"`` with ``file`` (a Hugging Face
            ``tokenizer.json``) and its ``sha256``. Both with ``max_len``.
        path_of: resolves a file name of the entry (confined to its folder).
        where: names the owner in messages.
    Raises:
        BundleError: another tokenizer definition, an unknown kind, a file that does not match its sha256.
        BackendUnavailableError: a subword tokenizer without ``tokenizers`` installed.
    """
    kind = spec.get("kind", WORD_KIND)
    max_len = int(spec.get("max_len", 64))
    if kind == KIND:
        name = str(spec.get("file") or "")
        if not name:
            raise BundleError(f"{where}: the subword tokenizer entry names no file; re-export the bundle")
        path = path_of(name)
        tok = SubwordTokenizer.from_file(path, max_len=max_len)
        digest = spec.get("sha256")
        if digest is not None and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BundleError(
                f"{where}: {name} does not match the sha256 its tokenizer entry records; re-export"
            )
        return tok
    if kind != WORD_KIND:
        raise BundleError(
            f"{where} has a tokenizer of kind {kind!r}, which this mssan_infer does not know; upgrade it"
        )
    check_settings(spec, where)
    vocab = spec.get("vocab", "vocab.json")
    if isinstance(vocab, dict):
        return Tokenizer.from_spec(spec, where)
    return Tokenizer.from_file(path_of(str(vocab)), max_len=max_len)
