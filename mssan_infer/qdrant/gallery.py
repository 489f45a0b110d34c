"""Galleries kept in Qdrant: Qdrant Edge shards in-process, or collections on a Qdrant server/cluster.

One point per item, in the bundle's layout:

- ``stage1``: the stage-1 vector (dense, dot product), optionally int8 scalar-quantized with
  rescoring from the original vectors;
- the rerank inputs (locals, mask, Gram): on a Qdrant Edge shard, memory-mapped segments beside it
  (:mod:`mssan_infer.qdrant.locals`, in the in-memory gallery's storage formats; ``mssan_loc`` in the
  payload addresses the item's row), read as arrays; on a server, the locals as a multivector ``local``
  (only the real regions/words, no HNSW graph on it, float32, float16 or uint8 with a per-vector scale
  in the payload), the server staying the one source of truth;
- payload: ``mssan_id`` (the item id, str or int), ``mssan_seq`` (insertion order, which breaks
  score ties as the in-memory gallery's rows do), ``mssan_scale`` (a server's uint8 locals),
  ``mssan_loc`` (Edge),
  ``mssan_text`` (a caption's text) and ``mssan_source`` (an image's source path) when the item has
  them, and the user's metadata (filterable with ``where=``; its keys never start with ``mssan_``).

The point id is a UUID derived from the item id, so any process can find, test or remove an item
without a lookup table. On a server the Gram matrices are recomputed from the fetched locals at
rerank time (``local @ local.T`` over the candidates); an Edge gallery stores them beside the locals.
The bundle id, dims and layout are
recorded with the gallery (a ``mssan_gallery.json`` beside an Edge shard; the collection's metadata
on a server), and a gallery built with another bundle or layout is refused.

``qdrant_edge`` and ``qdrant_client`` are imported only when such a gallery is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.files import recover_swap, swap_in
from mssan_infer.gallery.base import ItemId, ItemRecord, check_encoded, check_id, check_labels, new_ids
from mssan_infer.gallery.filters import RESERVED_PREFIX, Where, check_metadata, parse_where
from mssan_infer.qdrant.locals import FOLDER, STORAGE_OF, SidecarLocals
from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions, QdrantServer
from mssan_infer.qdrant.stores import META_FILE, ClientStore, EdgeStore, Store, import_client

__all__ = [
    "QdrantGallery",
    "QdrantView",
    "open_qdrant_galleries",
    "missing_qdrant_galleries",
    "replacing_qdrant_galleries",
    "point_id",
    "copy_gallery",
    "user_metadata",
]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b2c2f5e-6a4e-4f3c-9a43-3c1f0b7de1a1")  # point ids of mssan items
_ID, _SEQ, _SCALE = "mssan_id", "mssan_seq", "mssan_scale"
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
        # Edge: the rerank inputs are arrays beside the shard; a server keeps them as multivectors
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

    def _encode_local(self, local: np.ndarray) -> tuple[Any, list[float] | None]:
        """One item's real locals ``[P, D]`` in the storage dtype (and per-vector scales for uint8)."""
        if self.options.local_dtype != "uint8":
            return local.astype(np.float32), None
        scale = np.maximum(np.abs(local).max(1), 1e-12).astype(np.float32)  # [P]
        q = np.rint(local / scale[:, None] * 127.0) + 128.0
        return np.clip(q, 0, 255).astype(np.float32), scale.tolist()

    def decode_local(self, stored: Any, payload: Mapping[str, Any]) -> np.ndarray:
        """Locals ``[P, D]`` float32 from what Qdrant returns."""
        arr = np.asarray(stored, dtype=np.float32).reshape(-1, self.local_dim)
        if self.options.local_dtype == "uint8":
            scale = np.asarray(payload.get(_SCALE, []), np.float32)
            if scale.shape != (arr.shape[0],):
                raise IndexFileError(
                    f"{self.where}: a point's uint8 locals have no matching scales; rebuild it"
                )
            arr = (arr - 128.0) * (scale[:, None] / 127.0)
        return arr

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
            points = []
            for j in range(n):
                self._seq += 1
                payload: dict[str, Any] = {**(meta[j] or {}), _ID: new[j], _SEQ: self._seq}
                stored: Any = None
                if self._sidecar is not None:
                    payload[_LOC] = [seg, j]
                else:
                    stored, scale = self._encode_local(local[j][mask[j] > 0])  # [P_j, D]
                    if scale is not None:
                        payload[_SCALE] = scale
                if text[j] is not None:
                    payload[_TEXT] = text[j]
                if source[j] is not None:
                    payload[_SOURCE] = source[j]
                points.append((point_id(new[j]), stage1[j], stored, payload))
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
        with_locals = self._g._sidecar is None  # Edge reads them from the arrays beside the shard
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
        self, rows: np.ndarray, executor: Executor | None = None, parts: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._g._sidecar is not None:
            return self._g._sidecar.gather([self._items[int(r)][1].get(_LOC) for r in rows])
        items = [self._g.decode_local(self._items[int(r)][2], self._items[int(r)][1]) for r in rows]
        width = max([1] + [x.shape[0] for x in items])
        local = np.zeros((len(items), width, self._g.local_dim), np.float32)
        mask = np.zeros((len(items), width), np.float32)
        for j, x in enumerate(items):
            local[j, : x.shape[0]] = x
            mask[j, : x.shape[0]] = 1.0
        gram = np.matmul(local, local.transpose(0, 2, 1))  # [K, P, P]
        return local, mask, gram


