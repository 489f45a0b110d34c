"""Section "qdrant": galleries in Qdrant Edge (in-process) beside the in-memory gallery, in one run.

Latency: for each gallery size, the same items (tiled from the bundle's encoded pool, stage-1
vectors with fresh noise) go into an in-memory gallery (float32 in RAM up to 25K images, float16
memory-mapped above) and into Qdrant Edge shards in three modes: ``exact`` (full scan),
``int8`` (int8 stage-1 scan, rescored) and ``hnsw`` (HNSW graph, ``ef`` 128). Text->image
searches at rerank 100 run interleaved (:func:`timing.side_by_side`). Resident memory is measured
in a fresh child process per gallery that opens it and runs the queries (VmRSS at the end), so
one gallery's pages do not count for another. Stage-1 recall of the approximate modes is the
overlap of their stage-1 top 100 with the exact one's.

Recall (with the trained model): R@1/5/10 at rerank 100 through Qdrant Edge galleries holding the
recall section's items, against the in-memory gallery's (ratio of R@1).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mssan_infer import GalleryOptions, Layout, OnnxRuntimeOptions, SearchOptions

from .timing import side_by_side

__all__ = ["run_qdrant_latency", "run_qdrant_recall", "MODES"]

log = logging.getLogger(__name__)

# mode -> QdrantOptions keyword arguments. ``exact`` and ``hnsw`` store the locals as the in-memory
# gallery beside them does (float32 in RAM up to 25K, float16 memory-mapped above: see modes());
# ``int8`` stores int8 locals with their scales (the in-memory int8 layout's format).
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "int8": {"local_dtype": "uint8", "quantization": "int8"},
    "hnsw": {"exact": False, "hnsw_ef": 128},
}


def modes(mmap: bool) -> dict[str, dict[str, Any]]:
    """:data:`MODES` with the locals of ``exact``/``hnsw`` stored like the in-memory gallery's."""
    local = "float16" if mmap else "float32"
    return {m: {"local_dtype": local, **o} for m, o in MODES.items()}


_CHUNK = 500


def _chunks(
    pool: Any, n: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]]:
    """``n`` items tiled from ``pool`` (an ``Encoded``), stage-1 vectors with fresh noise, in chunks."""
    rng = np.random.default_rng(seed)
    m, d2 = len(pool), pool.stage1.shape[1]
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        rows = np.arange(a, b) % m
        noise = 0.05 * rng.standard_normal((b - a, d2), dtype=np.float32) / np.sqrt(d2)
        yield pool.stage1[rows] + noise, pool.local[rows], pool.mask[rows], pool.gram[rows], list(range(a, b))


def _fill(gallery: Any, pool: Any, n: int) -> float:
    t0 = time.perf_counter()
    for st, lo, ma, gr, ids in _chunks(pool, n):
        gallery.add(st, lo, ma, gr, ids=ids)
    return time.perf_counter() - t0


def _child_rss(bundle: Path, spec: dict[str, Any], queries: list[str], threads: int) -> float:
    """VmRSS (MB) of a fresh process that opens the gallery and runs the queries."""
    code = (
        "import json, sys\n"
        "from bench.qdrant import _rss_probe\n"
        "print(json.dumps(_rss_probe(json.loads(sys.argv[1]))))\n"
    )
    arg = json.dumps({"bundle": str(bundle), "spec": spec, "queries": queries, "threads": threads})
    out = subprocess.run(
        [sys.executable, "-c", code, arg],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["rss_mb"])


def _rss_probe(args: dict[str, Any]) -> dict[str, float]:
    """Child side of :func:`_child_rss`."""
    from mssan_infer import Retriever
    from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions

    from .timing import rss_mb

    spec = args["spec"]
    if spec["kind"] == "memory":
        r = Retriever.load(
            args["bundle"],
            OnnxRuntimeOptions(threads=args["threads"]),
            index=spec["index"],
            verify=False,
            gallery=GalleryOptions(mmap=spec["mmap"]),
        )
    else:
        r = Retriever.load(
            args["bundle"],
            OnnxRuntimeOptions(threads=args["threads"]),
            gallery=QdrantEdge(spec["path"], QdrantOptions(**spec["options"])),
            verify=False,
        )
    for q in args["queries"]:
        r.search(text=q, k=10, rerank=100)
    return {"rss_mb": rss_mb()}


