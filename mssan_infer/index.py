"""Gallery store of one modality: ids, stage-1 vectors, locals, masks, Gram matrices; top-k; atomic save/load.

One :class:`GalleryIndex` holds the encoded items of one modality (the image
gallery searched by captions, or the caption gallery searched by images).
Items of different lengths (regions ``R`` or words ``L``) are padded to the
longest item with a mask. Locals and Gram matrices are float32 in RAM by
default, optionally float16 and/or memory-mapped from disk so a gallery larger
than RAM works. Stage 1 is an exact inner-product top-k in numpy by default,
or FAISS (flat, IVF or HNSW) when installed.

Saved layout (a folder, written atomically): ``index.json`` (format, bundle id,
gallery metadata, sha256 of every file) plus ``{gallery}_{array}.npy`` and
``{gallery}_ids.json`` per gallery. Nothing is pickled.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from .bundle import safe_member
from .errors import BackendUnavailableError, IndexFileError, IndexWriteError, InputError, MssanError
from .spec import sha256_file

__all__ = [
    "GalleryIndex",
    "GalleryView",
    "ItemId",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_MANIFEST",
    "STAGE1_METHODS",
    "topk_inner_product",
    "save_index",
    "load_index",
    "read_index_manifest",
    "extent",
    "default_ivf_nlist",
]

log = logging.getLogger(__name__)

ItemId = Union[str, int]
INDEX_FORMAT = "mssan-index"
INDEX_FORMAT_VERSION = 1
INDEX_MANIFEST = "index.json"
STAGE1_METHODS = ("numpy", "faiss", "faiss-ivf", "faiss-hnsw")
_DTYPES = ("float32", "float16")
_ARRAYS = ("stage1", "local", "mask", "gram")
_CHUNK_BYTES = 64 << 20
_MIN_ROWS_PER_PART = 16     # gathers smaller than this per thread are not split


def default_ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` items when ``nlist`` is not given: 4 sqrt(n), at least 39 items per list."""
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, row_bytes))


