"""Work over ``0:k`` cut into equal parts, one per thread: the searching thread takes the first part,
helper threads of an executor the rest (candidate gathers, rerank shares, one query's stage-1 scan).

Parts that call numpy's BLAS run inside :func:`blas_one_thread` (one query's float32 scan does): OpenBLAS
otherwise gives a product of a part more threads of its own, and the parts' products then queue for its
one thread pool, more runnable threads than cores (docs/experiments/2026-12-07-blas-in-parts.md). Gathers
and rerank shares call no BLAS (takes, ONNX Runtime), so :func:`run_parts` leaves its count alone. The
OpenBLAS of numpy 1.26's wheels ignores a count set from another thread than the main one once the main
thread has set one: searches from other threads may then keep its threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future, wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["part_bounds", "run_parts", "blas_one_thread"]

_BLAS_LOCK = threading.Lock()
_blas_libs: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS libraries, found once
_blas_users = 0  # blocks inside blas_one_thread now (any thread)
_blas_before: list[int] = []  # each library's thread count before the first of them


def _libs() -> list[Any]:
    global _blas_libs
    if _blas_libs is None:
        try:  # a runtime dependency; a Triton server's Python given only the copied runtime may lack it
            from threadpoolctl import ThreadpoolController

            found = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # no threadpoolctl, or it cannot read a library: numpy's BLAS keeps its threads
            _blas_libs = []
            return _blas_libs
        # an OpenMP-threaded BLAS keeps a count per calling thread (FAISS's own OpenBLAS): left alone
        _blas_libs = [lib for lib in found if getattr(lib, "threading_layer", "") != "openmp"]
    return _blas_libs


@contextmanager
def blas_one_thread() -> Iterator[None]:
    """numpy's BLAS (each BLAS library loaded in the process whose thread count is process-wide, as the
    pthreads OpenBLAS of numpy's wheels) runs each call on one thread inside the block, for every thread
    of the process; the counts they had come back when the last block open at once (any thread) ends."""
    global _blas_users, _blas_before
    with _BLAS_LOCK:
        if _blas_users == 0:
            libs = _libs()
            _blas_before = [lib.get_num_threads() for lib in libs]
            for lib, n in zip(libs, _blas_before):
                if n != 1:
                    lib.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, n in zip(_libs(), _blas_before):
                    if n != 1:
                        lib.set_num_threads(n)


def _after_fork_in_child() -> None:
    """A child forked while a block was open on another thread (which the child does not have): give
    the BLAS its counts back and start with no block open."""
    global _blas_users, _BLAS_LOCK
    _BLAS_LOCK = threading.Lock()
    if _blas_users:
        _blas_users = 0
        for lib, n in zip(_blas_libs or [], _blas_before):
            if n != 1:
                lib.set_num_threads(n)


os.register_at_fork(after_in_child=_after_fork_in_child)


def part_bounds(k: int, parts: int, least: int = 1) -> list[int]:
    """Bounds of ``0:k`` cut into at most ``parts`` equal parts of at least ``least`` each (one part:
    ``[0, k]``)."""
    n = max(1, min(int(parts), k // max(1, int(least))))
    return [k * i // n for i in range(n + 1)]


def run_parts(work: Callable[[int, int], None], bounds: list[int], executor: Executor | None) -> None:
    """``work(a, b)`` for each part of ``bounds`` (:func:`part_bounds`): the first on this thread, the others
    on ``executor`` (on this thread too without one). Returns once every part has ended; then raises the
    first part's error, if any. Parts that call numpy's BLAS: inside :func:`blas_one_thread`."""
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
