"""Section "qdrant": galleries in Qdrant Edge (in-process) beside the in-memory gallery, in one run.

Latency: for each gallery size and direction, the same items (tiled from the bundle's encoded pool,
stage-1 vectors with fresh noise) go into an in-memory gallery, saved and opened as an index
(float32 in RAM up to 25K images' worth of locals, int8 locals memory-mapped above), and into Qdrant Edge
shards in three modes: ``exact`` (full scan), ``int8`` (int8 stage-1 scan, rescored) and ``hnsw``
(HNSW graph, ``ef`` 128). Text->image over ``N`` images and image->text over the ``5N`` captions of
``N`` images (as the latency section names its i2t sizes), at rerank 100, run interleaved
(:func:`timing.side_by_side`). When the Qdrant galleries of a size do not fit the free disk together,
they are built, timed (each beside the in-memory gallery) and deleted in groups; ``groups`` says so.
Resident memory is measured in a fresh child process per gallery that opens it and runs the queries
(VmRSS at the end), so one gallery's pages do not count for another. Stage-1 recall of the
approximate modes is the overlap of their stage-1 top 100 with the in-memory gallery's exact one.

Recall (with the trained model): R@1/5/10 at rerank 100 through Qdrant Edge galleries holding the
recall section's items, against the in-memory gallery's (ratio of R@1).

The server options (multivector, binary payload, read-through cache) are in :mod:`bench.qdrant_server`.
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
# gallery beside them does (float32 in RAM up to 25K, int8 memory-mapped above: see modes(); float16,
# used before, was removed); ``int8`` stores int8 locals with their scales (the in-memory int8 layout's
# format) and scans int8 stage-1 vectors.
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "int8": {"local_dtype": "uint8", "quantization": "int8"},
    "hnsw": {"exact": False, "hnsw_ef": 128},
}


def modes(mmap: bool) -> dict[str, dict[str, Any]]:
    """:data:`MODES` with the locals of ``exact``/``hnsw`` stored like the in-memory gallery's."""
    local = "uint8" if mmap else "float32"
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


def _child_rss(bundle: Path, spec: dict[str, Any], queries: Any, threads: int, work: Path) -> float:
    """VmRSS (MB) of a fresh process that opens the gallery and runs the queries (captions, or an image
    array: t2i or i2t)."""
    code = (
        "import json, sys\n"
        "from bench.qdrant import _rss_probe\n"
        "print(json.dumps(_rss_probe(json.loads(sys.argv[1]))))\n"
    )
    args = {"bundle": str(bundle), "spec": spec, "threads": threads}
    if isinstance(queries, np.ndarray):
        np.save(work / "rss-queries.npy", queries)
        args["images"] = str(work / "rss-queries.npy")
    else:
        args["texts"] = list(queries)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
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
    if "images" in args:
        for img in np.load(args["images"], allow_pickle=False):
            r.search(image=img, k=10, rerank=100)
    else:
        for q in args["texts"]:
            r.search(text=q, k=10, rerank=100)
    return {"rss_mb": rss_mb()}


_IN_RAM_VECTORS = 25000 * 36  # the in-memory comparator holds float32 in RAM up to 25K images' locals


def _bytes_per_item(opts: dict[str, Any], stage1_dim: int, p: int, d: int) -> float:
    """Disk bytes of one item in a Qdrant Edge gallery with ``opts``, with some slack."""
    local = {"float32": 4, "uint8": 1}[opts.get("local_dtype", "float32")]
    gram = 4 if local == 4 else 2
    b = 4 * stage1_dim + p * d * local + p * p * gram + 4 * p + (4 * p if local == 1 else 0)
    if opts.get("quantization") == "int8":
        b += stage1_dim  # the int8 copy of the stage-1 vectors
    return 1.1 * b


def _groups(modes_: dict[str, dict[str, Any]], need: dict[str, float], free: float) -> list[list[str]]:
    """The Qdrant modes in as few groups as fit ``free`` bytes of disk together (each beside the in-memory
    gallery, which is already written): one group when they all fit."""
    groups: list[list[str]] = [[]]
    used = 0.0
    for mode in modes_:
        if groups[-1] and used + need[mode] > free:
            groups.append([])
            used = 0.0
        groups[-1].append(mode)
        used += need[mode]
    return groups


