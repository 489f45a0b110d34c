"""``python -m bench.stage1_methods``: does every gallery layout and stage-1 method earn its place?

One trained bundle (``--bundle``; the bench uses the quickstart's ``tiny`` model) indexes the first
5K, 25K and 100K images of the synthetic ``bench`` split of its world (``--seed``), saved once per
size as a float32 index. For each size, the variants are the three layouts with their own stage 1
(``fp32`` = numpy BLAS over float32, ``int8-stage1`` and ``int8``: int8 scans rescored exactly) and the
FAISS method over the float32 layout (``faiss-ivf``, at the runtime's default settings). The committed
``bench/results/stage1_methods.json`` also measured the ``fp16`` layout and the ``faiss`` (IndexFlatIP)
and ``faiss-hnsw`` methods, removed since: they won on no axis (docs/experiments/2026-12-06-stage1-scan.md).
Measured per variant:

- ``stage1_ms``: p50/p99 of one caption's stage 1 (top 100), all variants interleaved
  (:func:`bench.timing.side_by_side`), with the load average;
- ``stage1_r100``: the share of caption queries whose image is in the stage-1 top 100, and
  ``overlap100``: the share of the exact stage-1 top 100 that the variant returns;
- ``twostage_r1``: R@1 of text->image at rerank 100, and its ratio to exhaustive R@1 (every image
  scored, the float32 layout);
- ``resident_mb``: VmRSS of a fresh process holding the bundle and the gallery in that layout and
  method, in memory and memory-mapped (an index saved in that layout, as a deployment maps it),
  after 20 searches; ``build_s``: the FAISS index build.

The timed part (``--parts latency``) takes ``--lock`` (the shared timing lock) while it runs. Writes
``bench/results/stage1_methods.json``. Nothing here is imported by the library.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .timing import loadavg, machine_info, numpy_blas_setter, side_by_side, versions

log = logging.getLogger("bench.stage1_methods")

SIZES = (5000, 25000, 100000)
CAPS = 5
VARIANTS = (
    ("fp32", "numpy"),
    ("int8-stage1", "numpy"),
    ("int8", "numpy"),
    ("fp32", "faiss-ivf"),
)


def vname(layout: str, method: str) -> str:
    return layout if method == "numpy" else method


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[None]:
    """Hold the shared timing lock (``flock``) while timing; no lock when ``path`` is None."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        log.info("timing lock taken after %.0f s; load %s", time.perf_counter() - t0, loadavg())
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- the indexes ------------------------------------------------------------------------------------
def build_indexes(bundle: Path, seed: int, sizes: list[int], work: Path) -> dict[int, Path]:
    """Save the first ``n`` images of the bench split as a float32 index for each ``n`` (reused when
    present)."""
    from mssan_infer import OnnxRuntimeOptions, Retriever
    from training.synth import generate_split

    out = {n: work / f"index-{n}" for n in sizes}
    if all((p / "index.json").is_file() for p in out.values()):
        return out
    ims, _ = generate_split(max(sizes), seed=seed, split="bench")
    r = Retriever.load(bundle, OnnxRuntimeOptions(threads=2), verify=False)
    done = 0
    for n in sorted(sizes):
        for a in range(done, n, 5000):
            b = min(n, a + 5000)
            r.add_images(r.encode_images(ims[a:b]), ids=list(range(a, b)))
        done = n
        log.info("saving the %d-image index", n)
        r.save(out[n])
    r.close()
    return out


def queries(bundle: Path, seed: int, n_queries: int, smallest: int) -> tuple[Any, np.ndarray]:
    """Encoded captions of images among the first ``smallest`` (in every gallery) and their images."""
    from mssan_infer import OnnxRuntimeOptions, Retriever
    from training.synth import generate_split

    _, caps = generate_split(smallest, seed=seed, split="bench")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(caps), size=min(n_queries, len(caps)), replace=False))
    r = Retriever.load(bundle, OnnxRuntimeOptions(threads=2), verify=False)
    enc = r.encode_texts([caps[i] for i in pick])
    r.close()
    return enc, pick // CAPS