# ---- opening ------------------------------------------------------------------------------------
def _check_meta(meta: dict[str, Any], want: dict[str, Any], where: str) -> None:
    if meta.get("bundle_id") != want["bundle_id"]:
        raise IndexFileError(
            f"{where} was built with bundle {meta.get('bundle_id')}, but the loaded bundle is "
            f"{want['bundle_id']}; "
            "its vectors would not match. Use another path/collection or rebuild it with this bundle."
        )
    for key in ("gallery", "stage1_dim", "local_dim", "layout"):
        if meta.get(key) != want[key]:
            raise IndexFileError(
                f"{where} holds {key} {meta.get(key)!r}, but it was opened with {want[key]!r}; open it with "
                "the "
                "options it was built with, or rebuild it"
            )


_EDGE_CONFIG = "edge_config.json"  # what makes a folder a Qdrant Edge shard (EdgeStore loads it)


_CLIENTS: dict[tuple[str, str | None, bool], Any] = {}  # one client per server and settings, per process
_CLIENTS_LOCK = threading.Lock()


def _server_client(spec: QdrantServer) -> Any:
    """The spec's ``qdrant_client`` client: its own, or the one this process keeps for its url and settings
    (made on first use, shared by every gallery and command on that server, never one per call)."""
    if spec.client is not None:
        return spec.client
    if not spec.url:
        raise InputError("QdrantServer needs url= (e.g. 'http://localhost:6333') or client=")
    key = (spec.url, spec.api_key, spec.prefer_grpc)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            qc = import_client("qdrant_client", "qdrant-client")
            _CLIENTS[key] = qc.QdrantClient(url=spec.url, api_key=spec.api_key, prefer_grpc=spec.prefer_grpc)
        return _CLIENTS[key]


def _aliases(client: Any) -> dict[str, str]:
    """Alias -> collection of every alias on the server."""
    return {a.alias_name: a.collection_name for a in client.get_aliases().aliases}


