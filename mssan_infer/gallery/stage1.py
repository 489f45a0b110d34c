"""Stage 1: maximum-inner-product top-k over stage-1 vectors (exact, or FAISS IVF), and the FAISS
searcher of the int8 layouts' compressed codes.

The stage-1 methods are ``numpy`` (exact) and ``faiss-ivf`` (approximate); ``faiss`` (IndexFlatIP)
and ``faiss-hnsw`` were removed: they won on no axis (docs/experiments/2026-12-06-stage1-scan.md).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from mssan_infer.deps import optional_import
from mssan_infer.errors import InputError
from mssan_infer.files import CHUNK_BYTES
from mssan_infer.parts import blas_one_thread, part_bounds, run_parts

__all__ = [
    "STAGE1_METHODS",
    "topk_inner_product",
    "merge_topk",
    "best_columns",
    "import_faiss",
    "build_faiss",
    "faiss_topk",
    "default_ivf_nlist",
    "check_method",
    "code_searcher",
    "scan_threads",
    "scan_parts",
    "MIN_SCAN_BYTES",
]

log = logging.getLogger(__name__)

STAGE1_METHODS = ("numpy", "faiss-ivf")
# a compressed scan gets a second thread only for this many bytes of codes per thread: below it,
# dispatching the thread and merging its results costs more than it saves (docs/experiments/
# 2026-12-06-stage1-scan.md)
MIN_SCAN_BYTES = 4 << 20


def check_method(method: str) -> str:
    """``method`` if it is a stage-1 method (``faiss-ivf`` needs faiss installed).

    Raises:
        InputError: unknown method. BackendUnavailableError: ``faiss-ivf`` without faiss.
    """
    if method not in STAGE1_METHODS:
        raise InputError(f"stage1 must be one of {STAGE1_METHODS}, got {method!r}")
    if method != "numpy":
        import_faiss()
    return method


def default_ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` items when ``nlist`` is not given: 4 sqrt(n), at least 39 items per list."""
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


