"""Bounded soak: many mixed queries against one Retriever, checking that memory stays flat.

``python -m bench.soak [--queries 20000] [--threads 2]`` exports a
tiny random model (cached in ``--work``), fills both galleries, then runs a fixed number of mixed
operations from a few threads: text and image searches at several k/rerank, batched searches,
adds followed by removes (so the galleries stay the same size), and bad inputs that must raise an
MssanError. Everything is in-process (no network). It prints the query count, the wall time and the
resident memory after warm-up and at the end, and exits 1 when memory grew by more than ``--max-growth-mib``
or an operation failed unexpectedly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.fixtures import random_captions, random_regions, speed_bundle
from bench.timing import rss_mb
from mssan_infer import OnnxRuntimeOptions, Retriever
from mssan_infer.errors import MssanError

log = logging.getLogger("bench.soak")


def _worker(
    r: Retriever,
    n_ops: int,
    seed: int,
    dv: int,
    counts: dict[str, int],
    errors: list[str],
    lock: threading.Lock,
) -> None:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    caps = random_captions(64, words=8, seed=seed)
    local = {"text": 0, "image": 0, "batch": 0, "add_remove": 0, "bad": 0}
    for op in range(n_ops):
        kind = rnd.random()
        try:
            if kind < 0.5:
                r.search(text=rnd.choice(caps), k=rnd.choice([1, 5, 10]), rerank=rnd.choice([0, 10, 50]))
                local["text"] += 1
            elif kind < 0.75:
                img = random_regions(1, rnd.randint(1, 12), dv, seed=op)[0]
                r.search(image=img, k=5, rerank=20)
                local["image"] += 1
            elif kind < 0.85:
                r.search_batch(texts=rnd.sample(caps, 4), k=5, rerank=20)
                local["batch"] += 1
            elif kind < 0.95:
                tag = f"soak-{seed}-{op}"
                r.add_images(rng.random((2, 6, dv), dtype=np.float32), ids=[f"{tag}-a", f"{tag}-b"])
                r.add_texts([rnd.choice(caps)], ids=[f"{tag}-c"])
                r.remove([f"{tag}-a", f"{tag}-b"], gallery="images")
                r.remove([f"{tag}-c"], gallery="texts")
                local["add_remove"] += 1
            else:
                bad = rnd.choice(
                    [
                        dict(text=""),
                        dict(text="qqq zzz"),
                        dict(text="a dog", k=0),
                        dict(image=np.full((3, dv), np.nan, np.float32)),
                    ]
                )
                try:
                    r.search(**bad)  # type: ignore[arg-type]
                    raise AssertionError(f"bad input {bad} was accepted")
                except MssanError:
                    local["bad"] += 1
        except Exception as e:  # noqa: BLE001 - reported and counted
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
    with lock:
        for k, v in local.items():
            counts[k] = counts.get(k, 0) + v


def soak(
    queries: int = 20000,
    threads: int = 2,
    work: Path | None = None,
    gallery: int = 500,
    max_growth_mib: float = 20.0,
) -> dict[str, float]:
    """Run the soak; returns its figures (see the module docstring)."""
    d, word_dim, dv = 32, 16, 24
    work = work or Path(tempfile.gettempdir()) / "mssan-soak"
    work.mkdir(parents=True, exist_ok=True)
    bundle = speed_bundle(work, d, word_dim, dv)
    r = Retriever.load(bundle, OnnxRuntimeOptions(threads=1))
    r.add_images(random_regions(gallery, 12, dv, seed=1), ids=[f"img{i}" for i in range(gallery)])
    r.add_texts(random_captions(gallery, words=10, seed=2))
    counts: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    _worker(r, 300, 999, dv, {}, errors, lock)  # warm-up: allocator and ORT arenas settle
    gc.collect()
    start_rss = rss_mb()
    t0 = time.perf_counter()
    per = [queries // threads + (1 if i < queries % threads else 0) for i in range(threads)]
    pool = [
        threading.Thread(target=_worker, args=(r, n, i, dv, counts, errors, lock)) for i, n in enumerate(per)
    ]
    samples: list[float] = []
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        samples.append(rss_mb())
        time.sleep(0.5)
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    gc.collect()
    end_rss = rss_mb()
    figures = {
        "queries": float(sum(per)),
        "seconds": wall,
        "qps": sum(per) / wall,
        "rss_start_mib": start_rss,
        "rss_end_mib": end_rss,
        "rss_peak_mib": max(samples + [end_rss]),
        "rss_growth_mib": end_rss - start_rss,
        "errors": float(len(errors)),
        "images": float(r.n_images),
        "texts": float(r.n_texts),
    }
    print(
        f"soak: {sum(per)} operations from {threads} threads in {wall:.1f} s ({figures['qps']:.0f}/s): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    print(
        f"RSS start {start_rss:.1f} MiB, end {end_rss:.1f} MiB, peak {figures['rss_peak_mib']:.1f} MiB "
        f"(growth {end_rss - start_rss:+.1f} MiB); galleries {r.n_images} images, {r.n_texts} captions "
        f"(unchanged: {r.n_images == gallery and r.n_texts == gallery}); unexpected errors {len(errors)}"
    )
    for e in errors[:5]:
        print(f"  error: {e}")
    r.close()
    ok = (
        not errors
        and end_rss - start_rss <= max_growth_mib
        and r.n_images == gallery
        and r.n_texts == gallery
    )
    figures["ok"] = float(ok)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=20000, help="operations in all (default 20000)")
    p.add_argument("--threads", type=int, default=2, help="threads sharing the Retriever (default 2)")
    p.add_argument("--gallery", type=int, default=500, help="items per gallery (default 500)")
    p.add_argument("--work", type=Path, default=None, help="cache folder for the tiny bundle")
    p.add_argument("--max-growth-mib", type=float, default=20.0, help="RSS growth that fails the soak")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = soak(args.queries, args.threads, args.work, args.gallery, args.max_growth_mib)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
