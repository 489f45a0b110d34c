"""``python -m bench.overfetch``: how many rows a compressed (int8) stage 1 must fetch by its compressed
scores to hold the exact top k, and what fetching fewer saves.

For each gallery (the latency section's default-tower galleries in the ``int8`` layout; ``t2i:N:mmap``:
its saved int8 index, memory-mapped) and each query (captions for ``t2i``, region features for
``i2t``): the rank, in the compressed order, of the last row of the exact float32 top ``k`` (``k =
100``, the default rerank), and the share of queries whose exact top ``k`` lies wholly within the
first ``m`` rows for ``m`` of 1-4 x ``k``; then the stage-1 step (scan + exact rescoring of the fetched
rows) timed with each ``--overfetch`` side by side (:func:`bench.timing.side_by_side`, cold: 64 MB of
other data read between two calls, as a query's other steps do). Run the latency section first (it
writes the galleries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .query_path import _gallery
from .timing import side_by_side

K = 100
MULTIPLES = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def fetch_ranks(view: Any, queries: np.ndarray, k: int = K, most: int = 4) -> np.ndarray:
    """``[Q]``: for each float32 query ``[Q, 2D]``, the 1-based rank by compressed score of the last row of
    its exact top ``k`` (how many rows a stage 1 must fetch to hold all of them); ``most * k + 1`` when
    some row of it is not within the first ``most * k``. Outliers (rows kept exact, rescored on every
    query) are left out: they need no fetching."""
    assert view.codec is not None and view.searcher is not None, "a compressed stage 1"
    full = np.concatenate([b.stage1 for b in view.blocks]).astype(np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, view.n)
    exact = np.argsort(-(q @ full.T), axis=1, kind="stable")[:, :k]  # ties: lower row first
    qq, _ = view.codec.query(q)
    m = min(view.n, most * k)
    _, order = view.searcher.search(qq, m)
    out = np.empty(len(q), np.int64)
    outliers = set() if view.outliers is None else {int(r) for r in view.outliers}
    for i in range(len(q)):
        pos = {int(r): j for j, r in enumerate(order[i])}
        ranks = [pos.get(int(r), m) for r in exact[i] if int(r) not in outliers] or [0]
        out[i] = max(ranks) + 1 if max(ranks) < m else most * k + 1
    return out


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """p50, p99 and max of per-query ranks (the rows a stage 1 must fetch)."""
    return {"p50": float(np.median(ranks)), "p99": float(np.percentile(ranks, 99)), "max": int(ranks.max())}


def contained(ranks: np.ndarray, k: int = K) -> dict[str, float]:
    """Share of queries whose exact top ``k`` lies within the first ``m x k`` compressed rows, per ``m``."""
    return {f"{m:g}x": float(np.mean(ranks <= m * k)) for m in MULTIPLES}


def stage1_times(
    view: Any, queries: np.ndarray, overfetches: list[int], rounds: int, k: int = K
) -> dict[str, dict[str, float]]:
    """The stage-1 top ``k`` (scan + rescoring) of one query at a time, for each over-fetch, side by side."""
    views = {f"overfetch {f}": dataclasses.replace(view, overfetch=f) for f in overfetches}
    state = {"i": 0}
    flush = np.ones(16 << 20, np.float32)  # 64 MB: the other steps of a query evict the codes

    def call(v: Any) -> Any:
        q = queries[state["i"] % len(queries)][None]
        return lambda: v.topk(q, k)

    def after() -> None:
        state["i"] += 1
        flush.sum()

    fns = {name: (lambda v=v: call(v)()) for name, v in views.items()}
    return side_by_side(fns, rounds, after={n: after for n in fns})


def measure(
    work: Path, specs: list[str], queries: int, rounds: int, overfetches: list[int]
) -> dict[str, Any]:
    from mssan_infer import GalleryOptions, OnnxRuntimeOptions, Retriever
    from mssan_infer.bundle import load_bundle

    from .fixtures import random_captions, random_regions
    from .text_tower import default_text_model, minilm_speed_bundle

    bundle, int8 = minilm_speed_bundle(work, default_text_model(), 1024, 2048, 2)
    bid = load_bundle(bundle, verify=False).bundle_id
    out: dict[str, Any] = {"k": K, "load_at_start": list(os.getloadavg()), "galleries": {}}
    ort = OnnxRuntimeOptions(threads=2)
    for spec in specs:
        key, index, image_queries, mmap = _gallery(work, spec, bid, "fast")
        if not (index / "index.json").is_file():
            raise SystemExit(f"no gallery {index}: run `python -m bench --sections latency` first")
        r = Retriever.load(
            bundle, ort, index=index, gallery=GalleryOptions(layout="int8", mmap=mmap), verify=False
        )
        if image_queries:
            feats = random_regions(queries, 36, r.bundle.manifest.img_dim, seed=7)
            q = np.concatenate([r.encode_images(f[None]).stage1 for f in feats])
            view = r.texts.view()
        else:
            q = np.concatenate([r.encode_texts([c]).stage1 for c in random_captions(queries, seed=7)])
            view = r.images.view()
        ranks = fetch_ranks(view, q)
        row = {
            "items": view.n,
            "queries": len(q),
            "rank_of_last_exact": rank_summary(ranks),
            "contained": contained(ranks),
            "stage1": stage1_times(view, q, overfetches, rounds),
        }
        out["galleries"][key] = row
        times = ", ".join(f"{n} {v['p50_ms']:.3f}" for n, v in row["stage1"].items())
        print(
            f"{key}: last exact row at rank p50 {row['rank_of_last_exact']['p50']:.0f}, max "
            f"{row['rank_of_last_exact']['max']}; within 2k {row['contained']['2x']:.3f}; "
            f"stage 1 ms p50: {times}",
            flush=True,
        )
        r.close()
    out["load_at_end"] = list(os.getloadavg())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.overfetch", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mssan-bench"))
    ap.add_argument("--galleries", default="t2i:5000,t2i:25000,i2t:5000,t2i:100000:mmap")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=300, help="timed stage-1 calls per over-fetch")
    ap.add_argument("--overfetch", default="2,4", help="comma-separated over-fetch multiples to time")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    specs = a.galleries.split(",")
    for spec in specs:  # refused before any bundle is made
        _gallery(a.work, spec, "", "fast")
    res = measure(a.work, specs, a.queries, a.rounds, [int(x) for x in a.overfetch.split(",")])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
