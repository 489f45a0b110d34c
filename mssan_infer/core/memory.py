"""The in-memory gallery: encoded items of one modality in numpy arrays (optionally memory-mapped).

Items of different lengths (regions ``R`` or words ``L``) are padded to the longest
item with a mask. Locals and Gram matrices are float32 in RAM by default, optionally
float16 and/or memory-mapped from disk so a gallery larger than RAM works. Stage 1 is
an exact inner-product top-k in numpy by default, or FAISS (flat, IVF or HNSW).
Saving to and loading from folders is :mod:`mssan_infer.core.store`'s job.
"""
from __future__ import annotations

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

from .contract import raise_colliding, ItemId, check_id, extent
from .errors import InputError
from .files import rows_per_chunk
from .stage1 import build_faiss, check_method, faiss_topk, topk_inner_product

__all__ = ["GalleryIndex", "ArrayView", "DTYPES", "ARRAYS"]

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
ARRAYS = ("stage1", "local", "mask", "gram")
_MIN_ROWS_PER_PART = 16     # gathers smaller than this per thread are not split
_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _copy_rows(dst: _Arrays, src: _Arrays, n: int, rows: np.ndarray | None = None) -> None:
    """``dst[i] = src[rows[i]]`` (``src[i]`` without ``rows``) for ``i < n``, for the four arrays at once.

    Copies in blocks of rows (bounded memory, memmaps larger than RAM work); each source
    array lands in the leading corner of its destination, which may be padded wider.
    """
    local = src[1]
    row_bytes = max(1, local[:1].nbytes + src[3][:1].nbytes)
    step = rows_per_chunk(row_bytes)
    for a in range(0, n, step):
        b = min(n, a + step)
        pick: slice | np.ndarray = slice(a, b) if rows is None else rows[a:b]
        for d, s in zip(dst, src):
            block = s[pick]
            d[(slice(a, b),) + tuple(slice(0, w) for w in block.shape[1:])] = block


