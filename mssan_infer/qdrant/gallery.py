"""Galleries kept in Qdrant: Qdrant Edge shards in-process, or collections on a Qdrant server/cluster.

One point per item, in the bundle's layout:

- ``stage1``: the stage-1 vector (dense, dot product), optionally int8 scalar-quantized with
  rescoring from the original vectors;
- the rerank inputs (locals, mask, Gram): on a Qdrant Edge shard, memory-mapped segments beside it
  (:mod:`mssan_infer.qdrant.locals`, in the in-memory gallery's storage formats; ``mssan_loc`` in the
  payload addresses the item's row), read as arrays; on a server, a binary payload ``mssan_lb`` in
  the same storage formats, with its content hash ``mssan_lh``, read through an optional cache on the
  query node (:mod:`mssan_infer.qdrant.server_locals`), the server staying the one source of truth;
- payload: ``mssan_id`` (the item id, str or int), ``mssan_seq`` (insertion order, which breaks
  score ties as the in-memory gallery's rows do), ``mssan_loc`` (Edge),
  ``mssan_text`` (a caption's text) and ``mssan_source`` (an image's source path) when the item has
  them, and the user's metadata (filterable with ``where=``; its keys never start with ``mssan_``).

The point id is a UUID derived from the item id, so any process can find, test or remove an item
without a lookup table. The bundle id, dims and layout are
recorded with the gallery (a ``mssan_gallery.json`` beside an Edge shard; the collection's metadata
on a server), and a gallery built with another bundle or layout is refused.

``qdrant_edge`` and ``qdrant_client`` are imported only when such a gallery is opened.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Executor
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.base import (
    Candidates,
    ItemId,
    ItemRecord,
    check_encoded,
    check_id,
    check_labels,
    new_ids,
)
from mssan_infer.gallery.filters import RESERVED_PREFIX, Where, check_metadata, parse_where
from mssan_infer.qdrant.locals import STORAGE_OF, SidecarLocals
from mssan_infer.qdrant.options import QdrantOptions
from mssan_infer.qdrant.stores import ClientStore, EdgeStore, Store

__all__ = [
    "QdrantGallery",
    "QdrantView",
    "point_id",
    "copy_gallery",
    "user_metadata",
]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b2c2f5e-6a4e-4f3c-9a43-3c1f0b7de1a1")  # point ids of mssan items
_ID, _SEQ = "mssan_id", "mssan_seq"
_TEXT, _SOURCE = "mssan_text", "mssan_source"
_LOC = "mssan_loc"  # Edge: [segment, row] of the item's rerank inputs beside the shard
_BATCH = 256  # points per upsert / retrieve request


def user_metadata(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The user's metadata in a point's payload (every key not starting ``mssan_``; ``None`` when none)."""
    return {k: v for k, v in payload.items() if not k.startswith(RESERVED_PREFIX)} or None


def point_id(item_id: ItemId) -> str:
    """The Qdrant point id of an item: a UUID from the id's type and value (``"7"`` and ``7`` differ)."""
    return str(uuid.uuid5(_NAMESPACE, f"{'i' if isinstance(item_id, int) else 's'}:{item_id}"))


