"""``python -m bench.scan_bits``: stage-1 scans that read fewer bytes than the ``int8`` layout's, on the
bench's real galleries: how many rows each must fetch to hold the exact top 100, and what a stage 1 built
on it costs beside the layout's.

The ``int8`` layout scans 8-bit codes, 2 KB a row at the default model's stage-1 width (2048), at the
machine's bandwidth from 25K images up (docs/experiments/2026-12-06-stage1-scan.md): fewer bytes is
the one way to scan faster. Candidates, each over codes of the gallery's float32 stage-1 rows, searched
with the same queries (captions, as the latency section encodes them):

- ``sq8``: the layout's stage 1 (FAISS ``QT_8bit_direct_signed``, then the exact rescoring of the fetched
  rows, ``view.topk``), and its scan alone;
- ``nbits4``: 4-bit codes with per-dimension affine steps (each dimension's min..max in 15 steps: 1 KB a
  row), scanned by ONNX Runtime's ``MatMulNBits`` (the codes a constant that it packs once, the query
  scaled by the steps, int8 compute: ``accuracy_level=4``) on 2 threads, the best ``fetch`` rows by
  ``np.argpartition``, rescored exactly from the float32 rows as the layout rescores;
- ``faiss_sq4``: FAISS ``IndexScalarQuantizer(QT_4bit)``, the same family of codes (one thread);
- ``pq_fastscan``: FAISS ``IndexPQFastScan`` with a 4-bit code per 2 dimensions (0.5 KB a row; trained on
  at most ``--train`` rows; one thread).

For each: bytes of codes, seconds to build, the 1-based rank in its order of the last row of each query's
exact top 100 (p50 / p99 / max), and p50 times side by side (:func:`bench.timing.side_by_side`, cold: 64
MB of other data read between two calls, as a query's other steps do). Run the latency section first (it
writes the galleries). Nothing here is imported by the library.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .overfetch import rank_summary
from .query_path import _gallery
from .timing import machine_info, side_by_side, versions

K = 100
BLOCK = 128  # MatMulNBits' block along the stage-1 dimension


def affine4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes ``[N, D] uint8`` in 0..15 of float32 rows ``x [N, D]``, with each dimension's minimum
    and step: ``x ~ low + codes * step`` (each value within ``step / 2``)."""
    x = np.asarray(x, np.float32)
    low = x.min(axis=0)
    step = (np.maximum(x.max(axis=0) - low, 1e-12) / 15.0).astype(np.float32)
    return np.clip(np.rint((x - low) / step), 0, 15).astype(np.uint8), low, step