def _collection_of(client: Any, name: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """The collection a gallery name resolves to (its alias's, or the collection of that name), or None."""
    aliases = _aliases(client) if aliases is None else aliases
    if name in aliases:
        return aliases[name]
    return name if client.collection_exists(name) else None


def missing_qdrant_galleries(
    spec: QdrantEdge | QdrantServer, names: Sequence[str], *, client: Any = None
) -> list[str]:
    """The names among ``names`` that have no gallery in ``spec`` yet. Creates nothing (Edge: galleries a
    killed ``--overwrite`` left aside are put back first).

    Raises:
        BackendUnavailableError: the client package of a server is not installed.
    """
    if isinstance(spec, QdrantEdge):
        recover_swap(Path(spec.path))  # galleries a killed --overwrite left aside are put back first
        return [n for n in names if not (Path(spec.path) / n / _EDGE_CONFIG).is_file()]
    client = _server_client(spec) if client is None else client
    aliases = _aliases(client)
    return [n for n in names if _collection_of(client, f"{spec.prefix}_{n}", aliases) is None]


def _gallery_place(spec: QdrantEdge | QdrantServer, name: str) -> str:
    if isinstance(spec, QdrantEdge):
        return f"Qdrant Edge shard {Path(spec.path) / name}"
    return f"Qdrant collection {spec.prefix + '_' + name!r}"


def open_qdrant_galleries(
    spec: QdrantEdge | QdrantServer,
    names: Sequence[str],
    stage1_dim: int,
    local_dim: int,
    bundle_id: str,
) -> dict[str, QdrantGallery]:
    """Open one Qdrant gallery per name for a bundle (with ``spec.create``, making the missing ones).

    A gallery on a server is made as a collection ``{prefix}_{name}_{random}`` under the alias
    ``{prefix}_{name}``, so that :func:`replacing_qdrant_galleries` can later switch the name to a new
    collection in one step.

    Raises:
        IndexFileError: a gallery built with another bundle or layout, one that cannot be opened, or (without
            ``spec.create``) one that does not exist.
        BackendUnavailableError: the Qdrant package is not installed.
    """
    out: dict[str, QdrantGallery] = {}
    client = _server_client(spec) if isinstance(spec, QdrantServer) else None
    if isinstance(spec, QdrantEdge):
        recover_swap(Path(spec.path))  # galleries a killed --overwrite left aside are put back first
    if not spec.create:
        missing = missing_qdrant_galleries(spec, names, client=client)
        if missing:
            raise IndexFileError(
                f"no mssan gallery at {', '.join(_gallery_place(spec, n) for n in missing)}, and none was "
                "created: check the path (or URL and prefix), or index items into it first"
            )
    aliases = _aliases(client) if client is not None else {}
    try:
        for name in names:
            out[name] = _open_one(spec, client, aliases, name, stage1_dim, local_dim, bundle_id)
    except BaseException:
        for g in out.values():  # the galleries opened before the one that failed
            g.close()
        raise
    return out


def _open_one(
    spec: QdrantEdge | QdrantServer,
    client: Any,
    aliases: Mapping[str, str],
    name: str,
    stage1_dim: int,
    local_dim: int,
    bundle_id: str,
) -> QdrantGallery:
    """One gallery of :func:`open_qdrant_galleries` (made when missing and ``spec.create``)."""
    opts = spec.options
    want = {
        "format": "mssan-qdrant-gallery",
        "bundle_id": bundle_id,
        "gallery": name,
        "stage1_dim": stage1_dim,
        "local_dim": local_dim,
        # Edge keeps the rerank inputs beside the shard: a shard that kept them as multivectors is refused
        "layout": {**opts.layout(), "rerank_inputs": FOLDER}
        if isinstance(spec, QdrantEdge)
        else opts.layout(),
    }
    store: Store
    if isinstance(spec, QdrantEdge):
        store = EdgeStore(Path(spec.path) / name, stage1_dim, local_dim, opts)
        try:
            meta = store.read_meta()
            if meta is None:
                if store.count():
                    raise IndexFileError(
                        f"{store.where} holds points but no {META_FILE}; it is not an mssan gallery"
                    )
                store.write_meta(want)
            else:
                _check_meta(meta, want, store.where)
        except BaseException:
            store.close()
            raise
        return QdrantGallery(store, stage1_dim, local_dim, opts)
    assert client is not None
    alias = f"{spec.prefix}_{name}"
    target = _collection_of(client, alias, aliases)
    if target is None:
        target = f"{alias}_{uuid.uuid4().hex[:12]}"
        ClientStore(client, target, stage1_dim, local_dim, opts).create(want)
        try:
            client.update_collection_aliases(
                change_aliases_operations=[_alias_op(client, "create", alias, target)]
            )
        except BaseException:
            client.delete_collection(target)  # no orphan collection without its alias
            raise
    else:
        meta = ClientStore(client, target, stage1_dim, local_dim, opts).read_meta()
        if meta is None or meta.get("format") != "mssan-qdrant-gallery":
            raise IndexFileError(
                f"Qdrant collection {alias!r} exists but is not an mssan gallery; choose another prefix"
            )
        _check_meta(meta, want, f"Qdrant collection {alias!r}")
    # the alias, not the collection: it follows a replace
    return QdrantGallery(ClientStore(client, alias, stage1_dim, local_dim, opts), stage1_dim, local_dim, opts)


def _collections(client: Any) -> list[str]:
    return [c.name for c in client.get_collections().collections]


def _delete_staged(client: Any, prefix: str) -> None:
    """Delete what a replace built under ``prefix`` (collections with or without their alias yet)."""
    for collection in _collections(client):
        if collection.startswith(f"{prefix}_"):
            client.delete_collection(collection)


def _alias_op(client: Any, kind: str, alias: str, collection: str = "") -> Any:
    """One ``update_collection_aliases`` operation: ``create`` alias -> collection, or ``delete`` alias."""
    from qdrant_client import models

    if kind == "create":
        return models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
        )
    return models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))


def _edge_folder_holds_only_galleries(root: Path) -> list[str]:
    """What else than Qdrant Edge galleries ``root`` holds (names), for a refusal to replace it."""
    others = []
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() and not entry.is_symlink() and (entry / _EDGE_CONFIG).is_file()):
            others.append(entry.name)
    return others


