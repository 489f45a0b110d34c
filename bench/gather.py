"""``python -m bench.gather``: a rerank share's gather (50 candidates of an ``int8`` gallery), alone and on
two threads at once as a query's two shares run, from a gallery of one block in RAM, of several segments
in RAM (built by adds, as a gallery searched where it is filled) and of one memory-mapped block.

Side by side in one run: the runtime's gather (``ArrayView.gather``: a take per block) and, for segments and
memory-mapped blocks, a copy per row: the gather there before 2026-12-07 (kept here as the reference: Python
runs once per row, and two threads then take turns holding the interpreter; one block in RAM was taken
whole before too). Rows are asked for in row order, as a rerank asks for them, and in
stage-1 order (``--unsorted``). Values do not change speed: items are random, paper-sized (36 regions
of 1024). Writes ``bench/results/gather.json`` by default; docs/experiments/2026-12-07-gather-takes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROWS = 50  # one of a 100-candidate rerank's two shares
KINDS = ("one block", "segments", "memory-mapped")


def per_row(view: Any, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The ``int8`` gather before 2026-12-07 on a gallery of several blocks or memory-mapped ones: masks
    taken per block, then each row's codes, scales and Gram copied on its own (mapped rows in file order).
    Returns ``(codes, scales, Grams, mask)``, what ``ArrayView.gather`` returns."""
    from mssan_infer.gallery.base import extent

    starts = np.array([b.start for b in view.blocks], np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    k, d = len(rows), view.blocks[0].local.shape[2]
    mask_full = np.zeros((k, max(b.local.shape[1] for b in view.blocks)), np.float32)
    for bi in np.unique(which):
        sel = np.flatnonzero(which == bi)
        b = view.blocks[int(bi)]
        mask_full[sel, : b.mask.shape[1]] = np.take(b.mask, rows[sel] - b.start, axis=0)
    width = max(1, extent(mask_full))
    local = np.empty((k, width, d), np.uint8)
    scale = np.empty((k, width), np.float32)
    gram = np.empty((k, width, width), np.float16)
    blocks = [(b.start, np.asarray(b.local), np.asarray(b.scale), np.asarray(b.gram)) for b in view.blocks]
    rows_l, which_l = rows.tolist(), which.tolist()
    for pos in np.argsort(rows, kind="stable").tolist():
        start, b_local, b_scale, b_gram = blocks[which_l[pos]]
        r = rows_l[pos] - start
        w = min(width, b_local.shape[1])
        if w < width:  # a narrower block: the rest is the code of 0
            local[pos, w:] = 128
            gram[pos] = 0
            scale[pos, w:] = 0
        local[pos, :w] = b_local[r, :w]
        scale[pos, :w] = b_scale[r, :w]
        gram[pos, :w, :w] = b_gram[r, :w, :w]
    return local, scale, gram, np.ascontiguousarray(mask_full[:, :width])


def galleries(n: int, spill: Path, batch: int = 500, seed: int = 0) -> dict[str, Any]:
    """``{kind: (gallery, view)}``: an ``int8`` gallery of ``n`` random items as one block in RAM, as segments
    in RAM (added ``batch`` items at a time, a segment each) and as one memory-mapped block."""
    from mssan_infer import GalleryOptions
    from mssan_infer.gallery.memory import MemoryGallery

    rng = np.random.default_rng(seed)
    d, regions = 1024, 36
    out = {}
    for kind in KINDS:
        opts = GalleryOptions(
            layout="int8", mmap=kind == "memory-mapped", spill_dir=spill / kind.replace(" ", "-")
        )
        g = MemoryGallery(2 * d, d, opts, segment_rows=n if kind != "segments" else batch)
        stage1 = rng.normal(size=(n, 2 * d)).astype(np.float32)
        mask = np.ones((n, regions), np.float32)
        if kind == "segments":
            for a in range(0, n, batch):
                local = rng.normal(size=(min(n, a + batch) - a, regions, d)).astype(np.float32)
                g.add(stage1[a : a + batch], local, mask[a : a + batch], local @ local.transpose(0, 2, 1))
        else:  # one add: one block
            local = rng.normal(size=(n, regions, d)).astype(np.float32)
            g.add(stage1, local, mask, local @ local.transpose(0, 2, 1))
            del local
        out[kind] = (g, g.view())
    return out


def _time(fn: Callable[[np.ndarray], Any], n: int, threads: int, calls: int, ordered: bool) -> list[float]:
    """Median ms of ``fn(rows)`` on each of ``threads`` threads running at once."""
    res: list[float] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        ts = []
        for _ in range(calls):
            rows = rng.choice(n, ROWS, replace=False)
            rows = np.sort(rows) if ordered else rows
            t = time.perf_counter()
            fn(rows)
            ts.append(time.perf_counter() - t)
        res.append(float(np.median(ts) * 1e3))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return res


def run(n: int = 5000, calls: int = 300, rounds: int = 3, ordered: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "rows": ROWS, "ordered": ordered, "load_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="mssan-gather-") as tmp:
        views = galleries(n, Path(tmp))
        out["blocks"] = {kind: len(view.blocks) for kind, (_, view) in views.items()}
        table: dict[str, list[float]] = {}
        for _ in range(rounds):  # the two gathers interleaved, round after round
            for kind, (_, view) in views.items():
                fns: list[tuple[str, Callable[[np.ndarray], Any]]] = [("take per block", view.gather)]
                if (
                    kind != "one block"
                ):  # where the gather copied per row (one block in RAM: takes before too)
                    fns.append(("copy per row", lambda r, v=view: per_row(v, r)))
                for name, fn in fns:
                    for threads in (1, 2):
                        key = f"{kind}, {name}, {threads} thread{'s' * (threads > 1)}"
                        table.setdefault(key, []).extend(_time(fn, n, threads, calls, ordered))
        views.clear()  # the mapped files go with the folder
    out["load_at_end"] = list(os.getloadavg())
    out["p50_ms"] = {k: float(np.median(v)) for k, v in table.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gather", description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5000, help="items in each gallery")
    ap.add_argument("--calls", type=int, default=300, help="gathers per thread and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--unsorted", action="store_true", help="rows in stage-1 (random) order, not row order")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gather.json")
    a = ap.parse_args(argv)
    if a.items < 2 * ROWS or a.calls < 1 or a.rounds < 1:
        ap.error(f"--items must be at least {2 * ROWS}, --calls and --rounds at least 1")
    res = run(a.items, a.calls, a.rounds, not a.unsorted)
    print("blocks:", res["blocks"])
    for k, v in res["p50_ms"].items():
        print(f"{k}: {v:.3f} ms")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
