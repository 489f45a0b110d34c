"""Work over ``0:k`` cut into equal parts, one per thread: the searching thread takes the first part,
helper threads of an executor the rest (candidate gathers, rerank shares, one query's stage-1 scan)."""

from __future__ import annotations

from concurrent.futures import Executor, Future, wait
from typing import Callable

__all__ = ["part_bounds", "run_parts"]


def part_bounds(k: int, parts: int, least: int = 1) -> list[int]:
    """Bounds of ``0:k`` cut into at most ``parts`` equal parts of at least ``least`` each (one part:
    ``[0, k]``)."""
    n = max(1, min(int(parts), k // max(1, int(least))))
    return [k * i // n for i in range(n + 1)]


def run_parts(work: Callable[[int, int], None], bounds: list[int], executor: Executor | None) -> None:
    """``work(a, b)`` for each part of ``bounds`` (:func:`part_bounds`): the first on this thread, the others
    on ``executor`` (on this thread too without one). Returns once every part has ended; then raises the
    first part's error, if any."""
    if executor is None or len(bounds) <= 2:
        for a, b in zip(bounds[:-1], bounds[1:]):
            work(a, b)
        return
    helpers: list[Future[None]] = []
    try:
        for a, b in zip(bounds[1:-1], bounds[2:]):
            helpers.append(executor.submit(work, a, b))
        work(bounds[0], bounds[1])
    finally:
        wait(helpers)  # no part still writing once this returns or raises
    for f in helpers:
        f.result()
