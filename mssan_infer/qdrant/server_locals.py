"""The rerank inputs of a gallery on a Qdrant server: a binary payload on each point, read through a cache.

The server is the one source of truth. Each point's payload holds the item's rerank inputs as one field,
``mssan_lb``: its locals, per-vector scales (int8 storage), mask and Gram in the storage of the gallery's
layout (:func:`mssan_infer.gallery.storage.store_locals`, the in-memory gallery's own formats), trimmed to
the item's length, as base64 of the raw bytes with their dtypes; ``mssan_lh`` is a hash of that content.

Without a cache, a search asks Qdrant for the candidates' payloads with ``mssan_lb`` in the same request
as stage 1 and decodes them (one base64 decode and a few copies per candidate, no Python float lists).

With a cache folder (``QdrantServer(cache_dir=...)``), a query node keeps a read-through copy of the
rerank inputs: append-only segments of ``.npy`` files (``seg-*/{local,scale,mask,gram}.npy`` and
``keys.json``), memory-mapped, each row keyed by point id and content hash. The indexing process fills it
as it adds. A search asks Qdrant for ids, scores and payloads without ``mssan_lb``, looks each candidate
up by ``(point id, mssan_lh)``; on a miss it first picks up segments that other processes sharing the
folder wrote, then fetches the still missing or stale candidates (a changed hash: the item was
replaced on the server) from the server in one request and keeps them as a new segment. An entry is
used only when its hash is the one the server returned with the candidate, so the cache can never serve
an item's old content; it can be deleted at any time (it refills from the server).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mssan_infer.errors import IndexFileError
from mssan_infer.files import fsync_dir
from mssan_infer.gallery.base import Candidates
from mssan_infer.gallery.storage import int8_codes_as_stored, store_locals
from mssan_infer.qdrant.locals import write_arrays

__all__ = ["ServerLocals", "LocalsCache", "PAYLOAD", "HASH", "pack", "unpack"]

log = logging.getLogger(__name__)

PAYLOAD = "mssan_lb"  # an item's stored rerank inputs (see the module docstring)
HASH = "mssan_lh"  # the hash of mssan_lb's content: the cache's key, with the point id
_VERSION = 1
_KEYS = "keys.json"

Stored = tuple[np.ndarray, "np.ndarray | None", np.ndarray, np.ndarray]  # local, scale, mask, gram
# rows at output positions: (positions, local, scale, mask, gram)
Part = tuple[np.ndarray, np.ndarray, "np.ndarray | None", np.ndarray, np.ndarray]


def _digest(header: Mapping[str, Any], parts: Sequence[np.ndarray]) -> str:
    h = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=16)
    for p in parts:
        h.update(np.ascontiguousarray(p).data)
    return h.hexdigest()


def pack(local: np.ndarray, scale: np.ndarray | None, mask: np.ndarray, gram: np.ndarray) -> tuple[dict, str]:
    """One item's stored rows (``local [W, D]``, ``scale [W]`` or None, ``mask [W]``, ``gram [W, W]``) ->
    ``(mssan_lb payload value, content hash)``."""
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    parts = [local, *([scale] if scale is not None else []), mask, gram]
    header = {
        "v": _VERSION,
        "w": int(mask.shape[0]),
        "local": local.dtype.str,
        "scale": None if scale is None else scale.dtype.str,
        "gram": gram.dtype.str,
    }
    raw = b"".join(np.ascontiguousarray(p).tobytes() for p in parts)
    return {**header, "b64": base64.b64encode(raw).decode("ascii")}, _digest(header, parts)


def unpack(blob: Any, local_dim: int) -> Stored:
    """What :func:`pack` made -> ``(local [W, D], scale [W] or None, mask [W], gram [W, W])`` (views of one
    decoded buffer).

    Raises:
        IndexFileError: not a blob of this format.
    """
    try:
        if blob.get("v") != _VERSION:
            raise ValueError(f"format {blob.get('v')!r}")
        w, d = int(blob["w"]), int(local_dim)
        raw = base64.b64decode(blob["b64"], validate=False)
        spec = [("local", (w, d)), ("scale", (w,)), ("mask", (w,)), ("gram", (w, w))]
        out: dict[str, np.ndarray | None] = {"scale": None}
        at = 0
        for name, shape in spec:
            dt = np.dtype("<f4") if name == "mask" else (np.dtype(blob[name]) if blob[name] else None)
            if dt is None:
                continue
            count = int(np.prod(shape))
            out[name] = np.frombuffer(raw, dt, count, at).reshape(shape)
            at += count * dt.itemsize
        if at != len(raw):
            raise ValueError(f"{len(raw)} bytes for {at}")
        if out["local"] is not None and out["local"].dtype == np.float16:
            raise ValueError("float16 locals, a storage that was removed")
        if out["local"] is not None and out["local"].dtype == np.int8:  # codes from before they were + 128
            out["local"] = int8_codes_as_stored(out["local"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise IndexFileError(
            f"a point's {PAYLOAD} payload is not mssan rerank inputs ({e}); rebuild the gallery"
        ) from None
    local, mask, gram = out["local"], out["mask"], out["gram"]
    assert local is not None and mask is not None and gram is not None
    return local, out["scale"], mask, gram


def _width(mask: np.ndarray) -> int:
    """The real length of items ``mask [k, P]`` (last position any of them uses, at least 1)."""
    real = mask.any(0)
    return int(np.flatnonzero(real)[-1]) + 1 if real.any() else 1


def _assemble(parts: Sequence[Part], k: int, d: int, widen: bool = False) -> Stored:
    """``(local, scale, mask, gram)`` ``[k, W, ...]`` from ``(positions, local, scale, mask, gram)`` parts
    (each ``[n, w, ...]``), ``W`` the widest: in the parts' stored dtypes, or with ``widen`` as the scorer
    reads them (:class:`~mssan_infer.gallery.base.Candidates`: float32, or int8 codes and their float16
    Grams as stored). Padding is zero (int8 codes: 128, a zero value, with scale 0)."""
    width = max([1] + [p[3].shape[1] for p in parts])
    ref = parts[0] if parts else None
    ldt = ref[1].dtype if ref is not None else np.dtype(np.float32)
    gdt = ref[4].dtype if ref is not None else np.dtype(np.float32)
    with_scale = ref is not None and ref[2] is not None
    if any(p[1].dtype != ldt or p[4].dtype != gdt or (p[2] is not None) != with_scale for p in parts):
        raise IndexFileError("the gallery's points hold rerank inputs of two storage formats; rebuild it")
    if widen and not with_scale:
        gdt = np.dtype(np.float32)
    if len(parts) == 1 and parts[0][3].shape == (k, width) and np.array_equal(parts[0][0], np.arange(k)):
        _, lo, sc, ma, gr = parts[0]  # one part in order: no second copy
        return lo.astype(ldt, copy=False), sc, ma, gr.astype(gdt, copy=False)
    # not zeroed: every row is written once, its padding below
    local = np.empty((k, width, d), ldt)
    scale = np.empty((k, width), np.float32) if with_scale else None
    mask = np.empty((k, width), np.float32)
    gram = np.empty((k, width, width), gdt)
    for rows, lo, sc, ma, gr in parts:
        w = ma.shape[1]
        # one item (a decoded payload): plain indexing, no fancy-index machinery
        pos: Any = slice(int(rows[0]), int(rows[0]) + 1) if len(rows) == 1 else rows
        local[pos, :w] = lo
        mask[pos, :w] = ma
        gram[pos, :w, :w] = gr
        if scale is not None and sc is not None:
            scale[pos, :w] = sc
        if w < width:
            local[pos, w:] = 128 if ldt == np.uint8 else 0  # int8 codes: 128 is a zero value
            mask[pos, w:] = 0
            gram[pos, w:] = 0
            gram[pos, :w, w:] = 0
            if scale is not None:
                scale[pos, w:] = 0
    return local, scale, mask, gram


class LocalsCache:
    """A folder of memory-mapped segments of rerank inputs keyed by ``(point id, content hash)``; any number
    of processes may share it (see the module docstring).

    Args:
        folder: the cache folder of one collection (made when missing).
        local_dim: ``D``.
    """

    def __init__(self, folder: Path, local_dim: int) -> None:
        self.folder = Path(folder)
        self.local_dim = int(local_dim)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: dict[tuple[str, str], tuple[str, int]] = {}  # (pid, hash) -> (segment, row)
        self._known: set[str] = set()
        self._open: dict[str, Stored] = {}
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def refresh(self) -> int:
        """Pick up the segments written since (by any process); returns how many were new."""
        with self._lock:
            names = [p for p in os.listdir(self.folder) if p.startswith("seg-") and p not in self._known]
            for name in names:
                try:
                    keys = json.loads((self.folder / name / _KEYS).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # unreadable: never used, the server has the items
                for row, key in enumerate(keys):
                    self._index[(str(key[0]), str(key[1]))] = (name, row)
                self._known.add(name)
            return len(names)

    def lookup(self, keys: Sequence[tuple[str, str]]) -> list[tuple[str, int] | None]:
        index = self._index
        return [index.get(k) for k in keys]

    def put(self, keys: Sequence[tuple[str, str]], rows: Stored) -> str:
        """Keep ``rows`` (stored ``local [N, P, D]``, ``scale``, ``mask``, ``gram``) under ``keys`` as one
        segment, renamed into place only when complete; returns its name."""
        local, scale, mask, gram = rows
        name = f"seg-{uuid.uuid4().hex}"
        tmp = self.folder / f".{name}.tmp"
        tmp.mkdir()
        try:
            write_arrays(tmp, local, scale, mask, gram)
            (tmp / _KEYS).write_text(json.dumps([list(k) for k in keys]), encoding="utf-8")
            fsync_dir(tmp)
            os.replace(tmp, self.folder / name)
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            for row, key in enumerate(keys):
                self._index[key] = (name, row)
            self._known.add(name)
        return name

    def _segment(self, name: str) -> Stored:
        """The arrays of segment ``name``. Raises OSError/ValueError when they cannot be read."""
        seg = self._open.get(name)
        if seg is None:
            d = self.folder / name

            def load(f: str) -> np.ndarray:
                # a plain ndarray over the mapping: np.memmap's slicing costs more than the copy
                return np.asarray(np.load(d / f, mmap_mode="r", allow_pickle=False))

            scale = load("scale.npy") if (d / "scale.npy").is_file() else None
            seg = (load("local.npy"), scale, load("mask.npy"), load("gram.npy"))
            with self._lock:
                self._open[name] = seg
        return seg

    def _forget(self, name: str) -> None:
        """Stop using segment ``name`` in this process (its entries become misses)."""
        with self._lock:
            self._index = {k: v for k, v in self._index.items() if v[0] != name}
            self._open.pop(name, None)

    def parts(self, locs: Sequence[tuple[int, tuple[str, int]]]) -> tuple[list[Part], list[int]]:
        """``(positions, local, scale, mask, gram)`` per segment for ``(position, (segment, row))`` pairs:
        one fancy-indexed copy per segment and array, trimmed to the rows' real length; and the positions
        whose segment cannot be read (forgotten: the caller fetches them again)."""
        by_seg: dict[str, list[tuple[int, int]]] = {}
        for at, (name, row) in locs:
            by_seg.setdefault(name, []).append((at, row))
        out: list[Part] = []
        failed: list[int] = []
        for name, members in by_seg.items():
            pos = np.array([p for p, _ in members], np.int64)
            rows = np.array([r for _, r in members], np.int64)
            try:
                local, scale, mask, gram = self._segment(name)
                if rows.max() >= min(len(local), len(mask), len(gram)):
                    raise ValueError(f"{len(local)} rows")
            except (OSError, ValueError) as e:
                log.warning(
                    "Qdrant locals cache segment %s unreadable (%s): fetching its items again", name, e
                )
                self._forget(name)
                failed += pos.tolist()
                continue
            m = mask[rows]
            w = _width(m)
            sc = scale[rows, :w] if scale is not None else None
            out.append((pos, local[rows, :w], sc, m[:, :w], gram[rows, :w, :w]))
        return out, failed

    def close(self) -> None:
        with self._lock:
            self._open.clear()


class ServerLocals:
    """The rerank inputs of one server collection: encoded into payloads at ``add``, gathered for a search
    from the payloads stage 1 returned (no cache) or through a :class:`LocalsCache`.

    Args:
        storage: ``"float32"`` or ``"int8"`` (:func:`~mssan_infer.gallery.storage.store_locals`).
        local_dim: ``D``.
        cache: the collection's cache folder, or None.
        fetch: point ids -> ``{point id: payload holding mssan_lb and mssan_lh}`` from the server (the ids it
            no longer holds are left out).
        where: what messages call the collection.
    """

    def __init__(
        self,
        storage: str,
        local_dim: int,
        cache: Path | None,
        fetch: Callable[[list[str]], Mapping[str, Mapping[str, Any]]],
        where: str = "the Qdrant collection",
    ) -> None:
        self.storage, self.local_dim, self.where = storage, int(local_dim), where
        self.cache = LocalsCache(cache, local_dim) if cache is not None else None
        self._fetch = fetch
        self.fetched = 0  # candidates fetched from the server on a cache miss (for tests and the bench)

    def encode(
        self, pids: Sequence[str], local: np.ndarray, mask: np.ndarray, gram: np.ndarray
    ) -> list[dict]:
        """The payload entries (``mssan_lb``, ``mssan_lh``) of a checked float32 batch (``local [N, P, D]``,
        ``mask [N, P]``, ``gram [N, P, P]``); with a cache, the batch is kept in it first."""
        lo, sc, gr = store_locals(self.storage, local, gram)
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        out, keys = [], []
        for j, pid in enumerate(pids):
            w = _width(mask[j : j + 1])
            blob, digest = pack(lo[j, :w], sc[j, :w] if sc is not None else None, mask[j, :w], gr[j, :w, :w])
            out.append({PAYLOAD: blob, HASH: digest})
            keys.append((pid, digest))
        if self.cache is not None:
            self.cache.put(keys, (lo, sc, mask, gr))
        return out

    def gather(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> Candidates:
        """The rerank inputs of the candidates ``(point id, payload from stage 1)`` as the layout stores them
        (:class:`~mssan_infer.gallery.base.Candidates`), trimmed to the longest among them.

        Raises:
            IndexFileError: a candidate was removed from the server while the search ran (search again), or
                a payload is not mssan rerank inputs.
        """
        k, d = len(items), self.local_dim
        if self.cache is None:
            return Candidates(*_assemble(self._decoded([pl for _, pl in items]), k, d, widen=True))
        cache = self.cache
        keys = [(pid, str(pl.get(HASH))) for pid, pl in items]
        locs = cache.lookup(keys)
        missing = [j for j, loc in enumerate(locs) if loc is None]
        if missing and cache.refresh():  # segments another process wrote
            locs = cache.lookup(keys)
            missing = [j for j, loc in enumerate(locs) if loc is None]
        parts, failed = cache.parts([(j, loc) for j, loc in enumerate(locs) if loc is not None])
        missing = sorted(missing + failed)
        if missing:
            parts.append(self._fill(missing, [keys[j][0] for j in missing]))
        return Candidates(*_assemble(parts, k, d, widen=True))

    def _decoded(self, payloads: Sequence[Mapping[str, Any]]) -> list[Part]:
        """One part per payload (its decoded ``mssan_lb``), at positions ``0, 1, ...``."""
        out: list[Part] = []
        for j, pl in enumerate(payloads):
            lo, sc, ma, gr = unpack(pl.get(PAYLOAD), self.local_dim)
            out.append((np.array([j]), lo[None], None if sc is None else sc[None], ma[None], gr[None]))
        return out

    def _fill(self, pos: list[int], pids: list[str]) -> Part:
        """Fetch the missing candidates from the server, keep them in the cache, return them as one part."""
        assert self.cache is not None
        got = self._fetch(list(dict.fromkeys(pids)))
        gone = [p for p in pids if p not in got]
        if gone:
            raise IndexFileError(
                f"{len(gone)} candidate(s) were removed from {self.where} while this search ran; search again"
            )
        self.fetched += len(pids)
        rows = _assemble(self._decoded([got[p] for p in pids]), len(pids), self.local_dim)
        self.cache.put([(p, str(got[p].get(HASH))) for p in pids], rows)
        return (np.array(pos), *rows)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
