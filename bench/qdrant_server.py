"""Section 6, server part: how a gallery on a Qdrant server gets its candidates' rerank inputs.

No Qdrant server binary installs on this machine, so the options run through ``qdrant-client``'s local
mode (``QdrantClient(":memory:")``: the same client API, searched by numpy in this process) on one
gallery of ``n`` images, side by side with the in-memory gallery:

- ``multivector``: the locals as a multivector per point, returned with stage 1 (``with_vectors``) as
  nested Python float lists, turned into arrays, Grams recomputed (how server galleries worked before);
- ``payload``: the rerank inputs as a binary payload per point (base64 of the stored bytes), returned
  with stage 1 and decoded (``QdrantServer()`` without ``cache_dir``);
- ``cache``: stage 1 returns ids, scores and small payloads; the rerank inputs come from the read-through
  cache the add filled (``QdrantServer(cache_dir=...)``, a warm query node);
- ``cache_miss``: the same with an empty cache each call (a cold query node: every candidate fetched from
  the server in one request and kept).

Each is timed as "stage 1 + the 100 candidates' rerank inputs" (the scorer's work is the same for all);
the in-memory gallery and the runtime's own galleries also as a whole search at rerank 100.

What local mode cannot show is the wire: a server serialises the response, the network carries it, and
the client parses it. The client's part is measured offline on each option's real stage-1 response: its
size as a REST (JSON) body and as a gRPC message, and the time ``qdrant-client`` takes to parse each
(``parse_response`` for REST; ``QueryResponse.FromString`` + ``GrpcToRest`` for gRPC). The server's
serialisation and the transfer (size / bandwidth) are not measured.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mssan_infer import OnnxRuntimeOptions, SearchOptions

from .qdrant import _chunks, _fill
from .timing import side_by_side

__all__ = ["run_qdrant_server", "OPTIONS"]

log = logging.getLogger(__name__)

OPTIONS = ("multivector", "payload", "cache", "cache_miss")
_K = 100


def _multivector_collection(client: Any, name: str, pool: Any, n: int) -> None:
    """A collection as server galleries were before: ``stage1`` + the real locals as a multivector."""
    from qdrant_client import models as m

    d = pool.local.shape[2]
    client.create_collection(
        name,
        vectors_config={
            "stage1": m.VectorParams(size=pool.stage1.shape[1], distance=m.Distance.DOT),
            "local": m.VectorParams(
                size=d,
                distance=m.Distance.DOT,
                on_disk=True,
                multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
                hnsw_config=m.HnswConfigDiff(m=0),
            ),
        },
    )
    for st, lo, ma, _, ids in _chunks(pool, n):
        client.upsert(
            name,
            points=[
                m.PointStruct(
                    id=i,
                    vector={"stage1": st[j].tolist(), "local": lo[j][ma[j] > 0].tolist()},
                    payload={"mssan_id": i, "mssan_seq": i},
                )
                for j, i in enumerate(ids)
            ],
        )


def _multivector_candidates(client: Any, name: str, q: np.ndarray, d: int) -> Any:
    """Stage 1 with the candidates' multivectors, as arrays: ``local, mask, gram`` (float32)."""
    res = client.query_points(
        name, query=q.tolist(), using="stage1", limit=_K, with_payload=True, with_vectors=["local"]
    )
    items = [np.asarray(p.vector["local"], np.float32) for p in res.points]
    width = max([1] + [x.shape[0] for x in items])
    local = np.zeros((len(items), width, d), np.float32)
    mask = np.zeros((len(items), width), np.float32)
    for j, x in enumerate(items):
        local[j, : x.shape[0]], mask[j, : x.shape[0]] = x, 1.0
    return local, mask, np.matmul(local, local.transpose(0, 2, 1))


def _wire(response: Any, rounds: int = 5) -> dict[str, float]:
    """Sizes (MB) of a stage-1 response as a REST body and a gRPC message, and qdrant-client's time (ms,
    median) to parse each."""
    from qdrant_client import grpc
    from qdrant_client.common.response_parsing import parse_response
    from qdrant_client.conversions.conversion import GrpcToRest, RestToGrpc
    from qdrant_client.http import models as m

    body = m.InlineResponse20022(result=response, status="ok", time=0.001).model_dump_json(exclude_none=True)
    raw = body.encode()
    msg = grpc.QueryResponse(result=[RestToGrpc.convert_scored_point(p) for p in response.points], time=0.001)
    wire = msg.SerializeToString()

    def rest() -> Any:
        return parse_response(raw, m.InlineResponse20022)

    def grpc_parse() -> Any:
        return [GrpcToRest.convert_scored_point(h) for h in grpc.QueryResponse.FromString(wire).result]

    out: dict[str, float] = {"rest_mb": len(raw) / 2**20, "grpc_mb": len(wire) / 2**20}
    for key, fn in (("rest_parse_ms", rest), ("grpc_parse_ms", grpc_parse)):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[key] = float(np.median(times) * 1e3)
    return out