class QdrantGallery:
    """A :class:`~mssan_infer.gallery.base.Gallery` kept in Qdrant
    (see the module docstring for the point layout).

    Thread-safe: Qdrant orders concurrent writes; a lock keeps each ``add``'s id checks and
    upsert together within this process. Searches do not take the lock.
    """

    def __init__(self, store: Store, stage1_dim: int, local_dim: int, options: QdrantOptions) -> None:
        self._store = store
        self.stage1_dim, self.local_dim, self.options = int(stage1_dim), int(local_dim), options
        # Edge: the rerank inputs are arrays beside the shard; a server keeps them as payload
        self._server = store.locals if isinstance(store, ClientStore) else None
        self._sidecar = (
            SidecarLocals(store.path, local_dim, STORAGE_OF[options.local_dtype])
            if isinstance(store, EdgeStore)
            else None
        )
        # an Edge shard belongs to this process: its size is counted once, then kept (a server's is asked)
        self._n: int | None = store.count() if self._sidecar is not None else None
        self._lock = threading.Lock()
        self._seq = time.time_ns()

    @property
    def where(self) -> str:
        return self._store.where

    def __len__(self) -> int:
        return self._n if self._n is not None else self._store.count()

    def __contains__(self, item_id: object) -> bool:
        try:
            pid = point_id(check_id(item_id))
        except InputError:
            return False
        return pid in self._store.present([pid])

    def _ordered_payloads(self) -> list[dict[str, Any]]:
        return sorted(self._store.payloads(), key=lambda p: (p.get(_SEQ, 0), str(p.get(_ID))))

    @property
    def ids(self) -> list[ItemId]:
        """A copy of the ids, in insertion order (reads every point's payload)."""
        return [p[_ID] for p in self._ordered_payloads() if _ID in p]

    def next_ids(self, count: int) -> list[int]:
        """``count`` fresh integer ids (one more than the largest int id, counting up; reads every
        payload)."""
        ints = [i for i in self.ids if isinstance(i, int)]
        start = max(ints) + 1 if ints else 0
        return list(range(start, start + count))

    def _present_ids(self, ids: list[ItemId]) -> list[ItemId]:
        found: set[str] = set()
        pids = [point_id(i) for i in ids]
        for a in range(0, len(pids), _BATCH):
            found |= self._store.present(pids[a : a + _BATCH])
        return [i for i, p in zip(ids, pids) if p in found]

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
        """Upsert encoded items as points (all or nothing for bad input; Qdrant acknowledges each batch).

        ``texts`` and ``sources`` (one str or None per item) are kept in the payload and returned with hits.

        Raises:
            InputError: shapes, NaN/inf, bad, duplicate or present ids, bad metadata, texts or sources.
        """
        stage1, local, mask, gram = check_encoded(stage1, local, mask, gram, self.stage1_dim, self.local_dim)
        n = stage1.shape[0]
        meta = check_metadata(metadata, n)
        text = check_labels(texts, n, "texts")
        source = check_labels(sources, n, "sources")
        with self._lock:
            new = self.next_ids(n) if ids is None else new_ids(ids, n, self._present_ids)
            # Edge: the rerank inputs are durable beside the shard before any point refers to them
            seg = self._sidecar.write(local, mask, gram) if self._sidecar is not None else -1
            pids = [point_id(i) for i in new]
            server = self._server.encode(pids, local, mask, gram) if self._server is not None else None
            points = []
            for j in range(n):
                self._seq += 1
                payload: dict[str, Any] = {**(meta[j] or {}), _ID: new[j], _SEQ: self._seq}
                if server is not None:
                    payload.update(server[j])
                else:
                    payload[_LOC] = [seg, j]
                if text[j] is not None:
                    payload[_TEXT] = text[j]
                if source[j] is not None:
                    payload[_SOURCE] = source[j]
                points.append((pids[j], stage1[j], None, payload))
            for a in range(0, n, _BATCH):
                part = points[a : a + _BATCH]
                self._store.upsert(part)
                if self._n is not None:
                    self._n += len(part)
        return list(new)

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id (all or nothing). Raises InputError for an unknown id."""
        drop = list(dict.fromkeys(check_id(i) for i in ids))
        with self._lock:
            known = set(self._present_ids(drop))
            unknown = [i for i in drop if i not in known]
            if unknown:
                raise InputError(
                    f"unknown ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; nothing was removed"
                )
            if drop:
                self._store.delete([point_id(i) for i in drop])
                if self._n is not None:
                    self._n -= len(drop)

    def flush(self) -> None:
        """Make every acknowledged change durable (Edge: flush the shard; a server already has)."""
        self._store.flush()

    def close(self) -> None:
        if self._sidecar is not None:
            self._sidecar.close()
        self._store.close()

    def view(self) -> "QdrantView":
        return QdrantView(self)


class QdrantView:
    """One search's view of a Qdrant gallery: stage 1 fetches the candidates' locals in the same request,
    so the rerank sees the items exactly as stage 1 found them."""

    def __init__(self, gallery: QdrantGallery) -> None:
        self._g = gallery
        self._n = len(gallery)
        self._rows: dict[str, int] = {}  # point id -> row of this view
        self._items: list[tuple[ItemId, dict[str, Any], Any]] = []  # (id, payload, stored locals)

    @property
    def n(self) -> int:
        return self._n

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemId]:
        return [self._items[int(r)][0] for r in rows]

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemRecord]:
        """Ids, texts, sources and metadata of ``rows``, from the payloads stage 1 fetched (no request)."""
        out = []
        for r in rows:
            item_id, payload, _ = self._items[int(r)]
            text, source = payload.get(_TEXT), payload.get(_SOURCE)
            out.append(
                ItemRecord(
                    item_id,
                    text if isinstance(text, str) else None,
                    source if isinstance(source, str) else None,
                    user_metadata(payload),
                )
            )
        return out

    def topk(self, queries: np.ndarray, k: int, where: Where | None = None) -> tuple[np.ndarray, np.ndarray]:
        conditions = parse_where(where)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), max(self._n, 1))
        # in the stage-1 response only from a server without a cache on this node
        with_locals = self._g._server is not None and self._g._server.cache is None
        found = [
            self._g._store.query(q[i], k, conditions, with_locals=with_locals) for i in range(q.shape[0])
        ]
        # rows in insertion order (mssan_seq, then point id), so ties break as in the in-memory gallery
        new = {pid: (pl, lo) for res in found for pid, _, pl, lo in res if pid not in self._rows}
        for pid in sorted(new, key=lambda p: (new[p][0].get(_SEQ, 0), p)):
            pl, lo = new[pid]
            self._rows[pid] = len(self._items)
            self._items.append((check_id(pl.get(_ID)), pl, lo))
        width = min(len(res) for res in found) if found else 0
        rows = np.zeros((len(found), width), np.int64)
        scores = np.zeros((len(found), width), np.float32)
        for i, res in enumerate(found):
            r = np.array([self._rows[pid] for pid, _, _, _ in res], np.int64)
            s = np.array([score for _, score, _, _ in res], np.float32)
            order = np.lexsort((r, -s))[:width]
            rows[i], scores[i] = r[order], s[order]
        return rows, scores

    def gather(
        self,
        rows: np.ndarray,
        executor: Executor | None = None,
        parts: int = 1,
        *,
        query: np.ndarray | None = None,
    ) -> Candidates:
        """Locals (never their similarities: ``query`` is not used), masks and Grams of ``rows``, read from
        the sidecar or the server's payloads."""
        if self._g._sidecar is not None:
            return self._g._sidecar.gather([self._items[int(r)][1].get(_LOC) for r in rows])
        assert self._g._server is not None
        items = [self._items[int(r)] for r in rows]
        return self._g._server.gather([(point_id(i), pl) for i, pl, _ in items])


