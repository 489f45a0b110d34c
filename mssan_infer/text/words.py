"""The one tokenizer of MSSAN, used by training and by the runtime.

Pure Python and deterministic: NFKC normalisation, lower-casing, then words
are maximal runs of letters/digits (unicode aware); an apostrophe inside a
word is dropped ("dog's" -> "dogs"); every other character separates words.
Captions carry no ``<start>``/``<end>`` tokens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mssan_infer.errors import BundleError, InputError

__all__ = [
    "Tokenizer",
    "SPECIAL_TOKENS",
    "PAD",
    "UNK",
    "PAD_ID",
    "UNK_ID",
    "tokenize",
    "build_vocab",
    "WORD_PATTERN",
    "APOSTROPHE_PATTERN",
    "KIND",
    "settings",
    "check_settings",
    "pad_ids",
]

log = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, UNK_ID = 0, 3

WORD_PATTERN = re.compile(r"[^\W_]+", re.UNICODE)
APOSTROPHE_PATTERN = re.compile(r"(?<=[^\W_])['\u2019](?=[^\W_])", re.UNICODE)
KIND = "word"
NORMALIZATION = "NFKC"


def settings(max_len: int) -> dict[str, Any]:
    """This tokenizer's definition as JSON: what a bundle manifest and the Triton retriever record."""
    return {
        "kind": KIND,
        "max_len": int(max_len),
        "normalization": NORMALIZATION,
        "lowercase": True,
        "word_pattern": WORD_PATTERN.pattern,
        "apostrophe_pattern": APOSTROPHE_PATTERN.pattern,
        "special_tokens": list(SPECIAL_TOKENS),
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
    }


def check_settings(recorded: Mapping[str, Any], where: str) -> None:
    """Refuse a recorded tokenizer definition that differs from this one (missing keys mean the default).

    Raises:
        BundleError: a pattern, the normalisation, lower-casing or a special id differs.
    """
    here = settings(1)
    for key in (
        "kind",
        "normalization",
        "lowercase",
        "word_pattern",
        "apostrophe_pattern",
        "pad_id",
        "unk_id",
    ):
        if key in recorded and recorded[key] != here[key]:
            raise BundleError(
                f"{where} was exported with another tokenizer ({key} {recorded[key]!r} != {here[key]!r}); "
                "use the mssan_infer version it was exported with, or re-export"
            )


def tokenize(text: str) -> list[str]:
    """Split ``text`` into normalised words. Never raises on a ``str``."""
    if not isinstance(text, str):
        raise InputError(f"caption must be str, got {type(text).__name__}; decode bytes as UTF-8 first")
    text = unicodedata.normalize("NFKC", text).lower()
    text = APOSTROPHE_PATTERN.sub("", text)
    return WORD_PATTERN.findall(text)


def build_vocab(captions: Iterable[str], threshold: int = 4) -> dict[str, int]:
    """Vocabulary of words seen at least ``threshold`` times, special tokens first.

    Ids are deterministic: specials 0..3, then words by decreasing count, ties
    broken alphabetically.
    """
    counts: Counter[str] = Counter()
    for cap in captions:
        counts.update(tokenize(cap))
    words = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab[w] = len(vocab)
    return vocab


class Tokenizer:
    """Words -> ids with a fixed vocabulary.

    Args:
        vocab: word -> id, with the four special tokens at ids 0..3.
        max_len: captions longer than this are truncated (with a warning).
    """

    def __init__(self, vocab: dict[str, int], max_len: int = 64) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if vocab.get(tok) != i:
                raise BundleError(
                    f"vocabulary must map {tok!r} to id {i}; got {vocab.get(tok)!r}. "
                    "Rebuild it with mssan_infer.text.words.build_vocab."
                )
        if max_len < 1:
            raise InputError(f"max_len must be >= 1, got {max_len}")
        self.vocab = dict(vocab)
        self.max_len = int(max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def unk_id(self) -> int:
        """The id of ``<unk>`` (every word outside the vocabulary)."""
        return UNK_ID

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str) -> "Tokenizer":
        """From :func:`settings` plus ``"vocab"`` (a word -> id object), as the Triton retriever stores it.

        Raises:
            BundleError: another tokenizer definition, or a malformed vocabulary.
        """
        check_settings(spec, where)
        vocab = spec.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise BundleError(f"{where}: 'vocab' is not a word->id JSON object. Re-export the bundle.")
        return cls(vocab, max_len=int(spec.get("max_len", 64)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_len: int = 64) -> "Tokenizer":
        """Load a ``vocab.json`` ({"word": id, ...})."""
        try:
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read vocabulary {path}: {e}. Re-export the bundle.") from e
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise BundleError(f"{path} is not a word->id JSON object. Re-export the bundle.")
        return cls(vocab, max_len=max_len)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=0)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, truncated to ``max_len`` (unknown words -> ``<unk>``)."""
        words = tokenize(text)
        if len(words) > self.max_len:
            log.warning("caption of %d words truncated to max_len=%d", len(words), self.max_len)
            words = words[: self.max_len]
        return [self.vocab.get(w, UNK_ID) for w in words]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each caption."""
        return [self.encode(t) for t in texts]

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary."""
        return [w for w in tokenize(text) if w not in self.vocab]

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pad a batch of captions.

        Returns:
            tokens: int64 ``[B, L]`` with ``L`` the longest caption (at least 1),
            mask: float32 ``[B, L]``, 1 for real words.
        """
        return pad_ids([self.encode(t) for t in texts])


def pad_ids(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> ``tokens [B, L]`` int64 (zero at padding, ``L`` the longest, at least 1) and
    ``mask [B, L]`` float32 (1 for real tokens)."""
    length = max([1] + [len(x) for x in ids])
    tokens = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.float32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
        mask[i, : len(x)] = 1.0
    return tokens, mask