def run_qdrant_server(
    bundle: Path,
    pool: Any,
    n: int,
    queries: list[str],
    work: Path,
    threads: int,
    repeats: int,
    max_seconds: float,
) -> dict[str, Any]:
    """The server options above on ``n`` images (float32 locals), side by side with the in-memory gallery."""
    from qdrant_client import QdrantClient
    from qdrant_client import models as m

    from mssan_infer import Retriever
    from mssan_infer.gallery.memory import MemoryGallery
    from mssan_infer.names import IMAGES
    from mssan_infer.qdrant.gallery import QdrantGallery
    from mssan_infer.qdrant.options import QdrantOptions, QdrantServer
    from mssan_infer.qdrant.places import open_qdrant_galleries
    from mssan_infer.qdrant.server_locals import PAYLOAD
    from mssan_infer.qdrant.stores import ClientStore

    folder = work / "qdrant-server"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    base = Retriever.load(bundle, OnnxRuntimeOptions(threads=threads), verify=False)
    d, bid = base.embed_size, base.bundle_id
    client = QdrantClient(":memory:")
    out: dict[str, Any] = {"n": n, "k": _K, "local_dtype": "float32", "client": "qdrant-client local mode"}
    mem = MemoryGallery(2 * d, d)
    out["memory_fill_s"] = _fill(mem, pool, n)
    t0 = time.perf_counter()
    _multivector_collection(client, "mv", pool, n)
    out["multivector_fill_s"] = time.perf_counter() - t0
    galleries: dict[str, QdrantGallery] = {}
    for name, cache in (("payload", None), ("cache", folder / "cache")):
        spec = QdrantServer(client=client, prefix=name, cache_dir=cache)
        galleries[name] = open_qdrant_galleries(spec, [IMAGES], 2 * d, d, bid)[IMAGES]
        out[f"{name}_fill_s"] = _fill(galleries[name], pool, n)
    log.info("qdrant server proxy %d: filled %s", n, {k: round(v) for k, v in out.items() if "fill" in k})
    collection = galleries["cache"]._store.collection  # type: ignore[attr-defined]
    cold = {"i": 0}

    def cold_view() -> Any:
        """A query node with an empty cache (a fresh folder each call)."""
        cold["i"] += 1
        store = ClientStore(client, collection, 2 * d, d, QdrantOptions(), cache=folder / f"cold-{cold['i']}")
        return QdrantGallery(store, 2 * d, d, QdrantOptions()).view()

    enc = base.encode_texts(queries)
    state = {"i": 0}

    def q() -> np.ndarray:
        state["i"] += 1
        return enc.stage1[state["i"] % len(queries)]

    def candidates(view: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            v = view()
            rows = v.topk(q()[None], _K)[0][0]
            return v.gather(rows)

        return run

    fns: dict[str, Callable[[], Any]] = {
        "memory": candidates(mem.view),
        "multivector": lambda: _multivector_candidates(client, "mv", q(), d),
        "payload": candidates(galleries["payload"].view),
        "cache": candidates(galleries["cache"].view),
        "cache_miss": candidates(cold_view),
        "stage1_only": lambda: client.query_points(
            collection,
            query=q().tolist(),
            using="stage1",
            limit=_K,
            with_payload=m.PayloadSelectorExclude(exclude=[PAYLOAD]),
        ),
    }

    def forget_cold() -> None:
        shutil.rmtree(folder / f"cold-{cold['i']}", ignore_errors=True)

    out["candidates_100"] = side_by_side(
        fns, repeats=repeats, warmup=1, max_seconds=max_seconds, after={"cache_miss": forget_cold}
    )
    retrievers = {
        name: Retriever(
            base.bundle,
            base.backend,
            base.tokenizer,
            g,
            MemoryGallery(2 * d, d),
            SearchOptions(gather_threads=threads),
        )
        for name, g in (("memory", mem), *galleries.items())
    }
    texts = {"i": 0}

    def search(r: Any) -> Callable[[], Any]:
        def run() -> Any:
            texts["i"] += 1
            return r.search(text=queries[texts["i"] % len(queries)], k=10, rerank=_K)

        return run

    out["search_100"] = side_by_side(
        {name: search(r) for name, r in retrievers.items()},
        repeats=repeats,
        warmup=1,
        max_seconds=max_seconds,
    )
    # the same ranking through every gallery (exact stage 1, float32 locals)
    hits = {name: r.search(text=queries[0], k=10, rerank=_K) for name, r in retrievers.items()}
    out["same_hits"] = all(
        [h.id for h in hs] == [h.id for h in hits["memory"]]
        and np.allclose([h.score for h in hs], [h.score for h in hits["memory"]], atol=1e-5)
        for hs in hits.values()
    )
    # the wire: each option's stage-1 response, as REST and gRPC would carry it
    qv = enc.stage1[0].tolist()
    responses = {
        "multivector": client.query_points(
            "mv", query=qv, using="stage1", limit=_K, with_payload=True, with_vectors=["local"]
        ),
        "payload": client.query_points(
            galleries["payload"]._store.collection,
            query=qv,
            using="stage1",
            limit=_K,
            with_payload=True,  # type: ignore[attr-defined]
        ),
        "cache": client.query_points(
            collection,
            query=qv,
            using="stage1",
            limit=_K,
            with_payload=m.PayloadSelectorExclude(exclude=[PAYLOAD]),
        ),
    }
    out["wire"] = {name: _wire(r) for name, r in responses.items()}
    # a cold node's extra request: the 100 candidates' rerank inputs, fetched by id
    ids = [str(p.id) for p in responses["cache"].points]
    fetched = client.retrieve(collection, ids=ids, with_payload=m.PayloadSelectorInclude(include=[PAYLOAD]))
    points = [m.ScoredPoint(id=r.id, version=0, score=0.0, payload=r.payload) for r in fetched]
    out["wire"]["cache_miss_fetch"] = _wire(responses["cache"].model_copy(update={"points": points}))
    for g in galleries.values():
        g.close()
    base.close()
    client.close()
    shutil.rmtree(folder, ignore_errors=True)
    log.info(
        "qdrant server proxy %d: candidates p50 %s",
        n,
        {k: round(v["p50_ms"], 2) for k, v in out["candidates_100"].items()},
    )
    return out