def copy_gallery(src: QdrantGallery, dst: QdrantGallery, batch: int = _BATCH) -> int:
    """Copy every item of ``src`` (e.g. an Edge shard) into ``dst`` (e.g. a server collection), ids,
    metadata, texts, sources and insertion order included: the way a gallery built on one machine moves up
    to a shared server. Returns the number of items copied.

    Raises:
        InputError: ids already in ``dst`` (checked before anything is written) or other dims.
    """
    if (src.stage1_dim, src.local_dim) != (dst.stage1_dim, dst.local_dim):
        raise InputError(f"{src.where} and {dst.where} hold vectors of different sizes")
    ids = src.ids
    clash = dst._present_ids(ids)
    if clash:
        raise InputError(f"ids already in {dst.where}: {clash[:5]}; nothing was copied")
    for a in range(0, len(ids), batch):
        part = ids[a : a + batch]
        records = src._store.fetch([point_id(i) for i in part])
        stage1 = np.stack([np.asarray(s1, np.float32) for s1, _, _ in records])
        payloads = [pl for _, _, pl in records]
        if src._sidecar is not None:
            got = src._sidecar.gather([pl.get(_LOC) for pl in payloads])
            local, mask = got.dequantized()[0], got.mask
        else:
            assert src._server is not None
            got = src._server.gather([(point_id(i), pl) for i, pl in zip(part, payloads)])
            local, mask = got.dequantized()[0], got.mask
        gram = np.matmul(local, local.transpose(0, 2, 1))
        dst.add(
            stage1,
            local,
            mask,
            gram,
            ids=part,
            metadata=[user_metadata(pl) for pl in payloads],
            texts=[pl.get(_TEXT) for pl in payloads],
            sources=[pl.get(_SOURCE) for pl in payloads],
        )
    return len(ids)