def topk_inner_product(
    queries: np.ndarray, base: np.ndarray, k: int, *, chunk_bytes: int = _CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k.

    Args:
        queries: ``[Q, D]`` float32.
        base: ``[N, D]`` (may be a memmap; read in chunks of rows).
        k: results per query; clipped to ``N``.
    Returns:
        ``(idx [Q, k'] int64, scores [Q, k'] float32)`` sorted by decreasing score,
        ties by increasing index; ``k' = min(k, N)``.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = int(base.shape[0])
    k = min(int(k), n)
    nq = q.shape[0]
    if k <= 0 or nq == 0:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
    rows = max(k, chunk_bytes // (4 * (max(1, nq) + base.shape[1])), 1)   # base rows per block
    best_i = np.zeros((nq, 0), np.int64)
    best_s = np.zeros((nq, 0), np.float32)
    for a in range(0, n, rows):
        block = np.asarray(base[a : a + rows], dtype=np.float32)
        s = q @ block.T                                                   # [Q, n_block]
        kk = min(k, s.shape[1])
        if kk < s.shape[1]:
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(s.shape[1]), (nq, s.shape[1]))
        cand_i = np.concatenate([best_i, part + a], axis=1)
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        # sort by (-score, index): lexsort sorts by the last key first
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
        best_i = np.take_along_axis(cand_i, order, axis=1)
        best_s = np.take_along_axis(cand_s, order, axis=1)
    return best_i.astype(np.int64), best_s.astype(np.float32)


def extent(mask: np.ndarray) -> int:
    """Padded width needed by ``mask [N, P]``: one past the last real position of any item (0 if none)."""
    cols = np.flatnonzero((np.asarray(mask) > 0).any(0))
    return int(cols[-1]) + 1 if cols.size else 0


def _check_id(x: Any) -> ItemId:
    if isinstance(x, np.integer):
        x = int(x)
    elif isinstance(x, np.str_):
        x = str(x)
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise InputError(f"ids must be str or int (JSON-serialisable), got {type(x).__name__} {x!r}")
    return x


@dataclass(frozen=True)
class GalleryView:
    """A consistent read-only view of a gallery (taken under the gallery's lock).

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

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 top-k rows for ``queries [Q, D2]`` -> ``(idx [Q,k'], scores [Q,k'])``."""
        if self.faiss_index is None:
            return topk_inner_product(queries, self.stage1, k)
        k = min(int(k), self.n)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, idx = self.faiss_index.search(q, k)
        if (idx < 0).any():  # IVF/HNSW may return fewer than k: keep the columns every row filled
            width = int((idx >= 0).sum(1).min())
            idx, scores = idx[:, :width], scores[:, :width]
        return idx.astype(np.int64), scores.astype(np.float32)

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
        if parts == 1:
            copy(0, k)
        else:
            bounds = np.linspace(0, k, parts + 1).astype(int).tolist()
            futures = [executor.submit(copy, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]  # type: ignore[union-attr]
            copy(bounds[0], bounds[1])
            for f in futures:
                f.result()
        return local, np.ascontiguousarray(mask[:, :width], dtype=np.float32), gram


class GalleryIndex:
    """The encoded items of one modality.

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
        if dtype not in _DTYPES:
            raise InputError(f"index dtype must be one of {_DTYPES}, got {dtype!r}")
        if stage1 not in STAGE1_METHODS:
            raise InputError(f"stage1 must be one of {STAGE1_METHODS}, got {stage1!r}")
        if stage1 != "numpy":
            _import_faiss()
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
        self._owned_spill: Path | None = None
        self._n = 0
        self._cap = 0
        self._pad = 0
        self._ids: list[ItemId] = []
        self._pos: dict[ItemId, int] = {}
        self._files: dict[str, Path] = {}      # array name -> spill file we own
        self._stage1 = self._alloc("stage1", (0, self.stage1_dim), np.dtype(np.float32))
        self._local = self._alloc("local", (0, 0, self.local_dim), self.dtype)
        self._mask = self._alloc("mask", (0, 0), np.dtype(np.float32))
        self._gram = self._alloc("gram", (0, 0, 0), self.dtype)
        self._faiss: Any = None
        self._faiss_n = -1

    # ---- storage -----------------------------------------------------------
    def _spill_dir(self) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="mssan-index-"))
            self._owned_spill = self._spill
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

    def _reserve(self, rows: int, pad: int) -> None:
        """Make room for ``rows`` items of length up to ``pad`` (new buffers; old views stay valid)."""
        if rows <= self._cap and pad <= self._pad:
            return
        cap = max(rows, self._cap) if rows <= self._cap else max(rows, int(self._cap * 1.5) + 16)
        p = max(pad, self._pad)
        d, d2 = self.local_dim, self.stage1_dim
        stage1 = self._alloc("stage1", (cap, d2), np.dtype(np.float32))
        local = self._alloc("local", (cap, p, d), self.dtype)
        mask = self._alloc("mask", (cap, p), np.dtype(np.float32))
        gram = self._alloc("gram", (cap, p, p), self.dtype)
        n, op = self._n, self._pad
        step = _rows_per_chunk(max(1, op) * (d + op) * self.dtype.itemsize)
        for a in range(0, n, step):
            b = min(n, a + step)
            stage1[a:b] = self._stage1[a:b]
            local[a:b, :op] = self._local[a:b]
            mask[a:b, :op] = self._mask[a:b]
            gram[a:b, :op, :op] = self._gram[a:b]
        self._stage1, self._local, self._mask, self._gram = stage1, local, mask, gram
        self._cap, self._pad = cap, p

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
            if ids is None:
                new_ids: list[ItemId] = list(self.next_ids(n))
            else:
                if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                    raise InputError(f"ids must be a sequence of str/int, got {type(ids).__name__}")
                new_ids = [_check_id(i) for i in ids]
                if len(new_ids) != n:
                    raise InputError(f"got {len(new_ids)} ids for {n} items")
                if len(set(new_ids)) != n:
                    seen: set[ItemId] = set()
                    dup = [i for i in new_ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
                    raise InputError(f"duplicate ids in this batch: {dup[:5]}")
                clash = [i for i in new_ids if i in self._pos]
                if clash:
                    raise InputError(f"ids already in the gallery: {clash[:5]}; remove them first or use other ids")
            if n == 0:
                return []
            self._reserve(self._n + n, width)
            a, b = self._n, self._n + n
            self._stage1[a:b] = stage1
            self._local[a:b, :width] = local                  # rows past n are still zero
            self._mask[a:b, :width] = mask
            self._gram[a:b, :width, :width] = gram
            for j, i in enumerate(new_ids):
                self._pos[i] = a + j
            self._ids.extend(new_ids)
            self._n = b
            self._faiss = None
            return new_ids

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id; all-or-nothing.

        Raises:
            InputError: an id is not in the gallery.
        """
        with self._lock:
            drop = [_check_id(i) for i in ids]
            unknown = [i for i in drop if i not in self._pos]
            if unknown:
                raise InputError(f"unknown ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; nothing was removed")
            rows = {self._pos[i] for i in drop}
            if not rows:
                return
            keep = np.array([r for r in range(self._n) if r not in rows], dtype=np.int64)
            self._rebuild(keep)

    def _rebuild(self, keep: np.ndarray) -> None:
        """Replace the buffers by new ones holding rows ``keep`` (readers keep the old ones)."""
        m, p, d = len(keep), self._pad, self.local_dim
        old = (self._stage1, self._local, self._mask, self._gram)
        cap = max(m, 1)
        self._stage1 = self._alloc("stage1", (cap, self.stage1_dim), np.dtype(np.float32))
        self._local = self._alloc("local", (cap, p, d), self.dtype)
        self._mask = self._alloc("mask", (cap, p), np.dtype(np.float32))
        self._gram = self._alloc("gram", (cap, p, p), self.dtype)
        step = _rows_per_chunk(max(1, p) * (d + p) * self.dtype.itemsize)
        for a in range(0, m, step):
            rows = keep[a : a + step]
            self._stage1[a : a + len(rows)] = old[0][rows]
            self._local[a : a + len(rows)] = old[1][rows]
            self._mask[a : a + len(rows)] = old[2][rows]
            self._gram[a : a + len(rows)] = old[3][rows]
        self._ids = [self._ids[r] for r in keep]
        self._pos = {i: j for j, i in enumerate(self._ids)}
        self._n, self._cap = m, cap
        self._faiss = None

    # ---- search ------------------------------------------------------------
    def view(self) -> GalleryView:
        """A consistent snapshot for searching without holding the lock."""
        with self._lock:
            n = self._n
            faiss_index = None
            if self.stage1_method != "numpy" and n > 0:
                if self._faiss is None or self._faiss_n != n:
                    self._faiss = self._build_faiss(self._stage1[:n])
                    self._faiss_n = n
                faiss_index = self._faiss
            return GalleryView(
                n, self._ids, self._stage1[:n], self._local[:n], self._mask[:n], self._gram[:n], faiss_index
            )

    def _build_faiss(self, stage1: np.ndarray) -> Any:
        faiss = _import_faiss()
        x = np.ascontiguousarray(stage1, dtype=np.float32)
        d, n = x.shape[1], x.shape[0]
        opts = self.faiss_options
        if self.stage1_method == "faiss":
            index = faiss.IndexFlatIP(d)
        elif self.stage1_method == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, int(opts.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = int(opts.get("ef_search", 128))
        else:
            nlist = int(opts.get("nlist", default_ivf_nlist(n)))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = int(opts.get("nprobe", min(nlist, 16)))   # FAISS keeps `quantizer` referenced
        index.add(x)
        log.debug("built FAISS %s over %d items", self.stage1_method, n)
        return index

    # ---- persistence -------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """JSON metadata describing the stored arrays."""
        return {
            "n": self._n,
            "stage1_dim": self.stage1_dim,
            "local_dim": self.local_dim,
            "max_length": self._pad,
            "dtype": self.dtype.name,
        }

    def write(self, folder: Path, prefix: str) -> dict[str, Any]:
        """Write this gallery's arrays and ids into ``folder`` (chunked; fsync'd).

        Returns the metadata entry: ``meta()`` plus ``files`` {array: file name}.
        """
        with self._lock:
            n = self._n
            entry = self.meta()
            files: dict[str, str] = {}
            sources = {
                "stage1": self._stage1[:n], "local": self._local[:n], "mask": self._mask[:n], "gram": self._gram[:n]
            }
            for name, src in sources.items():
                fname = f"{prefix}_{name}.npy"
                _write_npy(folder / fname, src)
                files[name] = fname
            ids_name = f"{prefix}_ids.json"
            with open(folder / ids_name, "w", encoding="utf-8") as f:
                json.dump(self._ids[:n], f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            files["ids"] = ids_name
            entry["files"] = files
            return entry

    @classmethod
    def read(
        cls,
        folder: Path,
        entry: Mapping[str, Any],
        *,
        mmap: bool = False,
        dtype: str | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        stage1: str = "numpy",
        faiss_options: Mapping[str, int] | None = None,
    ) -> "GalleryIndex":
        """Rebuild a gallery from ``write``'s files (already checksum-verified by the caller).

        With ``mmap`` the saved arrays are mapped read-only (copied to ``spill_dir``
        only when the gallery next grows). ``dtype`` converts the stored locals.

        Raises:
            IndexFileError: missing or inconsistent files.
        """
        try:
            files = entry["files"]
            saved_dtype = str(entry["dtype"])
            idx = cls(
                int(entry["stage1_dim"]), int(entry["local_dim"]), dtype=dtype or saved_dtype, mmap=mmap,
                spill_dir=spill_dir, stage1=stage1, faiss_options=faiss_options,
            )
            arrays: dict[str, np.ndarray] = {}
            for name in _ARRAYS:
                path = safe_member(folder, files[name])
                arrays[name] = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            with open(safe_member(folder, files["ids"]), encoding="utf-8") as f:
                ids = json.load(f)
            n = int(entry["n"])
        except IndexFileError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise IndexFileError(f"index in {folder} is damaged or incomplete ({e!r}); rebuild it") from e
        st, lo, ma, gr = (arrays[a] for a in _ARRAYS)
        p = lo.shape[1] if lo.ndim == 3 else -1
        if (
            not isinstance(ids, list) or len(ids) != n or st.shape != (n, idx.stage1_dim)
            or lo.shape != (n, p, idx.local_dim) or ma.shape != (n, p) or gr.shape != (n, p, p)
            or lo.dtype.name != saved_dtype or st.dtype != np.float32
        ):
            raise IndexFileError(f"index arrays in {folder} do not match their metadata; rebuild the index")
        try:
            clean = [_check_id(i) for i in ids]
        except InputError as e:
            raise IndexFileError(f"index ids in {folder} are invalid: {e}") from e
        if len(set(clean)) != n:
            raise IndexFileError(f"index ids in {folder} contain duplicates; rebuild the index")
        if mmap and idx.dtype == lo.dtype:
            # map the saved files read-only; the next add or remove copies into new buffers
            idx._stage1, idx._local, idx._mask, idx._gram = st, lo, ma, gr
        else:
            idx._reserve(n, p)
            step = _rows_per_chunk(max(1, p) * (idx.local_dim + p) * 4)
            for a in range(0, n, step):
                b = min(n, a + step)
                idx._stage1[a:b] = st[a:b]
                idx._local[a:b] = lo[a:b]
                idx._mask[a:b] = ma[a:b]
                idx._gram[a:b] = gr[a:b]
        idx._n, idx._cap, idx._pad = n, int(idx._stage1.shape[0]), p
        idx._ids = clean
        idx._pos = {i: j for j, i in enumerate(clean)}
        return idx


def _write_npy(path: Path, src: np.ndarray) -> None:
    """Write ``src`` as .npy in row chunks (works for memmaps larger than RAM)."""
    if src.nbytes <= _CHUNK_BYTES or src.shape[0] == 0:
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(src), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=src.dtype, shape=src.shape)
    step = _rows_per_chunk(src[:1].nbytes)
    for a in range(0, src.shape[0], step):
        out[a : a + step] = src[a : a + step]
    out.flush()
    del out
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise BackendUnavailableError(
            "stage-1 search with FAISS needs the faiss package: `pip install faiss-cpu` "
            "(or `pip install mssan[faiss]`), or use stage1='numpy'"
        ) from e
    return faiss


# ---- index folders ---------------------------------------------------------
def save_index(
    path: str | os.PathLike[str],
    galleries: Mapping[str, GalleryIndex],
    *,
    bundle_id: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``galleries`` (name -> gallery) to the folder ``path`` atomically.

    Everything is written to a temp folder beside ``path`` with sha256 of every
    file in ``index.json``, then renamed into place; an existing index at
    ``path`` is replaced only once the new one is complete.

    Raises:
        IndexFileError: ``path`` exists and is not an mssan index (it is never overwritten).
        IndexWriteError: writing failed (disk full, permissions, a bad path); the previous
            index at ``path``, if any, is unchanged and no temp folder is left behind.
    """
    try:
        return _save_index(Path(path), galleries, bundle_id=bundle_id, extra=extra)
    except (OSError, ValueError) as e:
        if isinstance(e, MssanError):
            raise
        raise IndexWriteError(
            f"cannot write the index to {path}: {e}. Free some space or choose a writable path; "
            "the previous index there (if any) is unchanged"
        ) from e


def _save_index(
    out: Path, galleries: Mapping[str, GalleryIndex], *, bundle_id: str, extra: Mapping[str, Any] | None
) -> Path:
    if out.exists() and not (out.is_dir() and ((out / INDEX_MANIFEST).is_file() or not any(out.iterdir()))):
        raise IndexFileError(f"{out} exists and is not an mssan index folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {name: g.write(tmp, name) for name, g in galleries.items()}
        digests: dict[str, str] = {}
        for entry in entries.values():
            for fname in entry["files"].values():
                digests[fname] = sha256_file(tmp / fname)
        manifest = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "bundle_id": bundle_id,
            "galleries": entries,
            "files": digests,
            **dict(extra or {}),
        }
        with open(tmp / INDEX_MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists() and _exchange_dirs(tmp, out):
            old = tmp                                   # tmp now holds the previous index
        else:
            # no atomic exchange here: a crash between these two renames leaves the previous
            # index at ``old``, which load_index puts back (see _recover_interrupted_save)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved index %s (%s)", out, ", ".join(f"{k}: {len(g)}" for k, g in galleries.items()))
    return out


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the platform or file system cannot.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _recover_interrupted_save(root: Path) -> None:
    """Put back the previous index when a save was killed between its two renames (non-Linux path)."""
    if root.exists() or not root.parent.is_dir():
        return
    olds = [p for p in root.parent.glob(f".{root.name}.old-*") if (p / INDEX_MANIFEST).is_file()]
    if not olds:
        return
    latest = max(olds, key=lambda p: p.stat().st_mtime)
    try:
        os.replace(latest, root)
    except OSError:
        return
    log.warning("restored index %s from %s, left by an interrupted save", root, latest.name)


def read_index_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``index.json`` of an index folder (format and version only; files not hashed).

    Raises:
        IndexFileError: missing/invalid manifest, unknown format, newer version.
    """
    root = Path(path)
    _recover_interrupted_save(root)
    mpath = root / INDEX_MANIFEST
    if not mpath.is_file():
        raise IndexFileError(f"{root} is not an mssan index ({INDEX_MANIFEST} missing); build one with Retriever.save")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexFileError(f"{mpath} is not valid JSON ({e}); the index is damaged, rebuild it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{mpath} is not an mssan index manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise IndexFileError(f"{mpath} has no integer format_version; rebuild the index")
    if version > INDEX_FORMAT_VERSION:
        raise IndexFileError(
            f"index format {version} is newer than this mssan_infer reads ({INDEX_FORMAT_VERSION}); upgrade mssan_infer"
        )
    if version < 1:
        raise IndexFileError(f"index format {version} is not supported; rebuild the index")
    for key in ("bundle_id", "galleries", "files"):
        if key not in manifest:
            raise IndexFileError(f"{mpath} lacks {key!r}; rebuild the index")
    return manifest


def load_index(
    path: str | os.PathLike[str],
    *,
    bundle_id: str | None = None,
    verify: bool = True,
    mmap: bool = False,
    dtype: str | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    stage1: str = "numpy",
    faiss_options: Mapping[str, int] | None = None,
) -> tuple[dict[str, GalleryIndex], dict[str, Any]]:
    """Load an index folder written by :func:`save_index`.

    Args:
        bundle_id: when given, the index must have been built with this bundle.
        verify: check the sha256 of every file.
        mmap, dtype, spill_dir, stage1, faiss_options: see :class:`GalleryIndex`.
    Returns:
        ``(galleries, manifest)``.
    Raises:
        IndexFileError: missing, damaged, tampered, newer-format or other-bundle index.
    """
    root = Path(path)
    manifest = read_index_manifest(root)
    if bundle_id is not None and manifest["bundle_id"] != bundle_id:
        raise IndexFileError(
            f"index {root} was built with bundle {manifest['bundle_id']}, but the loaded bundle is {bundle_id}; "
            "its vectors would not match. Rebuild the index with this bundle."
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not isinstance(manifest["galleries"], dict):
        raise IndexFileError(f"{root / INDEX_MANIFEST} is malformed; rebuild the index")
    for entry in manifest["galleries"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
            raise IndexFileError(f"{root / INDEX_MANIFEST} is malformed (a gallery entry is not an object); rebuild the index")
        for fname in entry.get("files", {}).values():
            if fname not in files:
                raise IndexFileError(f"index file {fname} has no sha256 in the manifest; rebuild the index")
    for fname, digest in files.items():
        try:
            fpath = safe_member(root, fname)
        except Exception as e:
            raise IndexFileError(f"index manifest names an unsafe file {fname!r}: {e}") from e
        if not fpath.is_file():
            raise IndexFileError(f"index file {fname} is missing from {root}; copy the whole folder or rebuild")
        if verify and sha256_file(fpath) != digest:
            raise IndexFileError(
                f"index file {fname} does not match its sha256 (truncated or modified); rebuild the index"
            )
    galleries = {
        name: GalleryIndex.read(
            root, entry, mmap=mmap, dtype=dtype, spill_dir=spill_dir, stage1=stage1, faiss_options=faiss_options
        )
        for name, entry in manifest["galleries"].items()
    }
    return galleries, manifest
