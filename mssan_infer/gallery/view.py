"""A snapshot of an in-memory gallery: what one search reads (stage-1 top-k, candidates' locals).

:class:`ArrayView` is the in-memory gallery's :class:`~mssan_infer.gallery.base.GalleryView`: the segments'
first rows as :class:`Block` s, the compressed stage-1 searcher and codec of that moment, and the
items' metadata, caption texts and source paths. Later adds write past those rows and removals replace
segments, so a view never changes while a search uses it.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Sequence, overload

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.base import Candidates, ItemId, ItemRecord, extent
from mssan_infer.gallery.filters import MetaIndex, Where, parse_where
from mssan_infer.gallery.products import RowProducts
from mssan_infer.gallery.stage1 import faiss_topk, topk_inner_product
from mssan_infer.gallery.storage import Layout, Stage1Codec, dequantize_into
from mssan_infer.parts import part_bounds, run_parts

__all__ = ["ArrayView", "Block", "Codes", "OVERFETCH", "fetch_rows"]

log = logging.getLogger(__name__)

# A compressed stage 1 fetches this many times the rows asked for (at least k + 32), then rescores them:
# OVERFETCH up to LARGE_GALLERY items, OVERFETCH_LARGE beyond, where the exact top k reaches further
# down the compressed order (docs/experiments/2026-12-07-overfetch.md).
OVERFETCH = 2
OVERFETCH_LARGE = 4
LARGE_GALLERY = 50_000
_MIN_ROWS_PER_PART = 16  # gathers smaller than this per thread are not split


@dataclass(frozen=True)
class Codes:
    """Compressed stage-1 codes: FAISS sub-indexes (rows numbered in order) and one searcher over them all."""

    shards: Any  # the searcher of stage1.code_searcher: groups of sub-indexes, a thread per group
    # what the searcher uses but FAISS does not own (the groups too): they live as long as this object
    keep: tuple[Any, ...]
    subs: tuple[Any, ...]  # the code sub-indexes alone, in row order (what an index saves)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shards.search(q, k)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Block:
    """``count`` rows of one segment, starting at gallery row ``start`` (a view's piece)."""

    start: int
    count: int
    stage1: np.ndarray  # [count, D2] float32
    local: np.ndarray  # [count, P, D] float32 | uint8 (int8 codes + 128)
    scale: np.ndarray | None  # [count, P] float32 (int8 locals)
    mask: np.ndarray  # [count, P] float32
    gram: np.ndarray  # [count, P, P]

    def dequantized(self, a: int, b: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 locals and Grams of block rows ``a:b`` trimmed to ``width`` (no copy when stored so)."""
        lo, gr = self.local[a:b, :width], self.gram[a:b, :width, :width]
        if self.scale is not None:
            out = np.empty(lo.shape, np.float32)
            dequantize_into(out, lo, self.scale[a:b, :width])
            lo = out
        return np.ascontiguousarray(lo, dtype=np.float32), np.ascontiguousarray(gr, dtype=np.float32)


def fetch_rows(n: int, k: int, overfetch: int | None = None) -> int:
    """Rows a compressed stage 1 of ``n`` items fetches by compressed score for a top ``k``:
    ``overfetch x k`` (``None``: :data:`OVERFETCH` up to :data:`LARGE_GALLERY` items,
    :data:`OVERFETCH_LARGE` beyond), at least ``k + 32``, at most ``n``."""
    if overfetch is None:
        overfetch = OVERFETCH if n <= LARGE_GALLERY else OVERFETCH_LARGE
    return min(int(n), max(int(k) * int(overfetch), int(k) + 32))


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is memory-mapped (a memmap, or a view of one)."""
    return isinstance(a, np.memmap) or isinstance(a.base, np.memmap)


@overload
def _plain(a: np.ndarray) -> np.ndarray: ...
@overload
def _plain(a: None) -> None: ...
def _plain(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` as a plain ndarray (a memory-mapped array: a view of the same mapped memory)."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


@dataclass(frozen=True)
class ArrayView:
    """A consistent read-only snapshot of an in-memory gallery (taken under its lock).

    Blocks are views of the first rows of the gallery's segments; later appends write past
    them and removals replace segments instead of editing them in place.
    """

    n: int
    ids: Sequence[ItemId]  # valid at positions < n
    blocks: tuple[Block, ...]
    layout: Layout
    faiss_index: Any = None  # FAISS IVF over the float32 stage 1 (stage1="faiss-ivf")
    codec: Stage1Codec | None = None  # compressed stage 1: its scales at the time of the snapshot
    searcher: Codes | None = None  # FAISS over the compressed codes
    outliers: np.ndarray | None = None  # rows scored exactly on every query (int8 stage 1)
    overfetch: int | None = None  # None: fetch_rows' default for the gallery's size
    certify: bool = False
    meta: Sequence[dict[str, Any] | None] = ()  # per-item metadata, valid at positions < n
    meta_index: MetaIndex | None = None  # ``meta`` indexed for filters (the gallery's, shared by its views)
    texts: Sequence[str | None] = ()  # per-item caption texts, valid at positions < n
    sources: Sequence[str | None] = ()  # per-item source paths, valid at positions < n

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemId]:
        return [self.ids[int(r)] for r in rows]

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemRecord]:
        """Ids, texts, sources and metadata (a copy; an empty one as ``None``) of ``rows``."""
        out = []
        n_meta, n_texts, n_sources = len(self.meta), len(self.texts), len(self.sources)
        for i in np.asarray(rows, np.int64).tolist():
            meta = self.meta[i] if i < n_meta else None
            out.append(
                ItemRecord(
                    self.ids[i],
                    self.texts[i] if i < n_texts else None,
                    self.sources[i] if i < n_sources else None,
                    copy.deepcopy(meta) if meta else None,
                )
            )
        return out

    # ---- whole arrays (saving, tests) --------------------------------------------------------
    @property
    def max_length(self) -> int:
        return max([0] + [b.local.shape[1] for b in self.blocks])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stage-1 vectors, locals, masks and Grams of every item as float32 (a copy; for tests and tools)."""
        p = self.max_length
        d = self.blocks[0].local.shape[2] if self.blocks else 0
        st = (
            np.concatenate([b.stage1 for b in self.blocks]).astype(np.float32)
            if self.blocks
            else np.zeros((0, 0))
        )
        lo = np.zeros((self.n, p, d), np.float32)
        ma = np.zeros((self.n, p), np.float32)
        gr = np.zeros((self.n, p, p), np.float32)
        for b in self.blocks:
            w = b.local.shape[1]
            lo[b.start : b.start + b.count, :w] = b.dequantized(0, b.count, w)[0]
            ma[b.start : b.start + b.count, :w] = b.mask
            gr[b.start : b.start + b.count, :w, :w] = b.gram
        return st, lo, ma, gr

    # ---- stage 1 --------------------------------------------------------------------------------
    def stage1_blocks(self) -> list[tuple[int, np.ndarray]]:
        return [(b.start, b.stage1) for b in self.blocks]

    def topk(self, queries: np.ndarray, k: int, where: Where | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 top-k rows for ``queries [Q, D2]`` -> ``(idx [Q,k'], scores [Q,k'])`` (float32 scores).

        With ``where``, only items whose metadata passes the filter are ranked, by an exact scan of
        their float32 rows (whatever the layout's or the FAISS stage 1).
        """
        conditions = parse_where(where)
        if conditions:
            index = self.meta_index if self.meta_index is not None else MetaIndex(self.meta)
            allowed = index.rows(conditions, self.n)
            q = np.ascontiguousarray(queries, dtype=np.float32)
            scores = (
                np.stack([self._rescore(q[i], allowed) for i in range(len(q))])
                if len(q)
                else np.zeros((0, len(allowed)), np.float32)
            )  # [Q, allowed]
            k = min(int(k), len(allowed))
            order = np.lexsort((np.broadcast_to(allowed, scores.shape), -scores), axis=1)[:, :k]
            return allowed[order], np.take_along_axis(scores, order, axis=1)
        if self.faiss_index is not None:
            return faiss_topk(self.faiss_index, queries, k, self.n)
        if self.codec is None or k >= self.n:
            return topk_inner_product(queries, self.stage1_blocks(), k)
        return self._compressed_topk(np.ascontiguousarray(queries, dtype=np.float32), k)

    def _rescore(self, q: np.ndarray, rows: np.ndarray, in_place: bool = False) -> np.ndarray:
        """float32 inner products of ``q [D2]`` with the stored float32 rows ``rows`` (sorted) ->
        ``[len(rows)]``. ``in_place`` (a few hundred rows of a compressed stage 1): the codec's kernel
        reads them where they are stored, on this thread; else numpy's BLAS on a copy of them."""
        out = np.empty(len(rows), np.float32)
        if not len(rows):
            return out
        # rows are sorted: each block's rows are one slice of them
        cut = np.searchsorted(rows, [b.start for b in self.blocks] + [self.n]).tolist()
        for bi, b in enumerate(self.blocks):
            a, e = cut[bi], cut[bi + 1]
            if a < e:
                ids = rows[a:e] - b.start if b.start else rows[a:e]
                if in_place and self.codec is not None:
                    out[a:e] = self.codec.inner_products(b.stage1, ids, q)
                else:
                    out[a:e] = np.take(b.stage1, ids, axis=0) @ q
        return out

    def _compressed_topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch by the compressed scores and rescore exactly (:meth:`_rescored`); with ``certify``,
        fetch 4x more until the error bound certifies the top k."""
        assert self.codec is not None and self.searcher is not None
        k = min(int(k), self.n)
        nq = len(q)
        out_i = np.zeros((nq, k), np.int64)
        out_s = np.zeros((nq, k), np.float32)
        qq, factor = self.codec.query(q)
        outliers = self.outliers if self.outliers is not None else np.zeros(0, np.int64)
        todo = np.arange(nq)
        fetch = fetch_rows(self.n, k, self.overfetch)
        # the error bound serves `certify` and the early stop past the first 2k rows: a fetch of at
        # most 2k rows without `certify` rescores every fetched row and needs neither
        bound = self.codec.bound(q) if self.certify or fetch > 2 * k else np.full(nq, np.inf)
        while len(todo):
            raw, idx = self.searcher.search(qq[todo], fetch)  # [Q', fetch] best first
            left = []
            for j, qi in enumerate(todo):
                rows, approx = idx[j], raw[j]
                if rows[-1] < 0:  # a short result ends in -1s
                    rows, approx = rows[rows >= 0], approx[rows >= 0]
                complete = fetch >= self.n or len(rows) < fetch
                out_i[qi], out_s[qi], certified = self._rescored(
                    q[qi], rows, approx * factor[qi], float(bound[qi]), k, outliers, complete
                )
                if self.certify and not certified:
                    left.append(qi)
            todo = np.asarray(left, np.int64)
            if len(todo):
                fetch = min(self.n, fetch * 4)
                log.debug("compressed stage 1: %d queries not certified, fetching %d", len(todo), fetch)
        return out_i, out_s

    def _rescored(
        self,
        q: np.ndarray,
        rows: np.ndarray,
        approx: np.ndarray,
        bound: float,
        k: int,
        outliers: np.ndarray,
        complete: bool,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """The best ``k`` of the fetched ``rows`` and the ``outliers`` by float32 score, ties by row.

        ``rows`` come best first by their approximate inner products ``approx``, each within ``bound`` of
        the float32 one (outliers excepted). The first ``2k`` are rescored; when the ``k``-th float32 score
        beats the next row's ``approx + bound``, no row left, fetched or not (``complete``: none is), can
        enter the top ``k``, so the result is the exact scan's. Else the rest of the fetched rows are
        rescored (in one more pass: a bound that fails at ``2k`` rarely holds a few rows later).
        Returns ``(rows [k], scores [k], certified)``.
        """
        m = len(rows)
        got_r: list[np.ndarray] = []
        got_s: list[np.ndarray] = []
        a, cut = 0, min(m, 2 * k)
        while True:
            chunk = rows[a:cut]
            if len(outliers):  # scored on every query, in the first chunk
                chunk = np.union1d(chunk, outliers) if a == 0 else np.setdiff1d(chunk, outliers)
            else:
                chunk = np.sort(chunk)  # file order
            got_r.append(chunk)
            got_s.append(self._rescore(q, chunk, in_place=True))
            r = np.concatenate(got_r) if len(got_r) > 1 else got_r[0]
            s = np.concatenate(got_s) if len(got_s) > 1 else got_s[0]
            order = np.lexsort((r, -s))[:k]
            full = len(order) == k
            if cut >= m:  # every fetched row rescored: no unfetched one beats the last fetched one's score
                certified = complete or (full and float(s[order[-1]]) >= float(approx[m - 1]) + bound)
                return r[order], s[order], certified
            if full and float(s[order[-1]]) > float(approx[cut]) + bound:
                return r[order], s[order], True
            a, cut = cut, m

    # ---- candidates ---------------------------------------------------------------------------
    def _locate(self, rows: np.ndarray) -> np.ndarray:
        starts = np.array([b.start for b in self.blocks], np.int64)
        return np.searchsorted(starts, rows, side="right") - 1

    def _read_order(self, rows: np.ndarray) -> list[int]:
        """Positions of ``rows`` in the order to read them: file order where locals are memory-mapped."""
        if any(_mapped(b.local) for b in self.blocks):
            return np.argsort(rows, kind="stable").tolist()  # type: ignore[no-any-return]
        return list(range(len(rows)))

    def gather(
        self,
        rows: np.ndarray,
        executor: Executor | None = None,
        parts: int = 1,
        *,
        query: np.ndarray | None = None,
    ) -> Candidates:
        """The rerank inputs of ``rows``, as the layout stores them, trimmed to their longest item.

        Args:
            rows: gallery rows, in the order wanted.
            executor, parts: copy in ``parts`` slices, ``parts - 1`` of them on ``executor``
                (the caller copies one); each slice is one take per block.
            query: a query's locals ``[Q, D]``: float32 locals then come as their similarities to it,
                ``local @ query^T [K, P, Q]``, one product per row where the row lies (split like the
                copies), the locals read once and never copied; the ``int8`` layout ignores it.
        Returns: :class:`Candidates`: float32 locals (or their similarities to ``query``) and Grams, or
        the ``int8`` layout's uint8 codes, scales and float16 Grams as stored. Without ``query``, a run of
        consecutive rows of one float32 block at its full width is returned without a copy (exhaustive
        search).

        Raises:
            InputError: a row outside the gallery.
        """
        rows = np.asarray(rows, dtype=np.int64)
        k = len(rows)
        if k and (int(rows.min()) < 0 or int(rows.max()) >= self.n):
            raise InputError(
                f"gallery rows must lie in 0..{self.n - 1}, got {int(rows.min())}..{int(rows.max())}"
            )
        which = self._locate(rows) if k else np.zeros(0, np.int64)
        int8 = self.layout.local == "int8"
        as_stored = query is None or int8
        if (
            as_stored
            and k
            and which[0] == which[-1]
            and rows[-1] - rows[0] == k - 1
            and (np.diff(rows) == 1).all()
        ):
            b = self.blocks[int(which[0])]
            a = int(rows[0]) - b.start
            mask = b.mask[a : a + k]
            width = max(1, extent(mask))
            mask = np.ascontiguousarray(mask[:, :width], dtype=np.float32)
            if int8:
                assert b.scale is not None
                return Candidates(
                    np.ascontiguousarray(b.local[a : a + k, :width]),
                    np.ascontiguousarray(b.scale[a : a + k, :width]),
                    mask,
                    np.ascontiguousarray(b.gram[a : a + k, :width, :width]),
                )
            local, gram = b.dequantized(a, a + k, width)
            return Candidates(local, None, mask, gram)
        d = self.blocks[0].local.shape[2] if self.blocks else 1
        pad = self.max_length
        # one run of rows per block, each copied with a take: rows grouped by block are taken straight into
        # place, in the order asked (a rerank asks in row order: memory-mapped rows then come in file
        # order); others are taken in row order into buffers, then put in place. A copy per row ran Python
        # per row, which a rerank's shares then took in turns (docs/experiments/2026-12-07-gather-takes.md)
        order = None if bool((which[1:] >= which[:-1]).all()) else np.argsort(rows, kind="stable")
        at = rows if order is None else rows[order]
        cuts = np.searchsorted(which if order is None else which[order], np.arange(len(self.blocks) + 1))
        runs = [
            (self.blocks[bi], i, j)
            for bi, (i, j) in enumerate(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
            if i < j
        ]
        mask_full = np.zeros((k, max(1, pad)), np.float32)
        for b, i, j in runs:
            got = b.mask.take(at[i:j] - b.start, axis=0)
            if order is None:
                mask_full[i:j, : b.mask.shape[1]] = got
            else:
                mask_full[order[i:j], : b.mask.shape[1]] = got
        width = max(1, extent(mask_full))
        if query is not None and not int8:
            return self._similarities(rows, which, mask_full[:, :width], query, executor, parts)
        local = np.empty((k, width, d), np.uint8 if int8 else np.float32)
        scale = np.empty((k, width), np.float32) if int8 else None
        gram = np.empty((k, width, width), np.float16 if int8 else np.float32)
        code0 = 128 if int8 else 0  # the code of 0

        def copy(a: int, b: int) -> None:  # a few C calls per block run of the slice, without the GIL
            dst_l = local[a:b] if order is None else np.empty_like(local[a:b])
            dst_g = gram[a:b] if order is None else np.empty_like(gram[a:b])
            dst_s = None if scale is None else scale[a:b] if order is None else np.empty_like(scale[a:b])
            for blk, i, j in runs:
                i, j = max(i, a), min(j, b)
                if i >= j:
                    continue
                r = at[i:j] - blk.start
                i, j = i - a, j - a
                b_local, b_gram, b_scale = _plain(blk.local), _plain(blk.gram), _plain(blk.scale)
                w = min(width, b_local.shape[1])
                same_dtypes = (b_local.dtype, b_gram.dtype) == (local.dtype, gram.dtype)
                if same_dtypes and w == b_local.shape[1] == width:  # straight into place
                    b_local.take(r, axis=0, out=dst_l[i:j], mode="clip")  # rows are in range
                    b_gram.take(r, axis=0, out=dst_g[i:j], mode="clip")
                    if dst_s is not None and b_scale is not None:
                        b_scale.take(r, axis=0, out=dst_s[i:j], mode="clip")
                    continue
                dst_l[i:j, :w] = b_local.take(r, axis=0, mode="clip")[:, :w]
                dst_l[i:j, w:] = code0
                dst_g[i:j] = 0
                dst_g[i:j, :w, :w] = b_gram.take(r, axis=0, mode="clip")[:, :w, :w]
                if dst_s is not None and b_scale is not None:
                    dst_s[i:j, :w] = b_scale.take(r, axis=0, mode="clip")[:, :w]
                    dst_s[i:j, w:] = 0
            if order is not None:  # to the places asked for
                to = order[a:b]
                local[to] = dst_l
                gram[to] = dst_g
                if scale is not None and dst_s is not None:
                    scale[to] = dst_s

        run_parts(copy, part_bounds(k, parts if executor is not None else 1, _MIN_ROWS_PER_PART), executor)
        return Candidates(local, scale, np.ascontiguousarray(mask_full[:, :width]), gram)

    def _similarities(
        self,
        rows: np.ndarray,
        which: np.ndarray,
        mask: np.ndarray,
        query: np.ndarray,
        executor: Executor | None,
        parts: int,
    ) -> Candidates:
        """:meth:`gather` of float32 rows with ``query``: one ``[P, D] x [D, Q]`` product per row, read
        where it lies (RAM or mapped; mapped locals in file order), and the rows' Grams."""
        k, width = mask.shape
        q_t = np.ascontiguousarray(np.asarray(query, np.float32).T)  # [D, Q]
        narrow = any(b.local.shape[1] < width for b in self.blocks)
        alloc = np.zeros if narrow else np.empty  # positions past a narrower block's width stay 0
        sim = alloc((k, width, q_t.shape[1]), np.float32)
        gram = alloc((k, width, width), np.float32)
        for bi in np.unique(which).tolist():  # Grams: one take per block
            blk = self.blocks[bi]
            w = min(width, blk.gram.shape[1])
            sel = slice(None) if len(self.blocks) == 1 else np.flatnonzero(which == bi)
            got = np.take(_plain(blk.gram), rows[sel] - blk.start, axis=0, mode="clip")
            gram[sel, :w, :w] = got[:, :w, :w]
        order_l = self._read_order(rows)
        rows_l, which_l = rows.tolist(), which.tolist()
        blocks = [(b.start, _plain(b.local)) for b in self.blocks]
        products = RowProducts.get()

        def fill(a: int, b: int) -> None:  # the part's rows, MLAS's GEMM on this thread (gallery.products)
            src, dst = [], []
            for pos in order_l[a:b]:
                start, b_local = blocks[which_l[pos]]
                w = min(width, b_local.shape[1])
                src.append(b_local[rows_l[pos] - start, :w])
                dst.append(sim[pos, :w])
            products.run(src, q_t, dst)

        run_parts(fill, part_bounds(k, parts if executor is not None else 1, _MIN_ROWS_PER_PART), executor)
        return Candidates(None, None, np.ascontiguousarray(mask), gram, sim)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the snapshot's arrays, split by whether they are memory-mapped (``mapped``) or in RAM."""
        out = {"ram": 0, "mapped": 0}
        for b in self.blocks:
            for a in (b.stage1, b.local, b.scale, b.mask, b.gram):
                if a is None:
                    continue
                out["mapped" if _mapped(a) else "ram"] += int(a.nbytes)
        if self.codec is not None:
            out["ram"] += int(self.n * self.codec.dim * self.codec.code_dtype.itemsize)
        return out
