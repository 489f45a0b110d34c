"""The one batched loop of the runtime (encoders, CLI chunks), with a progress bar when asked for."""

from __future__ import annotations

import sys
from typing import Any, Iterator

__all__ = ["progress_bar", "batches"]


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr counting ``total`` items, or ``None`` when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr)


def batches(n: int, size: int, desc: str, progress: bool = False) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of at most ``size`` of ``n`` items; with ``progress``, a bar
    named ``desc`` advances as each batch is done (when the loop body returns)."""
    bar = progress_bar(n, desc, progress)
    try:
        for a in range(0, n, size):
            b = min(n, a + size)
            yield a, b
            if bar is not None:
                bar.update(b - a)
    finally:
        if bar is not None:
            bar.close()