class Nbits4Scan:
    """``scores(q)``: ``codes @ (q * step)`` for every row (the inner products less the query's constant
    ``q . low``, which orders no row) by ONNX Runtime's ``MatMulNBits`` over packed 4-bit codes."""

    def __init__(self, codes: np.ndarray, step: np.ndarray, threads: int = 2, block: int = BLOCK) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n, d = codes.shape
        self.dim, self.step = d, step
        self.k = -(-d // block) * block  # padded to whole blocks (zero codes times a zero query)
        blocks = self.k // block
        padded = np.zeros((n, self.k), np.uint8)
        padded[:, :d] = codes
        pairs = padded.reshape(n, blocks, block)
        packed = pairs[..., 0::2] | (pairs[..., 1::2] << 4)  # [N, blocks, block / 2], low nibble first
        node = helper.make_node(
            "MatMulNBits",
            ["A", "B", "scales", "zero_points"],
            ["Y"],
            domain="com.microsoft",
            K=self.k,
            N=n,
            bits=4,
            block_size=block,
            accuracy_level=4,
        )
        graph = helper.make_graph(
            [node],
            "scan",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, self.k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
            initializer=[
                numpy_helper.from_array(np.ascontiguousarray(packed), "B"),
                numpy_helper.from_array(np.ones(n * blocks, np.float32), "scales"),
                numpy_helper.from_array(np.zeros(n * ((blocks + 1) // 2), np.uint8), "zero_points"),
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def scores(self, q: np.ndarray) -> np.ndarray:
        """``[Q, N]`` for float32 queries ``[Q, D]``."""
        a = np.zeros((len(q), self.k), np.float32)
        a[:, : self.dim] = q * self.step
        return self.session.run(None, {"A": a})[0]  # type: ignore[no-any-return]


def last_ranks(order: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``[Q]``: the 1-based position in ``order [Q, M]`` (rows, best first) of the last row of ``exact [Q,
    k]``; ``M + 1`` when a row of it is not in ``order``."""
    out = np.empty(len(order), np.int64)
    for i in range(len(order)):
        pos = {int(r): j for j, r in enumerate(order[i])}
        out[i] = max(pos.get(int(r), order.shape[1]) for r in exact[i]) + 1
    return out


def nbits4_topk(view: Any, scan: Nbits4Scan, q: np.ndarray, fetch: int, k: int = K) -> np.ndarray:
    """One query's stage-1 top ``k`` rows through ``scan``: its best ``fetch`` rows rescored exactly as the
    gallery rescores (float32 rows, read in place), best first, ties by row."""
    s = scan.scores(q[None])[0]
    fetch = min(fetch, len(s))
    rows = np.sort(np.argpartition(-s, fetch - 1)[:fetch]) if fetch < len(s) else np.arange(len(s))
    exact = view._rescore(q, rows, in_place=True)
    return rows[np.lexsort((rows, -exact))[:k]]  # type: ignore[no-any-return]


def measure_view(
    view: Any, q: np.ndarray, rounds: int, fetch: int, train: int, k: int = K, faiss_kinds: bool = True
) -> dict[str, Any]:
    """The candidates of the module docstring on one gallery view (``int8`` layout) and float32 queries
    ``q [Q, 2D]``."""
    import faiss

    full = np.ascontiguousarray(np.concatenate([b.stage1 for b in view.blocks]), dtype=np.float32)
    n, d = full.shape
    k = min(k, n)
    exact = np.argsort(-(q @ full.T), axis=1, kind="stable")[:, :k]
    deep = min(n, 64 * k)
    out: dict[str, Any] = {"items": n, "queries": len(q), "fetch_nbits4": fetch, "candidates": {}}
    cands = out["candidates"]
    qq, _ = view.codec.query(q)
    cands["sq8"] = {
        "bytes_per_row": d,
        "rank_of_last_exact": rank_summary(last_ranks(view.searcher.search(qq, deep)[1], exact)),
    }
    t = time.perf_counter()
    codes, _low, step = affine4(full)
    scan = Nbits4Scan(codes, step)
    cands["nbits4"] = {
        "bytes_per_row": d / 2,
        "build_s": time.perf_counter() - t,
        "rank_of_last_exact": rank_summary(last_ranks(np.argsort(-scan.scores(q), axis=1)[:, :deep], exact)),
    }
    exact_sets = [set(e.tolist()) for e in exact]
    cands["nbits4"]["topk_exact_share"] = float(
        np.mean(
            [set(nbits4_topk(view, scan, q[i], fetch, k).tolist()) == exact_sets[i] for i in range(len(q))]
        )
    )
    cands["sq8"]["topk_exact_share"] = float(
        np.mean([set(view.topk(q[i : i + 1], k)[0][0].tolist()) == exact_sets[i] for i in range(len(q))])
    )
    state = {"i": 0}

    def query() -> np.ndarray:
        return q[state["i"] % len(q)]

    fns: dict[str, Callable[[], Any]] = {
        "sq8 stage 1 (scan + rescoring)": lambda: view.topk(query()[None], k),
        "sq8 scan": lambda: view.searcher.search(view.codec.query(query()[None])[0], 2 * k),
        "nbits4 stage 1 (scan + rescoring)": lambda: nbits4_topk(view, scan, query(), fetch, k),
        "nbits4 scan": lambda: scan.scores(query()[None]),
    }
    if faiss_kinds:
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        sq4 = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT)
        sq4.train(full)
        sq4.add(full)
        cands["faiss_sq4"] = {
            "bytes_per_row": sq4.sa_code_size(),
            "build_s": time.perf_counter() - t,
            "rank_of_last_exact": rank_summary(last_ranks(sq4.search(q, deep)[1], exact)),
        }
        t = time.perf_counter()
        pq = faiss.IndexPQFastScan(d, d // 2, 4, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        pq.train(full[np.sort(rng.choice(n, min(n, train), replace=False))])
        pq.add(full)
        cands["pq_fastscan"] = {
            "bytes_per_row": d // 4,
            "build_s": time.perf_counter() - t,
            "rank_of_last_exact": rank_summary(last_ranks(pq.search(q, deep)[1], exact)),
        }
        fns["faiss_sq4 scan (1 thread)"] = lambda: sq4.search(query()[None], fetch)
        fns["pq_fastscan scan (1 thread)"] = lambda: pq.search(query()[None], fetch)
    flush = np.ones(16 << 20, np.float32)  # 64 MB: the other steps of a query evict the codes

    def after() -> None:
        state["i"] += 1
        flush.sum()

    out["p50_ms"] = {
        name: v["p50_ms"] for name, v in side_by_side(fns, rounds, after={m: after for m in fns}).items()
    }
    out["deep"] = deep
    return out


def measure(
    work: Path, specs: list[str], queries: int, rounds: int, fetch: int, train: int
) -> dict[str, Any]:
    from mssan_infer import GalleryOptions, OnnxRuntimeOptions, Retriever
    from mssan_infer.bundle import load_bundle

    from .fixtures import random_captions
    from .text_tower import default_text_model, minilm_speed_bundle

    bundle, _ = minilm_speed_bundle(work, default_text_model(), 1024, 2048, 2)
    bid = load_bundle(bundle, verify=False).bundle_id
    out: dict[str, Any] = {
        "k": K,
        "machine": machine_info(),
        "versions": versions(),
        "load_at_start": list(os.getloadavg()),
        "galleries": {},
    }
    for spec in specs:
        key, index, image_queries, mmap = _gallery(work, spec, bid, "fast")
        if image_queries:
            raise SystemExit(f"--galleries: {spec!r}: text queries only (t2i:N or t2i:N:mmap)")
        if not (index / "index.json").is_file():
            raise SystemExit(f"no gallery {index}: run `python -m bench --sections latency` first")
        r = Retriever.load(
            bundle,
            OnnxRuntimeOptions(threads=2),
            index=index,
            gallery=GalleryOptions(layout="int8", mmap=mmap),
            verify=False,
        )
        q = np.concatenate([r.encode_texts([c]).stage1 for c in random_captions(queries, seed=7)])
        row = measure_view(r.images.view(), q, rounds, fetch, train)
        out["galleries"][key] = row
        ranks = ", ".join(f"{c} {v['rank_of_last_exact']['max']}" for c, v in row["candidates"].items())
        times = ", ".join(f"{c} {v:.3f}" for c, v in row["p50_ms"].items())
        print(f"{key}: last exact row at rank (max): {ranks}; p50 ms: {times}", flush=True)
        r.close()
    out["load_at_end"] = list(os.getloadavg())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scan_bits", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mssan-bench"))
    ap.add_argument("--galleries", default="t2i:5000,t2i:25000,t2i:100000:mmap")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=300, help="timed calls per candidate")
    ap.add_argument("--fetch", type=int, default=512, help="rows the nbits4 stage 1 rescores")
    ap.add_argument("--train", type=int, default=20000, help="most rows the PQ codebooks are trained on")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    specs = a.galleries.split(",")
    for spec in specs:  # refused before any bundle is made
        _gallery(a.work, spec, "", "fast")
    res = measure(a.work, specs, a.queries, a.rounds, a.fetch, a.train)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