@contextlib.contextmanager
def replacing_qdrant_galleries(
    spec: QdrantEdge | QdrantServer, names: Sequence[str]
) -> Iterator[QdrantEdge | QdrantServer]:
    """A new, empty place to build galleries that then replace the galleries ``names`` of ``spec`` at once.

    Build the new galleries in the yielded spec and close everything opened there before the block ends.
    When it ends without an error, the new galleries take the old ones' place; on an error they are
    deleted and the old ones are untouched.

    - Qdrant Edge: the new shards are built in a temp folder beside ``spec.path`` and the two folders are
      exchanged in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, and a crash
      between them leaves the previous galleries beside the path as ``.NAME.old-*``). ``spec.path`` must
      hold nothing but Qdrant Edge galleries (it is replaced as a whole).
    - A server: the new collections get temporary aliases; one alias update then points every
      ``{prefix}_{name}`` at its new collection (Qdrant applies the operations of one update together), and
      the old collections are deleted. A plain collection (no alias) under a gallery's name is refused
      before anything is built: it was not made by this mssan_infer.

    Raises:
        InputError: ``spec.path`` holds other things than galleries, or is not a folder.
        IndexFileError / IndexWriteError: the swap failed (the old galleries are kept).
    """
    if isinstance(spec, QdrantEdge):
        with _replacing_edge(spec) as edge:
            yield edge
        return
    client = _server_client(spec)
    aliases = _aliases(client)
    plain = [f"{spec.prefix}_{n}" for n in names if f"{spec.prefix}_{n}" not in aliases]
    plain = [c for c in plain if client.collection_exists(c)]
    if plain:
        raise IndexFileError(
            f"Qdrant collection(s) {plain} are not mssan galleries made by this version (no alias); delete "
            "them or choose another prefix"
        )
    token = uuid.uuid4().hex[:8]
    staged = dataclasses.replace(spec, client=client, prefix=f"{spec.prefix}_new{token}")
    try:
        yield staged
        aliases = _aliases(client)
        ops, old = [], []
        for name in names:
            final, temp = f"{spec.prefix}_{name}", f"{staged.prefix}_{name}"
            if temp not in aliases:
                raise IndexFileError(f"the new Qdrant gallery {temp!r} was not built; nothing was replaced")
            ops.append(_alias_op(client, "delete", temp))
            if final in aliases:
                ops.append(_alias_op(client, "delete", final))
                old.append(aliases[final])
            ops.append(_alias_op(client, "create", final, aliases[temp]))
    except BaseException:
        _delete_staged(client, staged.prefix)
        raise
    try:
        client.update_collection_aliases(change_aliases_operations=ops)
    except Exception as e:
        built = sorted(c for c in _collections(client) if c.startswith(f"{staged.prefix}_"))
        raise IndexFileError(
            f"the new galleries were built in Qdrant collections {built} but moving the names "
            f"{[f'{spec.prefix}_{n}' for n in names]} onto them failed ({e}); the old galleries are as they "
            "were unless the server applied the update: check the aliases, then delete the collections "
            "that no alias names"
        ) from e
    still = set(_aliases(client).values())
    for collection in old:
        if collection not in still:
            client.delete_collection(collection)


@contextlib.contextmanager
def _replacing_edge(spec: QdrantEdge) -> Iterator[QdrantEdge]:
    root = Path(spec.path)
    recover_swap(root)  # the previous galleries, when a replace was killed between two renames
    if root.exists():
        if not root.is_dir():
            raise InputError(f"{root} is not a folder of Qdrant Edge galleries; choose another path")
        others = _edge_folder_holds_only_galleries(root)
        if others:
            raise InputError(
                f"{root} holds other things than Qdrant Edge galleries ({', '.join(others[:5])}); replacing "
                "the galleries replaces the whole folder, so it is refused: choose another path"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield dataclasses.replace(spec, path=tmp)
        tmp.mkdir(exist_ok=True)
        swap_in(tmp, root)  # commits (and then never raises), or raises with the previous galleries in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            local, mask, _ = src._sidecar.gather([pl.get(_LOC) for pl in payloads])
        else:
            locals_ = [src.decode_local(lo, pl) for _, lo, pl in records]
            width = max(x.shape[0] for x in locals_)
            local = np.zeros((len(part), width, src.local_dim), np.float32)
            mask = np.zeros((len(part), width), np.float32)
            for j, x in enumerate(locals_):
                local[j, : x.shape[0]], mask[j, : x.shape[0]] = x, 1.0
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
