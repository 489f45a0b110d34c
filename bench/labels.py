"""Words for the bench's plots: what a result key measures, in the terms a reader uses.

The results keep their keys (``t2i_5000``, ``torch_eager``, ``shard_128x128``); the plots show
words instead ("text→image, 5K images", "PyTorch eager score", "128 images × 128 captions").
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = [
    "DIRECTIONS",
    "CANDIDATES",
    "count",
    "gallery_label",
    "scorer_shape_label",
    "candidate_label",
    "looks_like_a_key",
]

DIRECTIONS = {"t2i": "text→image", "i2t": "image→text"}
CANDIDATES = {
    "onnxruntime": "ONNX Runtime scorer",
    "torch_eager": "PyTorch eager score",
    "scan_loop": "SCAN-style per-caption loop",
}


def count(n: int | float) -> str:
    """``5000`` -> ``"5K"``, ``25000`` -> ``"25K"``, ``1500`` -> ``"1.5K"``, ``200`` -> ``"200"``."""
    n = float(n)
    for div, suffix in ((1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.1f}{suffix}"
    return f"{n:.0f}"


def gallery_label(key: str, row: Mapping[str, Any] | None = None) -> str:
    """A latency row's key in words: ``t2i_5000`` -> ``"text→image, 5K images"``, ``i2t_5000`` ->
    ``"image→text, 25K captions (5K images)"``, ``t2i_100000_mmap`` -> ``"text→image, 100K images
    (memory-mapped)"``. ``row`` (the result row) gives the caption count where it has one."""
    parts = key.split("_")
    direction = DIRECTIONS.get(parts[0], parts[0])
    if len(parts) < 2 or not parts[1].isdigit():
        return key.replace("_", " ")
    n = int(parts[1])
    mmap = " (memory-mapped)" if "mmap" in parts[2:] else ""
    if parts[0] == "i2t":
        items = int((row or {}).get("n_items") or 5 * n)
        return f"{direction}, {count(items)} captions ({count(n)} images){mmap}"
    return f"{direction}, {count(n)} images{mmap}"


def scorer_shape_label(name: str, shape: Mapping[str, Any] | None = None) -> str:
    """A scorer shape's key in words: ``t2i_1x100`` -> ``"1 caption × 100 images"``, ``i2t_1x100`` ->
    ``"1 image × 100 captions"``, ``shard_128x128`` -> ``"128 images × 128 captions"``."""
    m = re.fullmatch(r"(t2i|i2t|shard)_(\d+)x(\d+)", name)
    if shape is not None and {"ni", "nt"} <= set(shape):
        ni, nt = int(shape["ni"]), int(shape["nt"])
    elif m:
        a, b = int(m.group(2)), int(m.group(3))
        ni, nt = (b, a) if m.group(1) == "t2i" else (a, b)
    else:
        return name.replace("_", " ")

    def noun(k: int, word: str) -> str:
        return f"{k} {word}{'' if k == 1 else 's'}"

    if m and m.group(1) == "t2i":
        return f"{noun(nt, 'caption')} × {noun(ni, 'image')}"
    return f"{noun(ni, 'image')} × {noun(nt, 'caption')}"


def candidate_label(name: str) -> str:
    """``onnxruntime`` -> ``"ONNX Runtime scorer"``; an unknown name with its underscores as spaces."""
    return CANDIDATES.get(name, name.replace("_", " "))


def looks_like_a_key(text: str) -> bool:
    """Whether ``text`` reads like a raw result key (``t2i_5000``, ``torch_eager``): an identifier with
    underscores, or a bare direction code."""
    return bool(re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", text)) or bool(re.search(r"\b(t2i|i2t)\b", text))