def run_qdrant_latency(
    bundle: Path,
    pool: Any,
    sizes: list[int],
    queries: list[str],
    work: Path,
    threads: int,
    repeats: int,
    max_seconds: float,
) -> dict[str, Any]:
    """Text->image at rerank 100: in-memory gallery vs Qdrant Edge modes, per gallery size."""
    from mssan_infer import Retriever
    from mssan_infer.gallery.folder import save_index
    from mssan_infer.gallery.memory import MemoryGallery
    from mssan_infer.names import IMAGES
    from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions
    from mssan_infer.qdrant.places import open_qdrant_galleries

    base = Retriever.load(bundle, OnnxRuntimeOptions(threads=threads), verify=False)
    d = base.embed_size
    out: dict[str, Any] = {"modes": MODES, "sizes": {}}
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        folder = work / f"qdrant-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        mmap = n > 25000
        mem = MemoryGallery(
            2 * d,
            d,
            GalleryOptions(
                layout=Layout("float32", "float16" if mmap else "float32"),
                mmap=mmap,
                spill_dir=folder / "spill",
            ),
        )
        row["memory_layout"] = "float16 memory-mapped" if mmap else "float32 in RAM"
        row["memory_fill_s"] = _fill(mem, pool, n)
        save_index(folder / "index", {IMAGES: mem}, bundle_id=base.bundle_id)
        retrievers: dict[str, Any] = {
            "memory": Retriever(
                base.bundle,
                base.backend,
                base.tokenizer,
                mem,
                MemoryGallery(2 * d, d),
                SearchOptions(gather_threads=threads),
            )
        }
        for mode, opts in modes(mmap).items():
            g = open_qdrant_galleries(
                QdrantEdge(folder / mode, QdrantOptions(**opts)), [IMAGES], 2 * d, d, base.bundle_id
            )[IMAGES]
            row[f"{mode}_fill_s"] = _fill(g, pool, n)
            g.flush()
            retrievers[mode] = Retriever(
                base.bundle,
                base.backend,
                base.tokenizer,
                g,
                MemoryGallery(2 * d, d),
                SearchOptions(gather_threads=threads),
            )
            log.info("qdrant %d: %s filled in %.0f s", n, mode, row[f"{mode}_fill_s"])
        state = {"i": 0}

        def query() -> str:
            state["i"] += 1
            return queries[state["i"] % len(queries)]

        def timed(r: Any) -> Callable[[], Any]:
            return lambda: r.search(text=query(), k=10, rerank=100)

        row["latency"] = side_by_side(
            {name: timed(r) for name, r in retrievers.items()},
            repeats=repeats,
            warmup=2,
            max_seconds=max_seconds,
        )
        enc = base.encode_texts(queries)
        exact_rows = retrievers["memory"].images.view().topk(enc.stage1, 100)[0]
        ids_mem = [set(x.tolist()) for x in exact_rows]  # rows of the in-memory gallery are its ids
        for mode in ("int8", "hnsw"):
            view = retrievers[mode].images.view()
            ids_q = [set(view.ids_at(r)) for r in view.topk(enc.stage1, 100)[0]]
            row[f"{mode}_stage1_recall100"] = float(
                np.mean([len(a & b) / 100 for a, b in zip(ids_mem, ids_q)])
            )
        for name, r in retrievers.items():
            if name != "memory":
                r.images.close()
        spec_mem = {"kind": "memory", "index": str(folder / "index"), "mmap": mmap}
        row["rss_mb"] = {"memory": _child_rss(bundle, spec_mem, queries[:10], threads)}
        for mode, opts in modes(mmap).items():
            spec = {"kind": "qdrant-edge", "path": str(folder / mode), "options": opts}
            row["rss_mb"][mode] = _child_rss(bundle, spec, queries[:10], threads)
        row["disk_mb"] = {name: _du_mb(folder / name) for name in ("index", *MODES)}
        out["sizes"][str(n)] = row
        log.info("qdrant %d: %s", n, {k: v["p50_ms"] for k, v in row["latency"].items()})
        shutil.rmtree(folder, ignore_errors=True)
    base.close()
    return out


def _du_mb(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
        if path.exists()
        else float("nan")
    )


def run_qdrant_recall(retriever: Any, work: Path, queries: int, seed: int = 0) -> dict[str, Any]:
    """R@1/5/10 at rerank 100 through Qdrant Edge galleries holding ``retriever``'s items (already added)."""
    from mssan_infer import Retriever
    from mssan_infer.names import IMAGES, TEXTS
    from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions
    from mssan_infer.qdrant.places import open_qdrant_galleries

    from .recall import CAPS, _recall

    n_images, n_caps = retriever.n_images, retriever.n_texts
    rng = np.random.default_rng(seed)
    q_caps = np.sort(rng.choice(n_caps, size=min(queries, n_caps), replace=False))
    q_ims = np.sort(rng.choice(n_images, size=min(queries, n_images), replace=False))
    from training.synth import generate_split

    ims, caps = generate_split(n_images, seed=seed, split="bench")
    out: dict[str, Any] = {"t2i": {}, "i2t": {}}
    runs: dict[str, Any] = {"memory": retriever}
    for mode, opts in MODES.items():
        folder = work / f"qdrant-recall-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        gs = open_qdrant_galleries(
            QdrantEdge(folder, QdrantOptions(**{**opts, "local_dtype": "float32"})),
            [IMAGES, TEXTS],
            retriever.images.stage1_dim,
            retriever.images.local_dim,
            retriever.bundle_id,
        )
        for name in (IMAGES, TEXTS):
            v = retriever._galleries[name].view()
            st, lo, ma, gr = v.arrays()  # float32 copies of every item
            for a in range(0, v.n, _CHUNK):
                b = min(v.n, a + _CHUNK)
                gs[name].add(st[a:b], lo[a:b], ma[a:b], gr[a:b], ids=list(v.ids[a:b]))
        runs[mode] = Retriever(
            retriever.bundle, retriever.backend, retriever.tokenizer, gs[IMAGES], gs[TEXTS]
        )
    for name, r in runs.items():
        hits = r.search_batch(texts=[caps[i] for i in q_caps], k=10, rerank=100)
        ranks = np.array(
            [next((j for j, h in enumerate(hs) if h.id == int(c) // CAPS), 10) for c, hs in zip(q_caps, hits)]
        )
        hits = r.search_batch(images=ims[q_ims], k=10, rerank=100)
        ranks_i = np.array(
            [
                next((j for j, h in enumerate(hs) if int(h.id) // CAPS == int(i)), 10)
                for i, hs in zip(q_ims, hits)
            ]
        )
        out["t2i"][name], out["i2t"][name] = _recall(ranks), _recall(ranks_i)
    for d in ("t2i", "i2t"):
        ref = out[d]["memory"]["r1"]
        for name in runs:
            out[d][name]["r1_ratio"] = out[d][name]["r1"] / ref if ref > 0 else float("nan")
    for mode in MODES:
        for g in (runs[mode].images, runs[mode].texts):
            g.close()
        shutil.rmtree(work / f"qdrant-recall-{mode}", ignore_errors=True)
    return out
