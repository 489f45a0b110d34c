"""The in-memory gallery: encoded items of one modality in numpy arrays (optionally memory-mapped).

Items are stored in *segments*: blocks of rows allocated once at a fixed capacity and filled
in order, never moved or copied. Adding items writes into the last segment or opens a new
one, so a gallery never holds more than one copy of its items plus the batch being added
(unfilled capacity is allocated lazily by the OS and is not resident). A search takes a
snapshot (:class:`ArrayView`): the segments and how many rows of each it sees; later adds
write only past those rows, and removals replace the segments they touch.

Items of different lengths (regions ``R`` or words ``L``) are padded with a mask, per segment
to the longest item it holds. How a gallery stores stage-1 vectors and locals is its
:class:`~.storage.Layout` (float32 by default; int8 options, see :mod:`.storage`).
Stage 1 is an exact inner-product top-k in numpy by default, FAISS IVF on request (approximate),
or an int8 scan rescored exactly (compressed stage-1 layouts).
Saving to and loading from folders is :mod:`mssan_infer.gallery.folder`'s job.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.base import ItemId, check_encoded, check_id, check_labels
from mssan_infer.gallery.base import new_ids as new_ids_checked
from mssan_infer.gallery.filters import MetaIndex, check_metadata
from mssan_infer.gallery.stage1 import build_faiss, check_method, code_searcher, scan_parts
from mssan_infer.gallery.storage import Stage1Codec, local_dtype, store_locals
from mssan_infer.gallery.view import ArrayView, Block, Codes
from mssan_infer.options import GalleryOptions

__all__ = ["MemoryGallery", "ARRAYS", "SEGMENT_ROWS", "CODE_ROWS"]

log = logging.getLogger(__name__)

ARRAYS = ("stage1", "local", "mask", "gram")
SEGMENT_ROWS = 4096  # rows of a new segment (more when one batch is larger)
CODE_ROWS = 8192  # compressed stage-1 codes per FAISS sub-index (searched on threads of their own)


class _Segment:
    """Rows ``< n`` of preallocated arrays; rows past ``n`` are written by later adds only."""

    __slots__ = ("stage1", "local", "scale", "mask", "gram", "codes", "n")

    def __init__(
        self,
        stage1: np.ndarray,
        local: np.ndarray,
        scale: np.ndarray | None,
        mask: np.ndarray,
        gram: np.ndarray,
        n: int = 0,
        codes: list[Any] | None = None,
    ) -> None:
        self.stage1, self.local, self.scale, self.mask, self.gram = stage1, local, scale, mask, gram
        self.codes: list[Any] = list(codes or [])  # FAISS sub-indexes over rows < n (compressed stage 1)
        self.n = n

    @property
    def cap(self) -> int:
        return int(self.stage1.shape[0])

    @property
    def pad(self) -> int:
        return int(self.local.shape[1])


class MemoryGallery:
    """The encoded items of one modality, in numpy arrays (the default
    :class:`~mssan_infer.gallery.base.Gallery`).

    Args:
        stage1_dim: ``2D``.
        local_dim: ``D``.
        options: :class:`~mssan_infer.options.GalleryOptions` (layout, memory mapping, stage-1 method).
        segment_rows: rows of a new storage segment.

    Raises:
        InputError: bad dims or options.
        BackendUnavailableError: the FAISS IVF method or a compressed stage 1 without faiss installed.
    """

    def __init__(
        self,
        stage1_dim: int,
        local_dim: int,
        options: GalleryOptions | None = None,
        *,
        segment_rows: int = SEGMENT_ROWS,
    ) -> None:
        opts = options if options is not None else GalleryOptions()
        if not isinstance(opts, GalleryOptions):
            raise InputError(f"options must be a GalleryOptions, got {type(opts).__name__}")
        self.options = opts
        self.layout = opts.resolved_layout()
        check_method(opts.stage1.method)
        if int(stage1_dim) < 1 or int(local_dim) < 1:
            raise InputError(f"dims must be positive, got stage1_dim={stage1_dim}, local_dim={local_dim}")
        if not isinstance(segment_rows, int) or isinstance(segment_rows, bool) or segment_rows < 1:
            raise InputError(f"segment_rows must be a positive int, got {segment_rows!r}")
        self.stage1_dim = int(stage1_dim)
        self.local_dim = int(local_dim)
        self.dtype = np.dtype(self.layout.local)
        self.mmap = opts.mmap
        self.stage1_method = opts.stage1.method
        self.faiss_options = opts.stage1.faiss
        self.segment_rows = segment_rows
        self.overfetch = opts.stage1.overfetch
        self.certify = opts.stage1.certify
        self._lock = threading.RLock()
        self._spill: Path | None = Path(opts.spill_dir) if opts.spill_dir is not None else None
        self._n = 0
        self._segs: list[_Segment] = []
        self._ids: list[ItemId] = []
        self._meta: list[dict[str, Any] | None] = []  # per-item metadata (None: none given)
        self._meta_index = MetaIndex(self._meta)  # a new one whenever _meta is replaced
        self._text: list[str | None] = []  # per-item caption text (None: none)
        self._source: list[str | None] = []  # per-item source path (None: none)
        self._pos: dict[ItemId, int] = {}
        self._codec: Stage1Codec | None = (
            Stage1Codec(self.layout.stage1, self.stage1_dim) if self.layout.compressed_stage1 else None
        )
        self._outliers = np.zeros(0, np.int64)
        self._faiss: Any = None
        self._faiss_n = -1
        self._searcher: Any = None
        self._view: ArrayView | None = None  # the last snapshot, until the gallery changes

    # ---- storage -----------------------------------------------------------
    def _changed(self) -> None:
        """Drop what was derived from the rows (FAISS index, code searcher, snapshot): the rows changed.
        Called under the lock."""
        self._faiss = None
        self._searcher = None
        self._view = None

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
            path.unlink()  # open maps keep the data alive (POSIX); elsewhere the file stays until exit
        except OSError:
            pass
        return arr

    def _new_segment(self, cap: int, pad: int) -> _Segment:
        lay = self.layout
        return _Segment(
            self._alloc("stage1", (cap, self.stage1_dim), np.float32, self.mmap or lay.compressed_stage1),
            self._alloc("local", (cap, pad, self.local_dim), local_dtype(lay.local), self.mmap),
            self._alloc("scale", (cap, pad), np.float32, self.mmap) if lay.local == "int8" else None,
            self._alloc("mask", (cap, pad), np.float32, self.mmap),
            self._alloc("gram", (cap, pad, pad), lay.gram, self.mmap),
        )

    def _append_codes(self, seg: _Segment, a: int, codes: np.ndarray, rows_per_sub: int = CODE_ROWS) -> None:
        """Add compressed stage-1 ``codes`` of segment rows ``a..`` (the last sub-index is cloned, never
        changed)."""
        assert self._codec is not None
        faiss = self._codec.faiss
        subs = list(seg.codes)
        pos = 0
        while pos < len(codes):
            if subs and subs[-1].ntotal < rows_per_sub:
                last = faiss.clone_index(subs[-1])  # views may be searching the old one
                subs[-1] = last
            else:
                last = self._codec.new_index()
                subs.append(last)
            take = min(len(codes) - pos, rows_per_sub - last.ntotal)
            self._codec.add_codes(last, codes[pos : pos + take])
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
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        texts: Sequence[str | None] | None = None,
        sources: Sequence[str | None] | None = None,
    ) -> list[ItemId]:
        """Append encoded items.

        Args:
            stage1: ``[N, 2D]``; local ``[N, P, D]``; mask ``[N, P]``; gram ``[N, P, P]``.
            ids: ``N`` unique str/int ids not yet in the gallery (default: fresh ints).
            metadata: ``N`` JSON objects (or None), filterable with ``where=`` (see :mod:`.filters`).
            texts: ``N`` caption texts (or None), returned with the items' hits.
            sources: ``N`` source paths (or None), returned with the items' hits.
        Returns:
            The ids added.
        Raises:
            InputError: shape mismatch, non-finite values (refused before anything is quantized: int8
                codes of NaN/inf would be silently wrong), bad or duplicate ids, bad metadata, texts or
                sources.
        """
        stage1, local, mask, gram = check_encoded(stage1, local, mask, gram, self.stage1_dim, self.local_dim)
        n, width = stage1.shape[0], mask.shape[1]
        meta = check_metadata(metadata, n)
        text = check_labels(texts, n, "texts")
        source = check_labels(sources, n, "sources")
        local = local.astype(np.float32, copy=False)
        lo_store, scale, gr_store = store_locals(
            self.layout.local, local, gram.astype(np.float32, copy=False)
        )
        with self._lock:
            new_ids = (
                self.next_ids(n)
                if ids is None
                else new_ids_checked(ids, n, lambda xs: [i for i in xs if i in self._pos])
            )
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
                seg.local[a:b, width:] = 0  # padding (storage is not pre-zeroed)
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
            self._meta.extend(meta)  # views read only their first n entries
            self._text.extend(text)
            self._source.extend(source)
            self._n += n
            self._changed()
            if (
                self._codec is not None
                and self._codec.storage == "int8"
                and len(self._outliers) > max(256, self._n // 16)
            ):
                self._requantize()
            return list(new_ids)

    def _requantize(self) -> None:
        """Refit the int8 stage-1 scales on every item and re-encode the codes (new sub-indexes; views keep
        theirs)."""
        assert self._codec is not None
        codec = copy.copy(self._codec)
        codec.fit(
            np.concatenate([s.stage1[: s.n] for s in self._segs])
            if self._segs
            else np.zeros((0, self.stage1_dim))
        )
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

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id; all-or-nothing. Only the segments holding them are rewritten.

        Raises:
            InputError: an id is not in the gallery.
        """
        with self._lock:
            drop = [check_id(i) for i in ids]
            unknown = [i for i in drop if i not in self._pos]
            if unknown:
                raise InputError(
                    f"unknown ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; nothing was removed"
                )
            rows = np.unique(np.array([self._pos[i] for i in drop], np.int64))
            if not len(rows):
                return
            segs: list[_Segment] = []
            start = 0
            for seg in self._segs:
                mine = rows[(rows >= start) & (rows < start + seg.n)] - start
                if not len(mine):
                    segs.append(seg)  # untouched: shared with views as it is
                elif len(mine) < seg.n:
                    segs.append(
                        self._compacted(seg, np.setdiff1d(np.arange(seg.n), mine))
                    )  # readers keep the old
                start += seg.n
            self._segs = segs
            keep = np.setdiff1d(np.arange(self._n), rows)
            self._ids = [self._ids[r] for r in keep]
            self._meta = [self._meta[r] for r in keep]
            self._meta_index = MetaIndex(self._meta)  # views taken before keep theirs
            self._text = [self._text[r] for r in keep]
            self._source = [self._source[r] for r in keep]
            self._pos = {i: j for j, i in enumerate(self._ids)}
            if len(self._outliers):
                kept = self._outliers[~np.isin(self._outliers, rows)]
                self._outliers = kept - np.searchsorted(rows, kept)
            self._n = len(keep)
            self._changed()

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

    def adopt(
        self,
        arrays: Sequence[np.ndarray | None],
        ids: list[ItemId],
        *,
        codes: np.ndarray | None = None,
        codec: Stage1Codec | None = None,
        outliers: np.ndarray | None = None,
        meta: list[dict[str, Any] | None] | None = None,
        texts: list[str | None] | None = None,
        sources: list[str | None] | None = None,
    ) -> None:
        """Take stored arrays as the content of this empty gallery, kept as they are (e.g. read-only memory
        maps).

        ``arrays`` are ``stage1, local, mask, gram`` and, for int8 locals, ``scale``, already checked and
        stored
        as this gallery's layout stores them; with a compressed stage 1, ``codes`` and ``codec`` too. Later
        adds
        go to new segments: the adopted arrays are never copied. ``meta``, ``texts`` and ``sources`` are the
        items' metadata, caption texts and source paths (already checked; default none).
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
                    # one sub-index per scan thread (FAISS scans one index on one thread): never appended to,
                    # an adopted segment's sub-indexes need not be small, and fewer cost less per search
                    parts = scan_parts(codes.nbytes)
                    self._append_codes(seg, 0, codes, rows_per_sub=max(1, -(-n // parts)))
                    self._outliers = np.asarray(outliers if outliers is not None else np.zeros(0), np.int64)
                self._segs.append(seg)
            self._n = n
            self._ids = list(ids)
            self._meta = list(meta) if meta is not None else [None] * n
            self._meta_index = MetaIndex(self._meta)
            self._text = list(texts) if texts is not None else [None] * n
            self._source = list(sources) if sources is not None else [None] * n
            self._pos = {i: j for j, i in enumerate(self._ids)}
            self._changed()

    @property
    def codec(self) -> Stage1Codec | None:
        """The compressed stage-1 codec (scales), ``None`` for a float32 stage 1."""
        return self._codec

    @property
    def outliers(self) -> np.ndarray:
        return self._outliers.copy()

    # ---- search ------------------------------------------------------------
    def view(self) -> ArrayView:
        """A consistent snapshot for searching without holding the lock (the same object until the gallery
        changes: a view is read-only)."""
        with self._lock:
            if self._view is not None:
                return self._view
            n = self._n
            blocks = []
            start = 0
            for s in self._segs:
                if s.n:
                    c = s.n
                    blocks.append(
                        Block(
                            start,
                            c,
                            s.stage1[:c],
                            s.local[:c],
                            None if s.scale is None else s.scale[:c],
                            s.mask[:c],
                            s.gram[:c],
                        )
                    )
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
            self._view = ArrayView(
                n,
                self._ids,
                tuple(blocks),
                self.layout,
                faiss_index,
                copy.copy(self._codec) if self._codec is not None else None,
                searcher,
                self._outliers,
                self.overfetch,
                self.certify,
                self._meta,
                self._meta_index,
                self._text,
                self._source,
            )
            return self._view

    def _shards(self) -> Any:
        """One FAISS searcher over every codes sub-index (rows numbered in order; see ``code_searcher``)."""
        assert self._codec is not None
        subs = [ix for s in self._segs for ix in s.codes]
        return Codes(*code_searcher(self._codec.faiss, self.stage1_dim, subs), tuple(subs))