def run_qdrant_latency(
    bundle: Path,
    pools: Any,
    sizes: list[int],
    queries: Any,
    work: Path,
    threads: int,
    repeats: int,
    max_seconds: float,
    i2t_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """Rerank 100 through the in-memory gallery and Qdrant Edge modes, per gallery size: text->image over
    ``sizes`` images (``out["sizes"]``), image->text over the captions of ``i2t_sizes`` images (5 each, as
    the latency section names its i2t sizes; ``out["i2t"]``).

    Args:
        pools: ``{"images": Encoded, "texts": Encoded}`` (an ``Encoded`` alone: images, t2i only).
        queries: ``{"texts": [captions], "images": [Q, R, Dv]}`` (a list alone: captions).
    """
    from mssan_infer import Retriever

    if not isinstance(pools, dict):
        pools = {"images": pools}
    if not isinstance(queries, dict):
        queries = {"texts": queries}
    base = Retriever.load(bundle, OnnxRuntimeOptions(threads=threads), verify=False)
    out: dict[str, Any] = {"modes": MODES, "sizes": {}, "i2t": {}}
    try:
        for direction, n in [("t2i", n) for n in sizes] + [("i2t", n) for n in i2t_sizes or []]:
            row = _one_size(base, bundle, pools, queries, direction, n, work, threads, repeats, max_seconds)
            out["sizes" if direction == "t2i" else "i2t"][str(n)] = row
    finally:
        base.close()
    return out


def _one_size(
    base: Any,
    bundle: Path,
    pools: dict[str, Any],
    queries: dict[str, Any],
    direction: str,
    n: int,
    work: Path,
    threads: int,
    repeats: int,
    max_seconds: float,
) -> dict[str, Any]:
    """One gallery size and direction of :func:`run_qdrant_latency`."""
    from mssan_infer import Retriever
    from mssan_infer.gallery.folder import save_index
    from mssan_infer.gallery.memory import MemoryGallery
    from mssan_infer.names import IMAGES, TEXTS
    from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions
    from mssan_infer.qdrant.places import open_qdrant_galleries

    t2i = direction == "t2i"
    name, pool = (IMAGES, pools["images"]) if t2i else (TEXTS, pools["texts"])
    qs = queries["texts"] if t2i else queries["images"]
    n_items = n if t2i else 5 * n
    d, p = base.embed_size, pool.local.shape[1]
    row: dict[str, Any] = {"n": n, "n_items": n_items, "direction": direction, "gallery": name}
    folder = work / f"qdrant-{direction}-{n}"
    mmap = n_items * p > _IN_RAM_VECTORS
    the_modes = modes(mmap)
    need = {m: n_items * _bytes_per_item(o, 2 * d, p, d) for m, o in the_modes.items()}
    twin = n_items * _bytes_per_item({"local_dtype": "uint8" if mmap else "float32"}, 2 * d, p, d)
    # the saved index of the in-memory twin (beside its spilled copy when memory-mapped), then beside each
    # group of Qdrant modes (at least the smallest)
    want = max((2 if mmap else 1) * twin, twin + min(need.values())) + 2 * 2**30  # _groups' margin
    shutil.rmtree(folder, ignore_errors=True)  # a run that stopped mid-section left it
    free = shutil.disk_usage(work).free
    if want > 0.85 * free:
        raise SystemExit(
            f"not enough disk in {work} for the Qdrant section's {direction} {n}: ~{want / 2**30:.1f} GB "
            f"needed, {free / 2**30:.1f} GB free; pass --work elsewhere or a smaller --set qdrant_sizes"
        )
    folder.mkdir(parents=True)
    local = "int8" if mmap else "float32"  # the in-memory twin of modes(mmap)'s locals
    row["memory_layout"] = "int8 locals memory-mapped" if mmap else "float32 in RAM"
    mem = MemoryGallery(
        2 * d, d, GalleryOptions(layout=Layout("float32", local), mmap=mmap, spill_dir=folder / "spill")
    )
    row["memory_fill_s"] = _fill(mem, pool, n_items)
    save_index(folder / "index", {name: mem}, bundle_id=base.bundle_id)
    del mem  # the saved index is the comparator: the spilled copy's disk is freed
    shutil.rmtree(folder / "spill", ignore_errors=True)
    memory = Retriever.load(
        bundle,
        OnnxRuntimeOptions(threads=threads),
        index=folder / "index",
        verify=False,
        gallery=GalleryOptions(mmap=mmap),
        search=SearchOptions(gather_threads=threads),
    )
    mem_gallery = memory._galleries[name]
    groups = _groups(the_modes, need, 0.85 * shutil.disk_usage(work).free - 2 * 2**30)
    row["groups"] = groups
    enc = base.encode_texts(qs) if t2i else base.encode_images(qs)
    exact_rows = mem_gallery.view().topk(enc.stage1, 100)[0]
    ids_mem = [set(x.tolist()) for x in exact_rows]  # rows of the in-memory gallery are its ids
    state = {"i": 0}

    def query() -> Any:
        state["i"] += 1
        return qs[state["i"] % len(qs)]

    def timed(r: Any) -> Callable[[], Any]:
        if t2i:
            return lambda: r.search(text=query(), k=10, rerank=100)
        return lambda: r.search(image=query(), k=10, rerank=100)

    row["latency"], row["rss_mb"], row["disk_mb"] = {}, {}, {"index": _du_mb(folder / "index")}
    for gi, group in enumerate(groups):
        retrievers: dict[str, Any] = {"memory": memory}
        for mode in group:
            g = open_qdrant_galleries(
                QdrantEdge(folder / mode, QdrantOptions(**the_modes[mode])), [name], 2 * d, d, base.bundle_id
            )[name]
            row[f"{mode}_fill_s"] = _fill(g, pool, n_items)
            g.flush()
            empty = MemoryGallery(2 * d, d)
            images, texts = (g, empty) if t2i else (empty, g)
            retrievers[mode] = Retriever(
                base.bundle,
                base.backend,
                base.tokenizer,
                images,
                texts,
                SearchOptions(gather_threads=threads),
            )
            log.info("qdrant %s %d: %s filled in %.0f s", direction, n, mode, row[f"{mode}_fill_s"])
        lat = side_by_side(
            {k: timed(r) for k, r in retrievers.items()}, repeats=repeats, warmup=2, max_seconds=max_seconds
        )
        if gi == 0:
            row["latency"]["memory"] = lat["memory"]
        row.setdefault("memory_latency_by_group", []).append(lat["memory"])
        for mode in group:
            row["latency"][mode] = lat[mode]
            # each mode's ratio is to the in-memory gallery timed in its own group
            row[f"{mode}_memory_p50_ms"] = lat["memory"]["p50_ms"]
            if mode in ("int8", "hnsw"):
                view = retrievers[mode]._galleries[name].view()
                ids_q = [set(view.ids_at(r)) for r in view.topk(enc.stage1, 100)[0]]
                row[f"{mode}_stage1_recall100"] = float(
                    np.mean([len(a & b) / 100 for a, b in zip(ids_mem, ids_q)])
                )
            retrievers[mode]._galleries[name].close()
            row["disk_mb"][mode] = _du_mb(folder / mode)
        for mode in group:  # resident memory: a fresh process per gallery
            spec = {"kind": "qdrant-edge", "path": str(folder / mode), "options": the_modes[mode]}
            row["rss_mb"][mode] = _child_rss(bundle, spec, qs[:10], threads, work)
            if len(groups) > 1:
                shutil.rmtree(folder / mode, ignore_errors=True)
    memory.close()
    spec_mem = {"kind": "memory", "index": str(folder / "index"), "mmap": mmap}
    row["rss_mb"]["memory"] = _child_rss(bundle, spec_mem, qs[:10], threads, work)
    log.info("qdrant %s %d: %s", direction, n, {k: v["p50_ms"] for k, v in row["latency"].items()})
    shutil.rmtree(folder, ignore_errors=True)
    return row


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