def merge_topk(idx: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` columns of candidate rows ``idx [Q, M]`` with ``scores [Q, M]``: by decreasing score,
    ties by row."""
    order = np.lexsort((idx, -scores), axis=1)[:, :k]  # lexsort sorts by the last key first
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(scores, order, axis=1)


def best_columns(s: np.ndarray, k: int) -> np.ndarray:
    """Columns of the ``min(k, n)`` largest scores of each row of ``s [Q, n]`` (unordered), ties at the
    k-th score broken by increasing column (``argpartition`` alone picks any of the tied ones)."""
    n = s.shape[1]
    k = min(int(k), n)
    if k >= n:
        return np.broadcast_to(np.arange(n), (s.shape[0], n))
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(s, part, axis=1)
    kth = kept.min(axis=1, keepdims=True)
    ties = (s == kth).sum(axis=1) > (kept == kth).sum(axis=1)  # a tied column left out
    for qi in np.flatnonzero(ties):
        part[qi] = np.argsort(-s[qi], kind="stable")[:k]
    return part


def topk_inner_product(
    queries: np.ndarray,
    base: np.ndarray | Sequence[tuple[int, np.ndarray]],
    k: int,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k.

    Args:
        queries: ``[Q, D]`` float32.
        base: ``[N, D]`` (may be a memmap; read in chunks of rows), or blocks ``(first row, [n_b, D])``
            that together hold rows ``0..N-1``.
        k: results per query; clipped to ``N``.
    Returns:
        ``(idx [Q, k'] int64, scores [Q, k'] float32)`` sorted by decreasing score,
        ties by increasing index; ``k' = min(k, N)``.

    One query over float32 rows is a matrix-vector product in numpy's BLAS over slices of rows, a
    thread per core, each product on its own thread (:func:`_scan_one`); batches of queries and rows
    that are not float32 and contiguous, numpy's BLAS in chunks.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    blocks = [(0, base)] if isinstance(base, np.ndarray) else list(base)
    n = sum(int(b.shape[0]) for _, b in blocks)
    k = min(int(k), n)
    nq = q.shape[0]
    if k <= 0 or nq == 0:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
    if nq == 1 and all(_scannable(b, q.shape[1]) for _, b in blocks):
        scores = np.empty((1, n), np.float32)
        _scan_one(q[0], blocks, scores[0])
        part = best_columns(scores, k)
        idx, best = merge_topk(part.astype(np.int64), np.take_along_axis(scores, part, axis=1), k)
        return idx, best.astype(np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    best_s = np.zeros((nq, 0), np.float32)
    for start, arr in blocks:
        rows = max(k, chunk_bytes // (4 * (max(1, nq) + arr.shape[1])), 1)  # base rows per block
        for a in range(0, int(arr.shape[0]), rows):
            block = np.asarray(arr[a : a + rows], dtype=np.float32)
            s = q @ block.T  # [Q, n_block]
            part = best_columns(s, k)
            cand_i = np.concatenate([best_i, part + (start + a)], axis=1)
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            best_i, best_s = merge_topk(cand_i, cand_s, k)
    return best_i.astype(np.int64), best_s.astype(np.float32)


def import_faiss(needed_for: str = "stage-1 search with FAISS", instead: str = "stage1='numpy'") -> Any:
    """The ``faiss`` module, or a :class:`BackendUnavailableError` naming the package (``faiss-cpu``).

    FAISS's loader logs each SIMD build it tries at INFO ("Could not load library with AVX512
    support..."); those lines are quieted to warnings, so an application logging at INFO does not show
    them as if something failed."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return optional_import("faiss", "faiss-cpu", needed_for, instead)


def build_faiss(method: str, stage1: np.ndarray, options: Mapping[str, int]) -> Any:
    """A FAISS index of ``method`` (``"faiss-ivf"``: IndexIVFFlat) over ``stage1 [N, 2D]``.

    Raises:
        InputError: another method.
    """
    if method != "faiss-ivf":
        raise InputError(f"a FAISS stage 1 is 'faiss-ivf', got {method!r}")
    faiss = import_faiss()
    x = np.ascontiguousarray(stage1, dtype=np.float32)
    d, n = x.shape[1], x.shape[0]
    nlist = int(options.get("nlist", default_ivf_nlist(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.nprobe = int(options.get("nprobe", min(nlist, 16)))  # FAISS keeps `quantizer` referenced
    index.add(x)
    log.debug("built FAISS %s over %d items", method, n)
    return index


def faiss_topk(index: Any, queries: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from a FAISS index; columns that some query could not fill are dropped."""
    k = min(int(k), n)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, idx = index.search(q, k)
    if (idx < 0).any():  # IVF may return fewer than k: keep the columns every row filled
        width = int((idx >= 0).sum(1).min())
        idx, scores = idx[:, :width], scores[:, :width]
    return idx.astype(np.int64), scores.astype(np.float32)


def scan_threads() -> int:
    """Threads a compressed stage-1 scan may use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def scan_parts(nbytes: int, threads: int | None = None, min_bytes: int = MIN_SCAN_BYTES) -> int:
    """Threads (and sub-index groups) for a scan of ``nbytes`` of codes: at most ``threads`` (default
    :func:`scan_threads`), at least ``min_bytes`` each, at least one."""
    most = int(threads) if threads is not None else scan_threads()
    return max(1, min(most, int(nbytes) // max(1, int(min_bytes))))


def code_searcher(
    faiss: Any, dim: int, subs: Sequence[Any], threads: int | None = None, min_bytes: int = MIN_SCAN_BYTES
) -> tuple[Any, tuple[Any, ...]]:
    """One FAISS searcher over the code sub-indexes ``subs`` (rows numbered in order across them).

    A FAISS index scans one query on one thread, so the sub-indexes are put, in order, into
    :func:`scan_parts` groups of about equal rows (at most ``threads``, at least ``min_bytes`` of codes
    each); each group is searched on a
    thread of its own (``IndexShards``), its sub-indexes one after the other. One thread per sub-index
    would run more threads than cores once a gallery passes a few sub-indexes.

    Returns ``(searcher, keep)``: ``searcher.search(q, k)`` gives FAISS's ``(scores, rows)``; ``keep`` holds
    the FAISS objects the searcher uses but does not own (keep it as long as the searcher).
    """
    subs = list(subs)
    if len(subs) <= 1:
        return (subs[0] if subs else faiss.IndexShards(dim, False, True)), tuple(subs)
    sizes = np.array([int(s.ntotal) for s in subs], np.int64)
    total = int(sizes.sum())
    nbytes = sum(int(s.ntotal) * int(s.sa_code_size()) for s in subs)
    groups = min(len(subs), scan_parts(nbytes, threads, min_bytes))
    # sub-index i joins the group its middle row falls in when the rows are cut into equal shares
    middle = np.cumsum(sizes) - sizes / 2.0
    which = np.minimum((middle * groups / max(1, total)).astype(np.int64), groups - 1)
    members = [[s for s, w in zip(subs, which) if w == g] for g in range(groups)]
    members = [m for m in members if m]
    if len(members) == 1:
        inner = faiss.IndexShards(dim, False, True)
        for s in members[0]:
            inner.add_shard(s)
        return inner, tuple(subs)
    outer = faiss.IndexShards(dim, True, True)  # one thread per group
    inners = []
    for m in members:
        if len(m) == 1:
            outer.add_shard(m[0])
            continue
        inner = faiss.IndexShards(dim, False, True)  # its sub-indexes in turn, on the group's thread
        for s in m:
            inner.add_shard(s)
        outer.add_shard(inner)
        inners.append(inner)
    return outer, (*subs, *inners)


# ---- one query's exact scan on one thread per core ----------------------------------------------------
# numpy's BLAS left to itself scans one query on its own threads and leaves them spinning afterwards on
# the cores the rest of the query needs (docs/experiments/2026-12-07-rerank-shares.md); inside run_parts
# each slice's matrix-vector product runs on the slice's thread alone (parts.blas_one_thread), and
# OpenBLAS's sgemv reads the rows faster than FAISS's fvec_inner_products_ny did on AVX2
# (docs/experiments/2026-12-08-exact-scan-and-products.md).
_POOL: dict[int, ThreadPoolExecutor] = {}  # process id -> the scan's helper threads
_POOL_LOCK = threading.Lock()


def _scannable(block: np.ndarray, dim: int) -> bool:
    return (
        block.ndim == 2 and block.shape[1] == dim and block.dtype == np.float32 and block.flags.c_contiguous
    )


def _scan_pool() -> ThreadPoolExecutor:
    """The scan's helper threads, one per core past the first (made once per process: a forked child
    makes its own)."""
    with _POOL_LOCK:
        pool = _POOL.get(os.getpid())
        if pool is None:
            pool = _POOL[os.getpid()] = ThreadPoolExecutor(
                max(1, scan_threads() - 1), thread_name_prefix="mssan-scan"
            )
        return pool


def _scan_one(q: np.ndarray, blocks: Sequence[tuple[int, np.ndarray]], out: np.ndarray) -> None:
    """``out[start + i] = block[i] . q`` for every block row: numpy's ``block @ q`` (BLAS ``sgemv``) over
    :func:`scan_parts` slices of rows (``MIN_SCAN_BYTES`` or more each), a thread each, this one included."""
    nbytes = sum(int(b.nbytes) for _, b in blocks)
    parts = scan_parts(nbytes, min_bytes=MIN_SCAN_BYTES)
    total = sum(int(b.shape[0]) for _, b in blocks)

    def scan(lo: int, hi: int) -> None:  # gallery rows lo:hi, across blocks
        for start, b in blocks:
            a, e = max(lo, start), min(hi, start + int(b.shape[0]))
            if a < e:
                np.dot(b[a - start : e - start], q, out=out[a:e])

    with blas_one_thread():  # one slice too: OpenBLAS would thread it and leave its threads spinning
        run_parts(scan, part_bounds(total, parts), _scan_pool() if parts > 1 else None)
