"""``python -m bench.query_path``: search at rerank 100 in processes that serve one query path each, as a
deployment does.

The latency section (``python -m bench --sections latency``) times every path, layout and step side by
side in one process: ~60 ONNX Runtime sessions, galleries in three layouts and full-gallery scans
between the queries it times. That is the fair way to compare them with each other, and a pessimistic
one for a query's own latency. Here each (path, gallery) runs in ``--processes`` fresh processes that
hold only that path and its gallery, answering ``--queries`` different queries one after another
(after a warm-up; every other query traced step by step, :func:`bench.floor.traced_steps`); the
processes of all paths alternate. The latency section runs the same processes (:func:`own_process`)
for its floor rows' end to end; this script adds ORT settings and galleries of your choice. The
latency section's default-tower bundle and galleries are reused from ``--work`` (run that section
first). Galleries: ``t2i:N`` (N images),
``i2t:N`` (the 5N captions of N images), ``t2i:N:mmap`` (memory-mapped; the fast path opens the saved
int8 index).

Paths: ``exact`` (the default: fp32 graphs, fp32 layout) and ``fast`` (the int8 text encoder and the
``int8`` layout, ``Retriever.load(..., fast=True)``). ``--settings default,nospin`` also runs each path with
ONNX Runtime's workers never spinning (the runtime's setting before 2026-12-07); ``noshares`` as the runtime
was before its rerank shares (one share, the query scorers on the session's threads, one query's float32
scan in numpy's BLAS: docs/experiments/2026-12-07-rerank-shares.md). ``--before DIR`` also runs each path and
setting with the code of another checkout (``git worktree add DIR COMMIT``; its own ``bench.query_path``
serves the processes, which alternate with this checkout's): a change measured side by side, keys ending
in ``_before``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the bench package's folder is importable from here
PATHS = ("exact", "fast")
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "nospin": {"session_config": {"session.intra_op.allow_spinning": "0"}},
    "spin": {"allow_spinning": True},
    # the runtime before 2026-12-07's rerank shares: one share, query scorers on the session threads,
    # one query's float32 scan in numpy's BLAS
    "noshares": {"rerank_threads": 1, "numpy_scan": True},
}


def _child(
    bundle: Path,
    int8_encoder: Path | None,
    index: Path,
    path: str,
    queries: int,
    threads: int,
    setting: str,
    image_queries: bool = False,
    mmap: bool = False,
) -> dict[str, Any]:
    from mssan_infer import GalleryOptions, SearchOptions
    from mssan_infer.gallery import stage1

    fast = path == "fast"
    gallery = GalleryOptions(layout="int8" if fast else None, mmap=mmap)
    opts = dict(SETTINGS[setting])
    search = SearchOptions(rerank_threads=opts.pop("rerank_threads", None))
    saved = stage1._scannable
    if opts.pop("numpy_scan", False):  # one query's float32 scan in numpy's BLAS, on its own threads
        stage1._scannable = lambda block, dim: False  # type: ignore[assignment]
    try:
        return _timed(
            bundle, int8_encoder, index, fast, queries, threads, opts, search, gallery, image_queries
        )
    finally:
        stage1._scannable = saved  # type: ignore[assignment]


def _timed(
    bundle: Path,
    int8_encoder: Path | None,
    index: Path,
    fast: bool,
    queries: int,
    threads: int,
    opts: dict[str, Any],
    search: Any,
    gallery: Any,
    image_queries: bool,
) -> dict[str, Any]:
    from mssan_infer import OnnxRuntimeOptions, Retriever

    from .fixtures import random_captions, random_regions
    from .retrieval import fast_path

    ort = OnnxRuntimeOptions(threads=threads, **opts)
    r = Retriever.load(bundle, ort, index=index, gallery=gallery, search=search, verify=False)
    if fast:  # the bench's bundle keeps its int8 text encoder beside it (what `export --int8` puts inside)
        r = fast_path(r, r, threads, None if image_queries else int8_encoder, ort)
    if image_queries:
        qs: list[Any] = list(random_regions(queries + 20, 36, r.bundle.manifest.img_dim, seed=7))
        kind = "image"
    else:
        qs, kind = list(random_captions(queries + 20, seed=7)), "text"
    from .floor import IN_QUERY, record_inside, traced_steps

    for q in qs[:20]:
        r.search(**{kind: q}, k=10, rerank=100)
    times = []
    inside: dict[str, list[float]] = {s: [] for s in IN_QUERY}
    for i, q in enumerate(qs[20:]):
        if i % 2:  # every other query traced: its steps timed where they run
            with traced_steps(r, not image_queries) as took:
                r.search(**{kind: q}, k=10, rerank=100)
            record_inside(inside, took)
            continue
        t0 = time.perf_counter()
        r.search(**{kind: q}, k=10, rerank=100)
        times.append(time.perf_counter() - t0)
    r.close()
    ms = np.asarray(times) * 1e3
    import mssan_infer

    return {
        "runtime": str(Path(mssan_infer.__file__).resolve().parent),  # which checkout's code ran
        "p50_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "inside": {s: float(np.median(v)) for s, v in inside.items()},
    }


def own_process(
    bundle: Path,
    int8_encoder: Path | None,
    index: Path,
    path: str,
    *,
    processes: int,
    queries: int,
    threads: int,
    setting: str = "default",
    image_queries: bool = False,
    mmap: bool = False,
    code: Path | None = None,
) -> dict[str, Any]:
    """Search at rerank 100 on ``path`` (``exact`` or ``fast``) in ``processes`` fresh processes, one after
    another, each holding only that path and the gallery ``index`` (``code``: with the runtime and this
    script of that checkout instead of this one).

    Returns:
        ``{"p50_ms", "p99_ms"}`` (medians over the processes), ``"inside"`` (the median over the processes
        of each step's median inside traced queries, as ``bench.floor.IN_QUERY``) and ``"processes"``
        (each process's figures).
    """
    runs = []
    for _ in range(processes):
        cmd = [sys.executable, "-m", "bench.query_path", "--child", path, "--bundle", str(bundle)]
        cmd += ["--index", str(index), "--queries", str(queries), "--threads", str(threads)]
        cmd += ["--settings", setting] + ["--image-queries"] * image_queries + ["--mmap"] * mmap
        cmd += ["--int8-encoder", str(int8_encoder)] if int8_encoder is not None else []
        env = {**os.environ, "PYTHONPATH": str(code)} if code is not None else None
        done = subprocess.run(cmd, cwd=code or ROOT, env=env, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout))
    return {
        "p50_ms": float(np.median([x["p50_ms"] for x in runs])),
        "p99_ms": float(np.median([x["p99_ms"] for x in runs])),
        "inside": {s: float(np.median([x["inside"][s] for x in runs])) for s in runs[0]["inside"]},
        "processes": runs,
    }


def _gallery(work: Path, spec: str, bid: str, path: str) -> tuple[str, Path, bool, bool]:
    """``(key, index folder, image queries, mmap)`` of a gallery ``t2i:N``, ``i2t:N`` or ``t2i:N:mmap``."""
    direction, n, *rest = spec.split(":")
    mmap = rest == ["mmap"]
    if direction not in ("t2i", "i2t") or rest not in ([], ["mmap"]) or (mmap and direction != "t2i"):
        raise SystemExit(f"--galleries: {spec!r} is not t2i:N, i2t:N or t2i:N:mmap")
    from .layouts import layout_folder
    from .retrieval import gallery_folder

    index = gallery_folder(work, *(("images", int(n)) if direction == "t2i" else ("texts", 5 * int(n))), bid)
    if mmap and path == "fast":  # the int8 index saved beside it (``bench.layouts.layout_index``)
        index = layout_folder(index, "int8")
    return f"{direction}_{n}" + ("_mmap" if mmap else ""), index, direction == "i2t", mmap


def run(
    work: Path,
    galleries: list[str],
    processes: int,
    queries: int,
    threads: int,
    settings: list[str],
    before: Path | None = None,
) -> dict[str, Any]:
    from mssan_infer.bundle import load_bundle

    from .text_tower import default_text_model, minilm_speed_bundle

    bundle, int8 = minilm_speed_bundle(work, default_text_model(), 1024, 2048, 2)
    bid = load_bundle(bundle, verify=False).bundle_id
    from .timing import machine_info

    out: dict[str, Any] = {"load_at_start": list(os.getloadavg()), "machine": machine_info(), "runs": {}}
    for spec in galleries:
        for path in PATHS:
            index = _gallery(work, spec, bid, path)[1]
            if not (index / "index.json").is_file():
                raise SystemExit(f"no gallery {index}: run `python -m bench --sections latency` first")
        for rnd in range(processes):
            for path in PATHS:
                gkey, index, image_queries, mmap = _gallery(work, spec, bid, path)
                for setting, code in [(x, c) for x in settings for c in (None, before)[: 2 if before else 1]]:
                    res = own_process(
                        bundle,
                        int8,
                        index,
                        path,
                        processes=1,
                        queries=queries,
                        threads=threads,
                        setting=setting,
                        image_queries=image_queries,
                        mmap=mmap,
                        code=code,
                    )["processes"][0]
                    key = f"{gkey}_{path}" + ("" if setting == "default" else f"_{setting}")
                    key += "_before" if code else ""
                    out["runs"].setdefault(key, []).append(res)
                    print(
                        f"{key} process {rnd + 1}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f}",
                        flush=True,
                    )
    out["load_at_end"] = list(os.getloadavg())
    out["p50_ms"] = {k: float(np.median([x["p50_ms"] for x in v])) for k, v in out["runs"].items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.query_path", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mssan-bench"))
    ap.add_argument(
        "--galleries",
        default="t2i:5000,t2i:25000",
        help="comma-separated t2i:N (N images), i2t:N (5N captions), t2i:N:mmap (memory-mapped)",
    )
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per path, setting and size")
    ap.add_argument("--queries", type=int, default=300, help="timed queries per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="default", help=f"comma-separated, of {sorted(SETTINGS)}")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--before", type=Path, help="a checkout of the code before a change, run beside this one")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--int8-encoder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--image-queries", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        res = _child(
            a.bundle,
            a.int8_encoder,
            a.index,
            a.child,
            a.queries,
            a.threads,
            a.settings,
            a.image_queries,
            a.mmap,
        )
        print(json.dumps(res))
        return
    settings = a.settings.split(",")
    bad = [x for x in settings if x not in SETTINGS]
    if bad:
        ap.error(f"--settings: unknown {bad}; choose from {sorted(SETTINGS)}")
    galleries = a.galleries.split(",")
    for spec in galleries:  # refused before any bundle is made
        _gallery(a.work, spec, "", "exact")
    if a.before is not None and not (a.before / "bench" / "query_path.py").is_file():
        ap.error(f"--before: {a.before} is not a checkout of this project (no bench/query_path.py)")
    res = run(a.work, galleries, a.processes, a.queries, a.threads, settings, a.before)
    res["settings"] = {k: SETTINGS[k] for k in settings}
    if a.before is not None:
        res["before"] = str(a.before)
    print(json.dumps(res["p50_ms"], indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