# ---- one size ---------------------------------------------------------------------------------------
def retrievers(bundle: Path, index: Path, n: int) -> dict[str, Any]:
    """``{variant: Retriever}`` over ``index``, in memory, sharing one backend (FAISS methods share the
    float32 gallery's arrays)."""
    from mssan_infer import GalleryOptions, OnnxRuntimeOptions, Retriever

    from .layouts import layout_retrievers
    from .retrieval import stage1_variant

    base = Retriever.load(
        bundle, OnnxRuntimeOptions(threads=2), index=index, verify=False, gallery=GalleryOptions()
    )
    out = {vname(lay, "numpy"): r for lay, r in layout_retrievers(base, index, "images", False).items()}
    for method in (m for _, m in VARIANTS if m != "numpy"):
        t0 = time.perf_counter()
        v = stage1_variant(base, method)
        v.images.view()  # builds the FAISS index
        v.build_s = time.perf_counter() - t0
        out[method] = v
    return out


def recall(rs: dict[str, Any], enc: Any, gt: np.ndarray, n: int, batch: int = 50) -> dict[str, Any]:
    """Stage-1 R@100 and overlap with the exact top 100; two-stage R@1 at rerank 100; exhaustive R@1."""
    from mssan_infer.search import Encoded

    def part(a: int, b: int) -> Any:
        return Encoded(enc.stage1[a:b], enc.local[a:b], enc.mask[a:b], enc.gram[a:b])

    def top1(r: Any, rerank: int) -> np.ndarray:
        ids = []
        for a in range(0, len(gt), batch):
            hits = r.search_encoded(part(a, min(len(gt), a + batch)), query_is_text=True, k=1, rerank=rerank)
            ids += [h[0].id if h else -1 for h in hits]
        return np.asarray(ids)

    exact = rs["fp32"].images.view().topk(enc.stage1, 100)[0]
    t0 = time.perf_counter()
    ex_r1 = float(np.mean(top1(rs["fp32"], n) == gt))
    out: dict[str, Any] = {"exhaustive_r1": ex_r1, "exhaustive_s": time.perf_counter() - t0}
    for name, r in rs.items():
        idx = r.images.view().topk(enc.stage1, 100)[0]
        ids = np.asarray(r.images.view().ids_at(idx.ravel())).reshape(idx.shape)
        r1 = float(np.mean(top1(r, 100) == gt))
        out[name] = {
            "stage1_r100": float(np.mean((ids == gt[:, None]).any(axis=1))),
            "overlap100": float(
                np.mean([len(np.intersect1d(a, b)) / exact.shape[1] for a, b in zip(idx, exact)])
            ),
            "twostage_r1": r1,
            "twostage_r1_ratio": r1 / ex_r1 if ex_r1 else float("nan"),
        }
        log.info("%d %s %s", n, name, out[name])
    return out


RESIDENT = """
import json, sys
import numpy as np
from bench.timing import rss_mb
from mssan_infer import GalleryOptions, OnnxRuntimeOptions, Retriever, Stage1Options
bundle, index, layout, method, mmap = sys.argv[1:6]
kw = {} if index == "-" else {"index": index, "gallery": GalleryOptions(
    layout=layout, mmap=mmap == "1", stage1=Stage1Options(method=method))}
r = Retriever.load(bundle, OnnxRuntimeOptions(threads=2), verify=False, **kw)
q = np.load(sys.argv[6])
if index != "-":
    for i in range(20):
        r.images.view().topk(q[i % len(q)][None], 100)
        r.search(text="a dog on the grass", k=10, rerank=100)
print(json.dumps({"rss_mb": rss_mb()}))
"""


