"""The in-memory gallery: encoded items of one modality in numpy arrays (optionally memory-mapped).

Items are stored in *segments*: blocks of rows allocated once at a fixed capacity and filled
in order, never moved or copied. Adding items writes into the last segment or opens a new
one, so a gallery never holds more than one copy of its items plus the batch being added
(unfilled capacity is allocated lazily by the OS and is not resident). A search takes a
snapshot (:class:`ArrayView`): the segments and how many rows of each it sees; later adds
write only past those rows, and removals replace the segments they touch.

Items of different lengths (regions ``R`` or words ``L``) are padded with a mask, per segment
to the longest item it holds. How a gallery stores stage-1 vectors and locals is its
:class:`~.quant.Layout` (float32 by default; float16 and int8 options, see :mod:`.quant`).
Stage 1 is an exact inner-product top-k in numpy by default, FAISS (flat, IVF or HNSW) on
request, or a compressed scan rescored exactly (compressed stage-1 layouts).
Saving to and loading from folders is :mod:`mssan_infer.core.store`'s job.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .contract import ItemId, check_id, extent
from .errors import InputError
from .quant import Layout, Stage1Codec, dequantize_into, parse_layout, store_locals
from .stage1 import build_faiss, check_method, faiss_topk, merge_topk, topk_inner_product

__all__ = ["GalleryIndex", "ArrayView", "Block", "DTYPES", "ARRAYS", "SEGMENT_ROWS", "CODE_ROWS"]

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")              # float locals (``dtype=``); int8 locals come with a layout
ARRAYS = ("stage1", "local", "mask", "gram")
SEGMENT_ROWS = 4096        # rows of a new segment (more when one batch is larger)
CODE_ROWS = 8192           # compressed stage-1 codes per FAISS sub-index (searched on threads of their own)
OVERFETCH = 4              # compressed stage 1 fetches this many times the rows asked for, then rescores
_MIN_ROWS_PER_PART = 16    # gathers smaller than this per thread are not split


class _Segment:
    """Rows ``< n`` of preallocated arrays; rows past ``n`` are written by later adds only."""

    __slots__ = ("stage1", "local", "scale", "mask", "gram", "codes", "n")

    def __init__(self, stage1: np.ndarray, local: np.ndarray, scale: np.ndarray | None, mask: np.ndarray,
                 gram: np.ndarray, n: int = 0, codes: list[Any] | None = None) -> None:
        self.stage1, self.local, self.scale, self.mask, self.gram = stage1, local, scale, mask, gram
        self.codes: list[Any] = list(codes or [])     # FAISS sub-indexes over rows < n (compressed stage 1)
        self.n = n

    @property
    def cap(self) -> int:
        return int(self.stage1.shape[0])

    @property
    def pad(self) -> int:
        return int(self.local.shape[1])


@dataclass(frozen=True)
class Codes:
    """Compressed stage-1 codes: FAISS sub-indexes (rows numbered in order) and one searcher over them all."""

    shards: Any                 # faiss.IndexShards, searching the sub-indexes on threads of their own
    subs: tuple[Any, ...]       # FAISS does not own them: they live as long as this object

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shards.search(q, k)     # type: ignore[no-any-return]


@dataclass(frozen=True)
class Block:
    """``count`` rows of one segment, starting at gallery row ``start`` (a view's piece)."""

    start: int
    count: int
    stage1: np.ndarray          # [count, D2] float32
    local: np.ndarray           # [count, P, D] float32 | float16 | int8
    scale: np.ndarray | None    # [count, P] float32 (int8 locals)
    mask: np.ndarray            # [count, P] float32
    gram: np.ndarray            # [count, P, P]

    def dequantized(self, a: int, b: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 locals and Grams of block rows ``a:b`` trimmed to ``width`` (no copy when stored so)."""
        lo, gr = self.local[a:b, :width], self.gram[a:b, :width, :width]
        if self.scale is not None:
            out = np.empty(lo.shape, np.float32)
            dequantize_into(out, lo, self.scale[a:b, :width])
            lo = out
        return np.ascontiguousarray(lo, dtype=np.float32), np.ascontiguousarray(gr, dtype=np.float32)


@dataclass(frozen=True)
class ArrayView:
    """A consistent read-only snapshot of an in-memory gallery (taken under its lock).

    Blocks are views of the first rows of the gallery's segments; later appends write past
    them and removals replace segments instead of editing them in place.
    """

    n: int
    ids: Sequence[ItemId]                   # valid at positions < n
    blocks: tuple[Block, ...]
    layout: Layout
    faiss_index: Any = None                 # FAISS over the float32 stage 1 (stage1="faiss*")
    codec: Stage1Codec | None = None        # compressed stage 1: its scales at the time of the snapshot
    searcher: Codes | None = None           # FAISS over the compressed codes
    outliers: np.ndarray | None = None      # rows scored exactly on every query (int8 stage 1)
    overfetch: int = OVERFETCH
    certify: bool = False

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemId]:
        return [self.ids[int(r)] for r in rows]

    # ---- whole arrays (saving, tests) --------------------------------------------------------
    @property
    def max_length(self) -> int:
        return max([0] + [b.local.shape[1] for b in self.blocks])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stage-1 vectors, locals, masks and Grams of every item as float32 (a copy; for tests and tools)."""
        p = self.max_length
        d = self.blocks[0].local.shape[2] if self.blocks else 0
        st = np.concatenate([b.stage1 for b in self.blocks]).astype(np.float32) if self.blocks else np.zeros((0, 0))
        lo = np.zeros((self.n, p, d), np.float32)
        ma = np.zeros((self.n, p), np.float32)
        gr = np.zeros((self.n, p, p), np.float32)
        for b in self.blocks:
            w = b.local.shape[1]
            lo[b.start:b.start + b.count, :w] = b.dequantized(0, b.count, w)[0]
            ma[b.start:b.start + b.count, :w] = b.mask
            gr[b.start:b.start + b.count, :w, :w] = b.gram
        return st, lo, ma, gr

    # ---- stage 1 --------------------------------------------------------------------------------
    def stage1_blocks(self) -> list[tuple[int, np.ndarray]]:
        return [(b.start, b.stage1) for b in self.blocks]

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 top-k rows for ``queries [Q, D2]`` -> ``(idx [Q,k'], scores [Q,k'])`` (float32 scores)."""
        if self.faiss_index is not None:
            return faiss_topk(self.faiss_index, queries, k, self.n)
        if self.codec is None or k >= self.n:
            return topk_inner_product(queries, self.stage1_blocks(), k)
        return self._compressed_topk(np.ascontiguousarray(queries, dtype=np.float32), k)

    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 inner products of ``q [D2]`` with the stored float32 rows ``rows`` (sorted) -> ``[len(rows)]``."""
        out = np.empty(len(rows), np.float32)
        starts = np.array([b.start for b in self.blocks])
        which = np.searchsorted(starts, rows, side="right") - 1
        for bi in np.unique(which):
            sel = np.flatnonzero(which == bi)
            b = self.blocks[int(bi)]
            out[sel] = np.take(b.stage1, rows[sel] - b.start, axis=0) @ q
        return out

    def _compressed_topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch by the compressed scores, rescore exactly, widen until the error bound certifies the top k."""
        assert self.codec is not None and self.searcher is not None
        k = min(int(k), self.n)
        nq = len(q)
        out_i = np.zeros((nq, k), np.int64)
        out_s = np.zeros((nq, k), np.float32)
        bound = self.codec.bound(q)
        qq, factor = self.codec.query(q)
        outliers = self.outliers if self.outliers is not None else np.zeros(0, np.int64)
        todo = np.arange(nq)
        fetch = min(self.n, max(k * self.overfetch, k + 32))
        while len(todo):
            raw, idx = self.searcher.search(qq[todo], fetch)               # [Q', fetch] best first
            left = []
            for j, qi in enumerate(todo):
                found = idx[j] >= 0
                rows = np.union1d(idx[j][found], outliers)
                exact = self._rescore(q[qi], rows)
                order = np.lexsort((rows, -exact))[:k]
                out_i[qi], out_s[qi] = rows[order], exact[order]
                complete = fetch >= self.n or int(found.sum()) < fetch
                # no unfetched item can beat the k-th: its compressed score is at most the last fetched one's
                if self.certify and not complete and float(exact[order[-1]]) < float(raw[j, -1]) * factor[qi] + bound[qi]:
                    left.append(qi)
            todo = np.asarray(left, np.int64)
            if len(todo):
                fetch = min(self.n, fetch * 4)
                log.debug("compressed stage 1: %d queries not certified, fetching %d", len(todo), fetch)
        return out_i, out_s

    # ---- candidates ---------------------------------------------------------------------------
    def _locate(self, rows: np.ndarray) -> np.ndarray:
        starts = np.array([b.start for b in self.blocks], np.int64)
        return np.searchsorted(starts, rows, side="right") - 1

    def gather(
        self, rows: np.ndarray, executor: Executor | None = None, parts: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Locals, masks and Grams of ``rows``, float32, trimmed to their longest item.

        Args:
            rows: gallery rows, in the order wanted.
            executor, parts: copy in ``parts`` slices, ``parts - 1`` of them on ``executor``
                (the caller copies one). One thread's copy is bound by its memory reads; two
                threads fetch twice as many rows at once. Memory-mapped rows are read in file order.
        Returns: ``local [K,P',D]``, ``mask [K,P']``, ``gram [K,P',P']``. A run of consecutive rows
        of one float32 block at its full width is returned without a copy (exhaustive search).
        """
        rows = np.asarray(rows, dtype=np.int64)
        k = len(rows)
        which = self._locate(rows) if k else np.zeros(0, np.int64)
        if k and which[0] == which[-1] and rows[-1] - rows[0] == k - 1 and (np.diff(rows) == 1).all():
            b = self.blocks[int(which[0])]
            a = int(rows[0]) - b.start
            mask = b.mask[a:a + k]
            width = max(1, extent(mask))
            local, gram = b.dequantized(a, a + k, width)
            return local, np.ascontiguousarray(mask[:, :width], dtype=np.float32), gram
        d = self.blocks[0].local.shape[2] if self.blocks else 1
        pad = self.max_length
        mask_full = np.zeros((k, max(1, pad)), np.float32)
        for bi in np.unique(which):
            sel = np.flatnonzero(which == bi)
            b = self.blocks[int(bi)]
            mask_full[sel, : b.mask.shape[1]] = np.take(b.mask, rows[sel] - b.start, axis=0)
        width = max(1, extent(mask_full))
        local = np.empty((k, width, d), np.float32)
        gram = np.empty((k, width, width), np.float32)
        single = len(self.blocks) == 1 and k > 0
        b0 = self.blocks[0] if single else None
        in_ram = b0 is not None and not any(isinstance(a, np.memmap) or isinstance(a.base, np.memmap)
                                            for a in (b0.local, b0.gram))
        if in_ram:
            assert b0 is not None
            src_local, src_gram, src_scale = b0.local, b0.gram, b0.scale
            whole = b0.local.shape[1] == width and src_local.dtype == np.float32 and src_gram.dtype == np.float32

            def copy(a: int, b: int) -> None:             # a few C calls per slice, without the GIL
                r = rows[a:b]
                if whole:
                    np.take(src_local, r, axis=0, out=local[a:b], mode="clip")   # rows are in range
                    np.take(src_gram, r, axis=0, out=gram[a:b], mode="clip")
                    return
                lo = np.take(src_local, r, axis=0, mode="clip")[:, :width]      # int8/float16: 2-4x fewer bytes
                if src_scale is not None:
                    sc = np.take(src_scale, r, axis=0, mode="clip")[:, :width]
                    dequantize_into(local[a:b], lo, sc)
                else:
                    np.copyto(local[a:b], lo)
                np.copyto(gram[a:b], np.take(src_gram, r, axis=0, mode="clip")[:, :width, :width])
        else:
            rows_l = rows.tolist()
            which_l = which.tolist()
            mapped = any(isinstance(b.local, np.memmap) or isinstance(b.local.base, np.memmap) for b in self.blocks)
            order_l = np.argsort(rows, kind="stable").tolist() if mapped else list(range(k))
            blocks = self.blocks

            def copy(a: int, b: int) -> None:
                for pos in order_l[a:b]:
                    blk = blocks[which_l[pos]]
                    r = rows_l[pos] - blk.start
                    w = min(width, blk.local.shape[1])
                    if w < width:
                        local[pos, w:] = 0
                        gram[pos] = 0
                    if blk.scale is not None:
                        dequantize_into(local[pos, :w], blk.local[r, :w], blk.scale[r, :w])
                    else:
                        local[pos, :w] = blk.local[r, :w]       # casts float16 storage
                    gram[pos, :w, :w] = blk.gram[r, :w, :w]

        parts = max(1, min(int(parts), k // _MIN_ROWS_PER_PART)) if executor is not None else 1
        if parts == 1 or executor is None:
            copy(0, k)
        else:
            bounds = np.linspace(0, k, parts + 1).astype(int).tolist()
            futures = [executor.submit(copy, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
            copy(bounds[0], bounds[1])
            for f in futures:
                f.result()
        return local, np.ascontiguousarray(mask_full[:, :width]), gram

    def nbytes(self) -> dict[str, int]:
        """Bytes of the snapshot's arrays, split by whether they are memory-mapped (``mapped``) or in RAM."""
        out = {"ram": 0, "mapped": 0}
        for b in self.blocks:
            for a in (b.stage1, b.local, b.scale, b.mask, b.gram):
                if a is None:
                    continue
                mapped = isinstance(a, np.memmap) or isinstance(a.base, np.memmap)
                out["mapped" if mapped else "ram"] += int(a.nbytes)
        if self.codec is not None:
            out["ram"] += int(self.n * self.codec.dim * self.codec.code_dtype.itemsize)
        return out


class GalleryIndex:
    """The encoded items of one modality, in numpy arrays (the default :class:`~.contract.Gallery`).

    Args:
        stage1_dim: ``2D``.
        local_dim: ``D``.
        dtype: storage of float locals and Grams, ``"float32"`` (default) or ``"float16"``
            (kept for compatibility; ``layout`` says the same and more).
        layout: a name of :data:`~.quant.LAYOUTS` (``"fp32"``, ``"fp16"``, ``"int8-stage1"``,
            ``"int8"``) or a :class:`~.quant.Layout`; ``dtype`` overrides its locals when given.
        mmap: keep stage-1 vectors, locals, masks and Grams in memory-mapped files
            (in ``spill_dir``) instead of RAM. A compressed stage 1 always keeps its float32
            rows memory-mapped (they are read for candidates only).
        spill_dir: folder for the memory-mapped files (default: a fresh temp folder,
            removed with the index).
        stage1: ``"numpy"`` (exact, default), ``"faiss"`` (IndexFlatIP, exact),
            ``"faiss-ivf"`` or ``"faiss-hnsw"`` (approximate); float32 stage-1 layouts only.
        faiss_options: ``nlist``/``nprobe`` (IVF), ``M``/``ef_search`` (HNSW).
        segment_rows: rows of a new storage segment.
        overfetch: a compressed stage 1 fetches ``overfetch x k`` rows (at least ``k + 32``) by their
            compressed scores, then rescores them exactly and keeps the best ``k``.
        certify: a compressed stage 1 also proves, with a bound on the compression error
            (:meth:`~.quant.Stage1Codec.bound`), that no unfetched item beats the ``k``-th, fetching
            4x more until it does: exactly the float32 top k, at a cost that grows when many
            scores lie within the bound of the ``k``-th (README "Gallery layouts").

    Raises:
        InputError: bad dims, dtype, layout or stage-1 method.
        BackendUnavailableError: a FAISS method or compressed stage 1 without faiss installed.
    """

    def __init__(
        self,
        stage1_dim: int,
        local_dim: int,
        *,
        dtype: str | None = None,
        layout: str | Layout | None = None,
        mmap: bool = False,
        spill_dir: str | os.PathLike[str] | None = None,
        stage1: str = "numpy",
        faiss_options: Mapping[str, int] | None = None,
        segment_rows: int = SEGMENT_ROWS,
        overfetch: int = OVERFETCH,
        certify: bool = False,
    ) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise InputError(f"index dtype must be one of {DTYPES}, got {dtype!r}")
        self.layout = parse_layout(layout, dtype)
        check_method(stage1)
        if stage1 != "numpy" and self.layout.compressed_stage1:
            raise InputError(f"stage1={stage1!r} searches float32 stage-1 vectors; layout {self.layout.name!r} "
                             "scans its own compressed codes (use stage1='numpy' with it)")
        if int(stage1_dim) < 1 or int(local_dim) < 1:
            raise InputError(f"dims must be positive, got stage1_dim={stage1_dim}, local_dim={local_dim}")
        if not isinstance(overfetch, int) or isinstance(overfetch, bool) or overfetch < 1:
            raise InputError(f"overfetch must be a positive int, got {overfetch!r}")
        if not isinstance(segment_rows, int) or isinstance(segment_rows, bool) or segment_rows < 1:
            raise InputError(f"segment_rows must be a positive int, got {segment_rows!r}")
        self.stage1_dim = int(stage1_dim)
        self.local_dim = int(local_dim)
        self.dtype = np.dtype(self.layout.local)
        self.mmap = bool(mmap)
        self.stage1_method = stage1
        self.faiss_options = dict(faiss_options or {})
        self.segment_rows = segment_rows
        self.overfetch = overfetch
        if not isinstance(certify, bool):
            raise InputError(f"certify must be True or False, got {certify!r}")
        self.certify = certify
        self._lock = threading.RLock()
        self._spill: Path | None = Path(spill_dir) if spill_dir is not None else None
        self._n = 0
        self._segs: list[_Segment] = []
        self._ids: list[ItemId] = []
        self._pos: dict[ItemId, int] = {}
        self._codec: Stage1Codec | None = (
            Stage1Codec(self.layout.stage1, self.stage1_dim) if self.layout.compressed_stage1 else None)
        self._outliers = np.zeros(0, np.int64)
        self._faiss: Any = None
        self._faiss_n = -1
        self._searcher: Any = None

    # ---- storage -----------------------------------------------------------
    def _spill_dir(self) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="mssan-index-"))
            weakref.finalize(self, shutil.rmtree, str(self._spill), True)
        self._spill.mkdir(parents=True, exist_ok=True)
        return self._spill

    def _alloc(self, name: str, shape: tuple[int, ...], dtype: Any, mapped: bool) -> np.ndarray:
        if not mapped or 0 in shape:
            # not zeroed: a row becomes resident when an add writes it (and zeroes its padding); np.zeros
            # would touch every page once glibc serves blocks this size from its heap
            return np.empty(shape, dtype)
        path = self._spill_dir() / f"{name}.{uuid.uuid4().hex[:12]}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
        try:
            path.unlink()        # open maps keep the data alive (POSIX); elsewhere the file stays until exit
        except OSError:
            pass
        return arr

    def _new_segment(self, cap: int, pad: int) -> _Segment:
        lay = self.layout
        return _Segment(
            self._alloc("stage1", (cap, self.stage1_dim), np.float32, self.mmap or lay.compressed_stage1),
            self._alloc("local", (cap, pad, self.local_dim), lay.local, self.mmap),
            self._alloc("scale", (cap, pad), np.float32, self.mmap) if lay.local == "int8" else None,
            self._alloc("mask", (cap, pad), np.float32, self.mmap),
            self._alloc("gram", (cap, pad, pad), lay.gram, self.mmap),
        )

    def _append_codes(self, seg: _Segment, a: int, codes: np.ndarray, rows_per_sub: int = CODE_ROWS) -> None:
        """Add compressed stage-1 ``codes`` of segment rows ``a..`` (the last sub-index is cloned, never changed)."""
        assert self._codec is not None
        faiss = self._codec.faiss
        subs = list(seg.codes)
        pos = 0
        while pos < len(codes):
            if subs and subs[-1].ntotal < rows_per_sub:
                last = faiss.clone_index(subs[-1])        # views may be searching the old one
                subs[-1] = last
            else:
                last = self._codec.new_index()
                subs.append(last)
            take = min(len(codes) - pos, rows_per_sub - last.ntotal)
            self._codec.add_codes(last, codes[pos:pos + take])
            pos += take
        seg.codes = subs

    # ---- properties --------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> list[ItemId]:
        """A copy of the ids, in insertion order."""
        with self._lock:
            return list(self._ids[: self._n])

    @property
    def max_length(self) -> int:
        """Padded length ``P`` of the stored items (the widest segment)."""
        return max([0] + [s.pad for s in self._segs if s.n])

    def __contains__(self, item_id: object) -> bool:
        try:
            return item_id in self._pos
        except TypeError:
            return False

    def position(self, item_id: ItemId) -> int:
        """Row of ``item_id``. Raises InputError when unknown."""
        try:
            return self._pos[item_id]
        except (KeyError, TypeError):
            raise InputError(f"unknown id {item_id!r}") from None

    def meta(self) -> dict[str, Any]:
        """JSON metadata describing the stored arrays."""
        return {
            "n": self._n,
            "stage1_dim": self.stage1_dim,
            "local_dim": self.local_dim,
            "max_length": self.max_length,
            "dtype": self.dtype.name,
            "layout": self.layout.record(),
        }

    # ---- mutation ----------------------------------------------------------
    def next_ids(self, count: int) -> list[int]:
        """``count`` fresh integer ids (one more than the largest int id so far, counting up)."""
        ints = [i for i in self._ids if isinstance(i, int)]
        start = max(ints) + 1 if ints else 0
        return list(range(start, start + count))

    def add(
        self,
        stage1: np.ndarray,
        local: np.ndarray,
        mask: np.ndarray,
        gram: np.ndarray,
        ids: Sequence[ItemId] | None = None,
    ) -> list[ItemId]:
        """Append encoded items.

        Args:
            stage1: ``[N, 2D]``; local ``[N, P, D]``; mask ``[N, P]``; gram ``[N, P, P]``.
            ids: ``N`` unique str/int ids not yet in the gallery (default: fresh ints).
        Returns:
            The ids added.
        Raises:
            InputError: shape mismatch, non-finite values, bad or duplicate ids.
        """
        stage1 = np.asarray(stage1, dtype=np.float32)
        local = np.asarray(local)
        mask = np.asarray(mask, dtype=np.float32)
        gram = np.asarray(gram)
        n = stage1.shape[0] if stage1.ndim == 2 else -1
        if (
            stage1.ndim != 2 or stage1.shape[1] != self.stage1_dim
            or local.ndim != 3 or local.shape[0] != n or local.shape[2] != self.local_dim
            or mask.shape != local.shape[:2]
            or gram.shape != (n, local.shape[1], local.shape[1])
        ):
            raise InputError(
                f"encoded items must be stage1 [N,{self.stage1_dim}], local [N,P,{self.local_dim}], mask [N,P], "
                f"gram [N,P,P]; got {stage1.shape}, {local.shape}, {mask.shape}, {gram.shape}"
            )
        # refused before anything is quantized: int8 codes of NaN/inf would be silently wrong
        if not (np.isfinite(stage1).all() and np.isfinite(local).all() and np.isfinite(gram).all()):
            raise InputError("encoded items contain NaN or inf; check the input features")
        width = extent(mask)
        local, mask, gram = local[:, :width], mask[:, :width], gram[:, :width, :width]
        local = local.astype(np.float32, copy=False)
        lo_store, scale, gr_store = store_locals(self.layout.local, local, gram.astype(np.float32, copy=False))
        with self._lock:
            new_ids = self.next_ids(n) if ids is None else self._new_ids(ids, n)
            if n == 0:
                return []
            codes = outl = None
            if self._codec is not None:
                codes, outl = self._codec.encode(stage1)
            done = 0
            while done < n:
                seg = self._segs[-1] if self._segs else None
                if seg is None or seg.n >= seg.cap or seg.pad < width:
                    # small galleries grow in segments no larger than themselves (at least 64 rows)
                    cap = max(min(self.segment_rows, max(64, self._n + done)), n - done)
                    pad = max(width, seg.pad if seg is not None else 0)
                    seg = self._new_segment(cap, pad)
                    self._segs.append(seg)
                take = min(n - done, seg.cap - seg.n)
                a, b = seg.n, seg.n + take
                src = slice(done, done + take)
                seg.stage1[a:b] = stage1[src]
                seg.local[a:b, :width] = lo_store[src]
                seg.local[a:b, width:] = 0                           # padding (storage is not pre-zeroed)
                if seg.scale is not None and scale is not None:
                    seg.scale[a:b, :width] = scale[src]
                    seg.scale[a:b, width:] = 0
                seg.mask[a:b, :width] = mask[src]
                seg.mask[a:b, width:] = 0
                seg.gram[a:b, :width, :width] = gr_store[src]
                seg.gram[a:b, width:] = 0
                seg.gram[a:b, :width, width:] = 0
                if codes is not None:
                    self._append_codes(seg, a, codes[src])
                seg.n = b
                done += take
            if outl is not None and outl.any():
                self._outliers = np.concatenate([self._outliers, self._n + np.flatnonzero(outl)])
            for j, i in enumerate(new_ids):
                self._pos[i] = self._n + j
            self._ids.extend(new_ids)
            self._n += n
            self._faiss = None
            self._searcher = None
            if self._codec is not None and self._codec.storage == "int8" and len(self._outliers) > max(256, self._n // 16):
                self._requantize()
            return list(new_ids)

    def _requantize(self) -> None:
        """Refit the int8 stage-1 scales on every item and re-encode the codes (new sub-indexes; views keep theirs)."""
        assert self._codec is not None
        codec = copy.copy(self._codec)
        codec.fit(np.concatenate([s.stage1[: s.n] for s in self._segs]) if self._segs else np.zeros((0, self.stage1_dim)))
        outliers = []
        start = 0
        for seg in self._segs:
            subs: list[Any] = []
            for a in range(0, seg.n, CODE_ROWS):
                b = min(seg.n, a + CODE_ROWS)
                codes, outl = codec.encode(np.asarray(seg.stage1[a:b]))
                idx = codec.new_index()
                codec.add_codes(idx, codes)
                subs.append(idx)
                outliers.append(start + a + np.flatnonzero(outl))
            seg.codes = subs
            start += seg.n
        self._codec = codec
        self._outliers = np.concatenate(outliers) if outliers else np.zeros(0, np.int64)
        log.info("requantized the int8 stage-1 codes of %d items (%d outliers)", self._n, len(self._outliers))

    def _new_ids(self, ids: Sequence[ItemId], n: int) -> list[ItemId]:
        """Checked ids for ``n`` new items (under the lock). Raises InputError."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise InputError(f"ids must be a sequence of str/int, got {type(ids).__name__}")
        new_ids = [check_id(i) for i in ids]
        if len(new_ids) != n:
            raise InputError(f"got {len(new_ids)} ids for {n} items")
        if len(set(new_ids)) != n:
            seen: set[ItemId] = set()
            dup = [i for i in new_ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
            raise InputError(f"duplicate ids in this batch: {dup[:5]}")
        clash = [i for i in new_ids if i in self._pos]
        if clash:
            raise InputError(f"ids already in the gallery: {clash[:5]}; remove them first or use other ids")
        return new_ids

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id; all-or-nothing. Only the segments holding them are rewritten.

        Raises:
            InputError: an id is not in the gallery.
        """
        with self._lock:
            drop = [check_id(i) for i in ids]
            unknown = [i for i in drop if i not in self._pos]
            if unknown:
                raise InputError(f"unknown ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; nothing was removed")
            rows = np.unique(np.array([self._pos[i] for i in drop], np.int64))
            if not len(rows):
                return
            segs: list[_Segment] = []
            start = 0
            for seg in self._segs:
                mine = rows[(rows >= start) & (rows < start + seg.n)] - start
                if not len(mine):
                    segs.append(seg)                       # untouched: shared with views as it is
                elif len(mine) < seg.n:
                    segs.append(self._compacted(seg, np.setdiff1d(np.arange(seg.n), mine)))   # readers keep the old
                start += seg.n
            self._segs = segs
            keep = np.setdiff1d(np.arange(self._n), rows)
            self._ids = [self._ids[r] for r in keep]
            self._pos = {i: j for j, i in enumerate(self._ids)}
            if len(self._outliers):
                kept = self._outliers[~np.isin(self._outliers, rows)]
                self._outliers = kept - np.searchsorted(rows, kept)
            self._n = len(keep)
            self._faiss = None
            self._searcher = None

    def _compacted(self, seg: _Segment, keep: np.ndarray) -> _Segment:
        """A new segment with the rows ``keep`` of ``seg`` (same storage; codes copied, not re-encoded)."""
        new = self._new_segment(len(keep), seg.pad)
        for name in ("stage1", "local", "scale", "mask", "gram"):
            src = getattr(seg, name)
            if src is not None:
                getattr(new, name)[:] = np.take(src, keep, axis=0)
        new.n = len(keep)
        if self._codec is not None:
            codes = np.concatenate([self._codec.codes_of(ix) for ix in seg.codes])[keep]
            self._append_codes(new, 0, codes)
        return new

    def adopt(self, arrays: Sequence[np.ndarray | None], ids: list[ItemId], *,
              codes: np.ndarray | None = None, codec: Stage1Codec | None = None,
              outliers: np.ndarray | None = None) -> None:
        """Take stored arrays as the content of this empty gallery, kept as they are (e.g. read-only memory maps).

        ``arrays`` are ``stage1, local, mask, gram`` and, for int8 locals, ``scale``, already checked and stored
        as this gallery's layout stores them; with a compressed stage 1, ``codes`` and ``codec`` too. Later adds
        go to new segments: the adopted arrays are never copied.
        """
        st, lo, ma, gr = arrays[0], arrays[1], arrays[2], arrays[3]
        sc = arrays[4] if len(arrays) > 4 else None
        assert st is not None and lo is not None and ma is not None and gr is not None
        n = int(st.shape[0])
        with self._lock:
            if self._n:
                raise InputError("adopt() needs an empty gallery")
            self._segs = []
            if n:
                seg = _Segment(st, lo, sc, ma, gr, n)
                if self._codec is not None:
                    assert codes is not None and codec is not None
                    self._codec = codec
                    # at least two sub-indexes, so the scan runs on two threads (FAISS scans one index on one)
                    parts = max(2, -(-n // CODE_ROWS))
                    self._append_codes(seg, 0, codes, rows_per_sub=max(1, -(-n // parts)))
                    self._outliers = np.asarray(outliers if outliers is not None else np.zeros(0), np.int64)
                self._segs.append(seg)
            self._n = n
            self._ids = list(ids)
            self._pos = {i: j for j, i in enumerate(self._ids)}
            self._faiss = None
            self._searcher = None

    @property
    def codec(self) -> Stage1Codec | None:
        """The compressed stage-1 codec (scales), ``None`` for a float32 stage 1."""
        return self._codec

    @property
    def outliers(self) -> np.ndarray:
        return self._outliers.copy()

    # ---- search ------------------------------------------------------------
    def view(self) -> ArrayView:
        """A consistent snapshot for searching without holding the lock."""
        with self._lock:
            n = self._n
            blocks = []
            start = 0
            for s in self._segs:
                if s.n:
                    c = s.n
                    blocks.append(Block(start, c, s.stage1[:c], s.local[:c], None if s.scale is None else s.scale[:c],
                                        s.mask[:c], s.gram[:c]))
                    start += c
            faiss_index = None
            if self.stage1_method != "numpy" and n > 0:
                if self._faiss is None or self._faiss_n != n:
                    st = np.concatenate([b.stage1 for b in blocks])
                    self._faiss = build_faiss(self.stage1_method, st, self.faiss_options)
                    self._faiss_n = n
                faiss_index = self._faiss
            searcher = None
            if self._codec is not None and n > 0:
                if self._searcher is None:
                    self._searcher = self._shards()
                searcher = self._searcher
            return ArrayView(n, self._ids, tuple(blocks), self.layout, faiss_index,
                             copy.copy(self._codec) if self._codec is not None else None, searcher,
                             self._outliers, self.overfetch, self.certify)

    def _shards(self) -> Any:
        """FAISS IndexShards over every codes sub-index (rows numbered in order; searched on threads)."""
        assert self._codec is not None
        faiss = self._codec.faiss
        subs = [ix for s in self._segs for ix in s.codes]
        shards = faiss.IndexShards(self.stage1_dim, len(subs) > 1, True)
        for ix in subs:
            shards.add_shard(ix)
        return Codes(shards, tuple(subs))
