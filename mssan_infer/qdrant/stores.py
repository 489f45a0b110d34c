"""The two ways a Qdrant gallery talks to Qdrant: Qdrant Edge shards in-process, and ``qdrant_client``.

:mod:`mssan_infer.qdrant.gallery` holds the gallery (ids, layout, metadata, rerank inputs); this module
holds only the calls into each client library behind one protocol, ``Store``. The client libraries
are imported when a store is made, never at import time.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from mssan_infer.deps import optional_import
from mssan_infer.errors import IndexFileError
from mssan_infer.files import read_versioned_json
from mssan_infer.gallery.filters import Condition
from mssan_infer.qdrant.locals import STORAGE_OF
from mssan_infer.qdrant.server_locals import HASH, PAYLOAD, ServerLocals

if TYPE_CHECKING:
    from mssan_infer.qdrant.options import QdrantOptions

__all__ = ["Store", "EdgeStore", "ClientStore", "import_client", "META_FILE"]

META_FILE = "mssan_gallery.json"  # beside an Edge shard: bundle id, dims, layout


class Store(Protocol):
    """What a Qdrant gallery asks of Qdrant; one implementation per client library."""

    where: str

    def upsert(self, points: list[tuple[str, np.ndarray, Any, dict[str, Any]]]) -> None: ...
    def delete(self, pids: list[str]) -> None: ...
    def present(self, pids: list[str]) -> set[str]: ...
    def query(
        self, vector: np.ndarray, limit: int, conditions: Sequence[Condition], with_locals: bool
    ) -> list[tuple[str, float, dict[str, Any], Any]]: ...
    def fetch(self, pids: list[str]) -> list[tuple[Any, Any, dict[str, Any]]]: ...
    def payloads(self) -> list[dict[str, Any]]: ...
    def count(self) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def read_meta(self) -> dict[str, Any] | None: ...
    def write_meta(self, meta: dict[str, Any]) -> None: ...


def import_client(module: str, package: str) -> Any:
    """The client library ``module``, or a typed error naming the package to install."""
    return optional_import(module, package, "Qdrant galleries of this kind")


class EdgeStore:
    """One Qdrant Edge shard in a folder."""

    def __init__(self, path: Path, stage1_dim: int, local_dim: int, opts: QdrantOptions) -> None:
        qe = import_client("qdrant_edge", "qdrant-edge-py")
        self.qe, self.path, self.opts, self.where = qe, path, opts, f"Qdrant Edge shard {path}"
        stage1 = {
            "size": stage1_dim,
            "distance": qe.Distance.Dot,
            "hnsw_config": qe.HnswIndexConfig(m=opts.hnsw_m, ef_construct=100, full_scan_threshold=10000),
        }
        if opts.quantization == "int8":
            stage1["quantization_config"] = qe.ScalarQuantizationConfig(
                type=qe.ScalarType.Int8, quantile=0.99
            )
        # only stage 1 lives in the shard: the rerank inputs are arrays beside it (mssan_infer.qdrant.locals)
        config = qe.EdgeConfig(vectors={"stage1": qe.EdgeVectorParams(**stage1)})
        try:
            if (path / "edge_config.json").is_file():
                self.shard = qe.EdgeShard.load(str(path))
            else:
                path.mkdir(parents=True, exist_ok=True)
                self.shard = qe.EdgeShard.create(str(path), config)
        except Exception as e:  # the engine's own errors carry no type of ours
            raise IndexFileError(f"cannot open the {self.where}: {e}") from e
        self._lock = threading.Lock()

    def _params(self) -> Any:
        qe = self.qe
        quant = None
        if self.opts.quantization:
            quant = qe.QuantizationSearchParams(
                ignore=False, rescore=True, oversampling=float(self.opts.oversampling)
            )
        return qe.SearchParams(
            exact=self.opts.exact, hnsw_ef=None if self.opts.exact else self.opts.hnsw_ef, quantization=quant
        )

    def _filter(self, conditions: Sequence[Condition]) -> Any:
        qe = self.qe
        if not conditions:
            return None
        must = []
        for c in conditions:
            if c.kind == "eq":
                must.append(qe.FieldCondition(key=c.key, match=qe.MatchValue(c.value)))
            elif c.kind == "in":
                must.append(qe.FieldCondition(key=c.key, match=qe.MatchAny(list(c.value))))
            else:
                must.append(qe.FieldCondition(key=c.key, range=qe.RangeFloat(**c.value)))
        return qe.Filter(must=must)

    def upsert(self, points: list[tuple[str, np.ndarray, Any, dict[str, Any]]]) -> None:
        qe = self.qe
        # lists, not arrays: the binding reads a list about twice as fast as it iterates an ndarray
        ops = [qe.Point(pid, {"stage1": np.asarray(s1).tolist()}, payload) for pid, s1, _, payload in points]
        with self._lock:
            self.shard.update(qe.UpdateOperation.upsert_points(ops))

    def delete(self, pids: list[str]) -> None:
        with self._lock:
            self.shard.update(self.qe.UpdateOperation.delete_points(pids))

    def present(self, pids: list[str]) -> set[str]:
        return {str(r.id) for r in self.shard.retrieve(pids, with_payload=False, with_vector=False)}

    def query(
        self, vector: np.ndarray, limit: int, conditions: Sequence[Condition], with_locals: bool
    ) -> list[tuple[str, float, dict[str, Any], Any]]:
        qe = self.qe
        req = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector.tolist(), using="stage1"),
            filter=self._filter(conditions),
            with_payload=True,
            with_vector=False,  # the locals are read from the arrays beside the shard
            params=self._params(),
        )
        return [(str(p.id), float(p.score), p.payload or {}, None) for p in self.shard.query(req)]

    def fetch(self, pids: list[str]) -> list[tuple[Any, Any, dict[str, Any]]]:
        """``(stage1, None, payload)`` of each point, in the order asked (the locals are beside the shard)."""
        recs = {str(r.id): r for r in self.shard.retrieve(pids, with_payload=True, with_vector=["stage1"])}
        return [(recs[p].vector["stage1"], None, recs[p].payload or {}) for p in pids]

    def payloads(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = None
        while True:
            recs, offset = self.shard.scroll(
                self.qe.ScrollRequest(offset=offset, limit=4096, with_payload=True, with_vector=False)
            )
            out.extend(r.payload or {} for r in recs)
            if offset is None:
                return out

    def count(self) -> int:
        return int(self.shard.count(self.qe.CountRequest(exact=True)))

    def flush(self) -> None:
        with self._lock:
            self.shard.flush()

    def close(self) -> None:
        with self._lock:
            self.shard.close()

    def read_meta(self) -> dict[str, Any] | None:
        p = self.path / META_FILE
        if not p.is_file():
            return None
        return read_versioned_json(p, error=IndexFileError, fix="restore it or rebuild the gallery")

    def write_meta(self, meta: dict[str, Any]) -> None:
        p = self.path / META_FILE
        tmp = p.with_name(f".{META_FILE}.tmp")
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(tmp, p)


class ClientStore:
    """One collection through ``qdrant_client`` (a server, a cluster, or the client's local mode).

    The rerank inputs are a binary payload on each point, read through ``locals``
    (:mod:`mssan_infer.qdrant.server_locals`; with ``cache``, a read-through cache in that folder).
    """

    def __init__(
        self,
        client: Any,
        collection: str,
        stage1_dim: int,
        local_dim: int,
        opts: QdrantOptions,
        cache: Path | None = None,
    ) -> None:
        import_client("qdrant_client", "qdrant-client")
        from qdrant_client import models

        self.m, self.client, self.collection, self.opts = models, client, collection, opts
        self.where = f"Qdrant collection {collection!r}"
        self._stage1_dim, self._local_dim = stage1_dim, local_dim
        self._without_locals = models.PayloadSelectorExclude(exclude=[PAYLOAD])
        self.locals = ServerLocals(
            STORAGE_OF[opts.local_dtype], local_dim, cache, self.fetch_locals, where=self.where
        )

    def create(self, meta: dict[str, Any]) -> None:
        m, opts = self.m, self.opts
        quant = None
        if opts.quantization == "int8":
            quant = m.ScalarQuantization(
                scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, quantile=0.99)
            )
        self.client.create_collection(
            self.collection,
            vectors_config={
                "stage1": m.VectorParams(
                    size=self._stage1_dim,
                    distance=m.Distance.DOT,
                    quantization_config=quant,
                    hnsw_config=m.HnswConfigDiff(m=opts.hnsw_m),
                ),
            },
            on_disk_payload=True,  # the rerank inputs are payload: on disk, not in the server's RAM
            metadata=meta,
        )

    def exists(self) -> bool:
        return bool(self.client.collection_exists(self.collection))

    def _filter(self, conditions: Sequence[Condition]) -> Any:
        m = self.m
        if not conditions:
            return None
        must = []
        for c in conditions:
            if c.kind == "eq":
                must.append(m.FieldCondition(key=c.key, match=m.MatchValue(value=c.value)))
            elif c.kind == "in":
                must.append(m.FieldCondition(key=c.key, match=m.MatchAny(any=list(c.value))))
            else:
                must.append(m.FieldCondition(key=c.key, range=m.Range(**c.value)))
        return m.Filter(must=must)

    def upsert(self, points: list[tuple[str, np.ndarray, Any, dict[str, Any]]]) -> None:
        m = self.m
        self.client.upsert(
            self.collection,
            wait=True,
            points=[
                m.PointStruct(id=pid, vector={"stage1": np.asarray(s1).tolist()}, payload=payload)
                for pid, s1, _, payload in points
            ],
        )

    def delete(self, pids: list[str]) -> None:
        self.client.delete(self.collection, points_selector=self.m.PointIdsList(points=list(pids)), wait=True)

    def present(self, pids: list[str]) -> set[str]:
        return {str(r.id) for r in self.client.retrieve(self.collection, ids=pids, with_payload=False)}

    def query(
        self, vector: np.ndarray, limit: int, conditions: Sequence[Condition], with_locals: bool
    ) -> list[tuple[str, float, dict[str, Any], Any]]:
        m, opts = self.m, self.opts
        quant = None
        if opts.quantization:
            quant = m.QuantizationSearchParams(
                ignore=False, rescore=True, oversampling=float(opts.oversampling)
            )
        params = m.SearchParams(
            exact=opts.exact, hnsw_ef=None if opts.exact else opts.hnsw_ef, quantization=quant
        )
        with warnings.catch_warnings():  # the client's local mode says it ignores search_params: it is exact
            warnings.filterwarnings("ignore", message="Local mode performs exact")
            res = self.client.query_points(
                self.collection,
                query=vector.tolist(),
                using="stage1",
                limit=limit,
                query_filter=self._filter(conditions),
                search_params=params,
                # with_locals: the rerank inputs come in the same response (no cache on this node)
                with_payload=True if with_locals else self._without_locals,
                with_vectors=False,
            )
        return [(str(p.id), float(p.score), p.payload or {}, None) for p in res.points]

    def fetch_locals(self, pids: list[str]) -> dict[str, dict[str, Any]]:
        """``{point id: payload with only the rerank inputs and their hash}`` of the points still there."""
        recs = self.client.retrieve(
            self.collection,
            ids=pids,
            with_payload=self.m.PayloadSelectorInclude(include=[PAYLOAD, HASH]),
            with_vectors=False,
        )
        return {str(r.id): r.payload or {} for r in recs}

    def fetch(self, pids: list[str]) -> list[tuple[Any, Any, dict[str, Any]]]:
        """``(stage1, None, payload)`` of each point, in the order asked (the payload holds the rerank
        inputs)."""
        recs = {
            str(r.id): r
            for r in self.client.retrieve(
                self.collection, ids=pids, with_payload=True, with_vectors=["stage1"]
            )
        }
        return [(recs[p].vector["stage1"], None, recs[p].payload or {}) for p in pids]

    def payloads(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = None
        while True:
            recs, offset = self.client.scroll(
                self.collection,
                offset=offset,
                limit=4096,
                with_payload=self._without_locals,
                with_vectors=False,
            )
            out.extend(r.payload or {} for r in recs)
            if offset is None:
                return out

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def flush(self) -> None:
        return None  # a server acknowledges writes with wait=True; nothing to flush

    def close(self) -> None:
        self.locals.close()  # the client belongs to the caller (or to QdrantServer)

    def read_meta(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        meta = self.client.get_collection(self.collection).config.metadata
        return dict(meta) if meta else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.client.update_collection(self.collection, metadata=meta)