def resident(bundle: Path, index: Path | None, layout: str, method: str, mmap: bool, qfile: Path) -> float:
    """VmRSS (MB) of a fresh process holding ``bundle`` and ``index`` in ``layout``/``method``."""
    root = str(Path(__file__).resolve().parents[1])
    cmd = [
        sys.executable,
        "-c",
        RESIDENT,
        str(bundle),
        str(index or "-"),
        layout,
        method,
        "1" if mmap else "0",
    ]
    cmd.append(str(qfile))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"resident-memory probe failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["rss_mb"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``args.parts``; figures of other parts already in ``args.out`` (same bundle, seed and queries)
    are kept, so the parts can be measured in separate runs."""
    from .layouts import layout_index

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    bundle = Path(args.bundle)
    parts = set(args.parts.split(","))
    same = {"bundle": str(bundle), "seed": args.seed, "queries": args.queries}
    prev = json.loads(Path(args.out).read_text(encoding="utf-8")) if Path(args.out).is_file() else {}
    prev = prev if all(prev.get(k) == v for k, v in same.items()) else {}
    run_info = {"parts": sorted(parts), "machine": machine_info(), "versions": versions()}
    out: dict[str, Any] = {
        **same,
        "parts": sorted(parts | set(prev.get("parts", []))),
        "runs": [*prev.get("runs", []), run_info],
        "sizes": prev.get("sizes", {}),
    }
    if "resident_bundle_only_mb" in prev:
        out["resident_bundle_only_mb"] = prev["resident_bundle_only_mb"]
    indexes = build_indexes(bundle, args.seed, sizes, work)
    enc, gt = queries(bundle, args.seed, args.queries, sizes[0])
    qfile = work / "queries_stage1.npy"
    np.save(qfile, enc.stage1)
    numpy_blas_setter()(2)
    if "resident" in parts:
        out["resident_bundle_only_mb"] = resident(bundle, None, "fp32", "numpy", False, qfile)
    for n in sizes:
        rs = retrievers(bundle, indexes[n], n)
        entry: dict[str, Any] = out["sizes"].setdefault(str(n), {})
        entry["build_s"] = {k: r.build_s for k, r in rs.items() if hasattr(r, "build_s")}
        if "latency" in parts:
            views = {k: r.images.view() for k, r in rs.items()}
            state = {"i": 0}

            def nxt() -> np.ndarray:
                state["i"] += 1
                return enc.stage1[state["i"] % len(gt)][None]

            fns = {k: (lambda v=v: v.topk(nxt(), 100)) for k, v in views.items()}
            with timing_lock(args.lock):
                entry["loadavg_start"] = loadavg()
                entry["stage1_ms"] = side_by_side(fns, args.repeats, warmup=3, max_seconds=120.0, block=5)
                entry["loadavg_end"] = loadavg()
            log.info("%d: %s", n, {k: round(v["p50_ms"], 3) for k, v in entry["stage1_ms"].items()})
            del views, fns
        if "recall" in parts:
            entry["recall"] = recall(rs, enc, gt, n)
        for r in rs.values():
            close = getattr(r, "close", None)
            if close is not None:
                close()
        del rs
        if "resident" in parts:
            entry["resident_mb"] = {}
            for lay, method in VARIANTS:
                for mmap in (False, True):
                    index = layout_index(indexes[n], "images", lay, mmap)
                    mb = resident(bundle, index, lay, method, mmap, qfile)  # memory, not time: no lock
                    entry["resident_mb"][f"{vname(lay, method)}{'_mmap' if mmap else ''}"] = mb
                    log.info("%d %s %s mmap=%s: %.0f MB", n, lay, method, mmap, mb)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    run_info["loadavg_end"] = loadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage1_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a trained bundle (e.g. the quickstart's)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the bundle's synthetic world")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--queries", type=int, default=300, help="caption queries (recall)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds (5 timed calls each)")
    p.add_argument("--work", default="/tmp/mssan-bench/stage1-methods", help="indexes (reused)")
    p.add_argument("--lock", default="/tmp/mssan-timing.lock", help="timing lock file ('' for none)")
    p.add_argument("--parts", default="latency,recall,resident", help="what to measure, comma separated")
    p.add_argument("--out", default="bench/results/stage1_methods.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