@dataclass(frozen=True)
class ArrayView:
    """A consistent read-only view of an in-memory gallery (taken under its lock).

    Arrays are views of the first ``n`` rows; later appends do not change them and
    removals replace the gallery's buffers instead of editing them in place.
    """

    n: int
    ids: Sequence[ItemId]                   # valid at positions < n
    stage1: np.ndarray                      # [n, D2] float32
    local: np.ndarray                       # [n, P, D]
    mask: np.ndarray                        # [n, P] float32
    gram: np.ndarray                        # [n, P, P]
    faiss_index: Any = None

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemId]:
        return [self.ids[int(r)] for r in rows]

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 top-k rows for ``queries [Q, D2]`` -> ``(idx [Q,k'], scores [Q,k'])``."""
        if self.faiss_index is None:
            return topk_inner_product(queries, self.stage1, k)
        return faiss_topk(self.faiss_index, queries, k, self.n)

    def gather(
        self, rows: np.ndarray, executor: Executor | None = None, parts: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Locals, masks and Grams of ``rows``, float32, trimmed to their longest item.

        Args:
            rows: gallery rows, in the order wanted.
            executor, parts: copy in ``parts`` slices, ``parts - 1`` of them on ``executor``
                (the caller copies one). One thread's copy is bound by its memory reads; two
                threads fetch twice as many rows at once. Memory-mapped rows are read in file order.
        Returns: ``local [K,P',D]``, ``mask [K,P']``, ``gram [K,P',P']``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        mask = np.ascontiguousarray(np.take(self.mask, rows, axis=0))
        width = max(1, extent(mask))
        k, d = len(rows), self.local.shape[2]
        local = np.empty((k, width, d), np.float32)
        gram = np.empty((k, width, width), np.float32)
        src_local, src_gram = self.local, self.gram
        mapped = isinstance(src_local, np.memmap)
        whole = width == src_local.shape[1] and src_local.dtype == np.float32 and src_gram.dtype == np.float32
        if whole and not mapped:
            def copy(a: int, b: int) -> None:             # one C call per slice, without the GIL
                np.take(src_local, rows[a:b], axis=0, out=local[a:b], mode="clip")   # rows are in range
                np.take(src_gram, rows[a:b], axis=0, out=gram[a:b], mode="clip")
        else:
            rows_l = rows.tolist()
            order_l = np.argsort(rows, kind="stable").tolist() if mapped else list(range(k))

            def copy(a: int, b: int) -> None:
                for pos in order_l[a:b]:
                    r = rows_l[pos]
                    local[pos] = src_local[r, :width]       # casts float16 storage
                    gram[pos] = src_gram[r, :width, :width]

        parts = max(1, min(int(parts), k // _MIN_ROWS_PER_PART)) if executor is not None else 1
        if parts == 1 or executor is None:
            copy(0, k)
        else:
            bounds = np.linspace(0, k, parts + 1).astype(int).tolist()
            futures = [executor.submit(copy, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
            copy(bounds[0], bounds[1])
            for f in futures:
                f.result()
        return local, np.ascontiguousarray(mask[:, :width], dtype=np.float32), gram


class GalleryIndex:
    """The encoded items of one modality, in numpy arrays (the default :class:`~.contract.Gallery`).

    Args:
        stage1_dim: ``2D``.
        local_dim: ``D``.
        dtype: storage of locals and Grams, ``"float32"`` (default) or ``"float16"``.
        mmap: keep stage-1 vectors, locals, masks and Grams in memory-mapped files
            (in ``spill_dir``) instead of RAM.
        spill_dir: folder for the memory-mapped files (default: a fresh temp folder,
            removed with the index).
        stage1: ``"numpy"`` (exact, default), ``"faiss"`` (IndexFlatIP, exact),
            ``"faiss-ivf"`` or ``"faiss-hnsw"`` (approximate).
        faiss_options: ``nlist``/``nprobe`` (IVF), ``M``/``ef_search`` (HNSW).

    Raises:
        InputError: bad dims, dtype or stage-1 method.
        BackendUnavailableError: a FAISS method without faiss installed.
    """

    def __init__(
        self,
        stage1_dim: int,
        local_dim: int,
        *,
        dtype: str = "float32",
        mmap: bool = False,
        spill_dir: str | os.PathLike[str] | None = None,
        stage1: str = "numpy",
        faiss_options: Mapping[str, int] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"index dtype must be one of {DTYPES}, got {dtype!r}")
        check_method(stage1)
        if int(stage1_dim) < 1 or int(local_dim) < 1:
            raise InputError(f"dims must be positive, got stage1_dim={stage1_dim}, local_dim={local_dim}")
        self.stage1_dim = int(stage1_dim)
        self.local_dim = int(local_dim)
        self.dtype = np.dtype(dtype)
        self.mmap = bool(mmap)
        self.stage1_method = stage1
        self.faiss_options = dict(faiss_options or {})
        self._lock = threading.RLock()
        self._spill: Path | None = Path(spill_dir) if spill_dir is not None else None
        self._n = 0
        self._cap = 0
        self._pad = 0
        self._ids: list[ItemId] = []
        self._pos: dict[ItemId, int] = {}
        self._files: dict[str, Path] = {}      # array name -> spill file we own
        self._arrays: _Arrays = self._allocate(0, 0)
        self._faiss: Any = None
        self._faiss_n = -1

    # ---- storage -----------------------------------------------------------
    def _spill_dir(self) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="mssan-index-"))
            weakref.finalize(self, shutil.rmtree, str(self._spill), True)
        self._spill.mkdir(parents=True, exist_ok=True)
        return self._spill

    def _alloc(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        if not self.mmap or shape[0] == 0 or 0 in shape:
            return np.zeros(shape, dtype)
        path = self._spill_dir() / f"{name}.{uuid.uuid4().hex[:12]}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        old = self._files.get(name)
        self._files[name] = path
        if old is not None:
            # open views keep the old data alive (POSIX); elsewhere the file stays until exit
            try:
                old.unlink()
            except OSError:
                pass
        return arr

    def _allocate(self, cap: int, pad: int) -> _Arrays:
        """New zeroed buffers for ``cap`` items of length ``pad``."""
        f32 = np.dtype(np.float32)
        return (
            self._alloc("stage1", (cap, self.stage1_dim), f32),
            self._alloc("local", (cap, pad, self.local_dim), self.dtype),
            self._alloc("mask", (cap, pad), f32),
            self._alloc("gram", (cap, pad, pad), self.dtype),
        )

    def _reserve(self, rows: int, pad: int) -> None:
        """Make room for ``rows`` items of length up to ``pad`` (new buffers; old views stay valid)."""
        if rows <= self._cap and pad <= self._pad:
            return
        cap = max(rows, self._cap) if rows <= self._cap else max(rows, int(self._cap * 1.5) + 16)
        p = max(pad, self._pad)
        arrays = self._allocate(cap, p)
        _copy_rows(arrays, self._arrays, self._n)
        self._arrays, self._cap, self._pad = arrays, cap, p

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
        """Padded length ``P`` of the stored items."""
        return self._pad

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
            "max_length": self._pad,
            "dtype": self.dtype.name,
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
        if not (np.isfinite(stage1).all() and np.isfinite(local).all() and np.isfinite(gram).all()):
            raise InputError("encoded items contain NaN or inf; check the input features")
        width = extent(mask)
        local, mask, gram = local[:, :width], mask[:, :width], gram[:, :width, :width]
        with self._lock:
            new_ids = self.next_ids(n) if ids is None else self._new_ids(ids, n)
            if n == 0:
                return []
            self._reserve(self._n + n, width)
            a, b = self._n, self._n + n
            st, lo, ma, gr = self._arrays
            st[a:b] = stage1
            lo[a:b, :width] = local                  # rows past n are still zero
            ma[a:b, :width] = mask
            gr[a:b, :width, :width] = gram
            for j, i in enumerate(new_ids):
                self._pos[i] = a + j
            self._ids.extend(new_ids)
            self._n = b
            self._faiss = None
            return list(new_ids)

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
        raise_colliding(new_ids, self._pos)
        return new_ids

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id; all-or-nothing.

        Raises:
            InputError: an id is not in the gallery.
        """
        with self._lock:
            drop = [check_id(i) for i in ids]
            unknown = [i for i in drop if i not in self._pos]
            if unknown:
                raise InputError(f"unknown ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; nothing was removed")
            rows = {self._pos[i] for i in drop}
            if not rows:
                return
            keep = np.array([r for r in range(self._n) if r not in rows], dtype=np.int64)
            arrays = self._allocate(max(len(keep), 1), self._pad)   # readers keep the old buffers
            _copy_rows(arrays, self._arrays, len(keep), keep)
            self._arrays = arrays
            self._ids = [self._ids[r] for r in keep]
            self._pos = {i: j for j, i in enumerate(self._ids)}
            self._n, self._cap = len(keep), max(len(keep), 1)
            self._faiss = None

    def adopt(self, arrays: _Arrays, ids: list[ItemId]) -> None:
        """Take ``arrays`` (``stage1, local, mask, gram``, already checked) and ``ids`` as the content of
        this empty gallery: kept as they are (e.g. read-only memory maps, copied into new buffers only
        when the gallery next grows) when they are stored as this gallery stores them, else copied."""
        st, lo = arrays[0], arrays[1]
        n, p = int(st.shape[0]), int(lo.shape[1])
        with self._lock:
            if self._n:
                raise InputError("adopt() needs an empty gallery")
            if lo.dtype == self.dtype and (self.mmap or not isinstance(lo, np.memmap)):
                self._arrays = arrays
            else:
                self._arrays = self._allocate(n, p)
                _copy_rows(self._arrays, arrays, n)
            self._n, self._cap, self._pad = n, n, p
            self._ids = list(ids)
            self._pos = {i: j for j, i in enumerate(self._ids)}
            self._faiss = None

    # ---- search ------------------------------------------------------------
    def view(self) -> ArrayView:
        """A consistent snapshot for searching without holding the lock."""
        with self._lock:
            n = self._n
            faiss_index = None
            if self.stage1_method != "numpy" and n > 0:
                if self._faiss is None or self._faiss_n != n:
                    self._faiss = build_faiss(self.stage1_method, self._arrays[0][:n], self.faiss_options)
                    self._faiss_n = n
                faiss_index = self._faiss
            st, lo, ma, gr = self._arrays
            return ArrayView(n, self._ids, st[:n], lo[:n], ma[:n], gr[:n], faiss_index)
