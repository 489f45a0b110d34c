"""Checks of what callers pass in (features, captions, ids, search options), shared by every front end.

Each function returns the checked, converted value or raises :class:`InputError` saying
what was wrong and what to do. The ``Retriever``, the CLI and the Triton ``retriever``
model all use these, so the same bad input gets the same message everywhere.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.base import ItemId, check_id
from mssan_infer.text.base import TextTokenizer

__all__ = ["region_batch", "caption_list", "token_ids", "id_list", "check_k", "positive_int"]

log = logging.getLogger(__name__)


def _real_numbers(arr: np.ndarray, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} must be real numbers, got dtype {arr.dtype}")


def region_batch(feats: Any, mask: Any, dv: int) -> tuple[np.ndarray, np.ndarray]:
    """Image region features -> ``(regions [N, R, Dv] float32, mask [N, R] float32)``.

    Args:
        feats: an ``[N, R, Dv]`` array, or a list of ``[R_i, Dv]`` arrays (padded here).
        mask: ``[N, R]`` 1/0 (only with an array; default all ones).
        dv: the model's region feature size.
    Raises:
        InputError: wrong ndim or feature size, non-numeric dtype, an empty batch, a mask that is
            not 0/1, an image without regions, NaN or inf (also after the cast to float32).
    """
    if isinstance(feats, np.ndarray) or (not isinstance(feats, (list, tuple)) and hasattr(feats, "shape")):
        arr = np.asarray(feats)
        if arr.ndim != 3 or arr.shape[2] != dv:
            raise InputError(
                f"image features must be [N, R, {dv}] (or a list of [R_i, {dv}] arrays); got shape "
                f"{arr.shape}"
            )
        _real_numbers(arr, "image features")
        with np.errstate(over="ignore"):  # values beyond float32 become inf: refused below
            regions = np.asarray(arr, dtype=np.float32)
        if mask is None:
            m = np.ones(regions.shape[:2], np.float32)
        else:
            m = np.asarray(mask, dtype=np.float32)
            if m.shape != regions.shape[:2]:
                raise InputError(f"mask must be [N, R] = {regions.shape[:2]}, got {m.shape}")
    else:
        if mask is not None:
            raise InputError(
                "mask is only accepted with an [N, R, Dv] array; a list of [R_i, Dv] makes its own"
            )
        try:
            items = [np.asarray(x) for x in feats]
        except TypeError:
            raise InputError(
                f"image features must be an [N, R, {dv}] array or a list of [R_i, {dv}] arrays, "
                f"got {type(feats).__name__}"
            ) from None
        for i, x in enumerate(items):
            if x.ndim != 2 or x.shape[1] != dv:
                raise InputError(f"image {i}: region features must be [R_i, {dv}], got shape {x.shape}")
            _real_numbers(x, f"image {i}: features")
        r = max([1] + [x.shape[0] for x in items])
        regions = np.zeros((len(items), r, dv), np.float32)
        m = np.zeros((len(items), r), np.float32)
        with np.errstate(over="ignore"):
            for i, x in enumerate(items):
                regions[i, : x.shape[0]] = x
                m[i, : x.shape[0]] = 1.0
    if regions.shape[0] == 0:
        raise InputError(
            f"no images given (an empty batch); pass at least one image of [R, {dv}] region features"
        )
    if not np.isin(m, (0.0, 1.0)).all():
        raise InputError("mask must hold only 1 (real region) and 0 (padding); got other values or NaN")
    real = m > 0
    empty = np.flatnonzero(~real.any(1))
    if empty.size:
        raise InputError(
            f"images {empty[:5].tolist()} have no regions (mask all zero); every image needs >= 1"
        )
    if not np.isfinite(regions[real]).all():
        raise InputError("image features contain NaN or inf")
    return regions, m


def caption_list(texts: Any) -> list[str]:
    """One caption or a sequence of captions as a non-empty list.

    Raises:
        InputError: bytes, a non-sequence, or an empty batch.
    """
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError("captions must be str, got bytes; decode them as UTF-8 first")
    try:
        out = list(texts)
    except TypeError:
        raise InputError(f"captions must be a str or a sequence of str, got {type(texts).__name__}") from None
    if not out:
        raise InputError("no captions given (an empty batch); pass at least one caption")
    return out


def token_ids(tokenizer: TextTokenizer, texts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each caption.

    Raises:
        InputError: a caption that is not a str, is empty, or has only unknown words.
    """
    ids: list[list[int]] = []
    unseen: Counter[str] = Counter()
    with_unseen = 0
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = "; decode bytes as UTF-8 first" if isinstance(t, (bytes, bytearray)) else ""
            raise InputError(f"caption {i} must be str, got {type(t).__name__}{hint}")
        x = tokenizer.encode(t)
        if not x:
            raise InputError(f"caption {i} {t[:60]!r} has no words; captions need at least one word")
        unk = tokenizer.unk_id
        if all(tok == unk for tok in x):
            raise InputError(
                f"caption {i} {t[:60]!r}: none of its words is in the model's vocabulary "
                f"({len(tokenizer)} tokens); rephrase it"
            )
        if unk is not None and unk in x:
            with_unseen += 1
            unseen.update(tokenizer.unknown_words(t))
        ids.append(x)
    if unseen:
        words = ", ".join(f"{w!r}" + (f" x{c}" if c > 1 else "") for w, c in unseen.most_common(20))
        more = f" and {len(unseen) - 20} more" if len(unseen) > 20 else ""
        where = (
            f"the caption {texts[0][:60]!r}" if len(texts) == 1 else f"{with_unseen} of {len(texts)} captions"
        )
        log.warning(
            "words not in the model's vocabulary (%d words) are all read as the one <unk> token in %s: %s%s",
            len(tokenizer),
            where,
            words,
            more,
        )
    return ids


def id_list(ids: Any) -> list[ItemId]:
    """``ids`` as a list of checked str/int ids.

    Raises:
        InputError: a single string, a non-sequence, or an id that is not str/int.
    """
    if isinstance(ids, (str, bytes)):
        raise InputError("ids must be a sequence of str/int, not a single string; wrap it in a list")
    try:
        return [check_id(i) for i in ids]
    except TypeError:
        raise InputError(f"ids must be a sequence of str/int, got {type(ids).__name__}") from None


def positive_int(name: str, v: Any) -> int:
    """``v`` as an int >= 1. Raises InputError otherwise (``bool`` included)."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def check_k(k: Any, rerank: Any) -> tuple[int, int]:
    """Search options: ``k >= 1`` and ``rerank >= 0`` ints. Raises InputError otherwise."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise InputError(f"k must be a positive int, got {k!r}")
    if not isinstance(rerank, (int, np.integer)) or isinstance(rerank, bool) or rerank < 0:
        raise InputError(f"rerank must be an int >= 0 (0 = stage 1 only), got {rerank!r}")
    return int(k), int(rerank)
