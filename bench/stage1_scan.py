"""``python -m bench.stage1_scan``: the int8 stage-1 scan's kernels side by side, against the bandwidth.

For each stage-1 width (``2D`` = 2048 for the paper model, 512 for the tiny one) and gallery size
(5K, 25K, 100K), one query asks for the top 100 with the over-fetch of a compressed stage 1
(``mssan_infer.gallery.view.fetch_rows`` rows). Every candidate scans the same gallery in interleaved rounds
(:func:`bench.timing.side_by_side`):

- ``faiss_sq8_*``: FAISS ``IndexScalarQuantizer(QT_8bit_direct_signed)`` over the int8 codes (the
  layout's scan), searched with the integer query: one index on one thread; the gallery's 8192-row
  sub-indexes in a threaded ``IndexShards``, a thread each (the searcher before this study), or
  grouped by :func:`~mssan_infer.gallery.stage1.code_searcher` (a thread per group of consecutive
  sub-indexes, one group per core, at least 4 MiB of codes each: a gallery built by adds); one index
  per such group (a loaded gallery);
- ``ort_mmi_gallery_a``: ONNX Runtime ``MatMulInteger`` with the gallery as the uint8 left operand
  (zero point 128) and a 7-bit int8 query, then :func:`top_rows`;
- ``ort_mmi_prepacked_*``: ``MatMulInteger`` with the gallery as a constant right operand that ONNX
  Runtime packs once (int8 codes, transposed) and a 7-bit uint8 query (zero point 64), one session
  or two halves on two threads, then :func:`top_rows`;
- ``numpy_f32``: numpy's float32 BLAS over the float32 rows, then :func:`top_rows`;
- ``simsimd_u8_2threads`` / ``simsimd_i8_2threads`` (when ``simsimd`` is installed; not a dependency):
  SimSIMD's integer dot products on its own two threads, over the codes as FAISS holds them (uint8,
  code + 128, made exact with each row's sum) or as int8, then the same top-k selection;
- ``gallery_topk_*``: the whole stage 1 of a :class:`~mssan_infer.gallery.memory.MemoryGallery`
  (``view.topk(q, 100)``) in the ``int8-stage1`` layout (loaded: float32 rows memory-mapped; or
  ``_added`` in batches of 5000) and the ``fp32`` layout, and ``rescore_select``: its
  part after the scan (query quantization, the error bound, the exact rescoring of the fetched rows
  from the memory-mapped float32 rows, the top-k selection) with the scan's result given: for the
  random query (the bound never beats the gaps of random data: every fetched row is rescored) and
  for ``_certified``, a query whose top 100 stand clear (the first ``2k`` rows certify them).

Each gallery is timed twice: ``warm`` (scans back to back, so a gallery that fits the last-level
cache is read from it) and ``cold`` (96 MB of other data read, untimed, between two scans, as the
other steps of a query do). Memory bandwidth is measured in the same run (the best of a 1 GiB numpy
read on 1 and 2 threads), and each scan's GB/s is its bytes read (codes, or float32 rows) over its
p50. Every kernel is checked to compute the same integer inner products as the reference before it
is timed. Writes
``bench/results/stage1_scan.json``. Nothing here is imported by the library. (The committed JSON also
timed FAISS ``IndexFlatIP`` and ``QT_fp16``, the scans of the ``faiss`` method and the ``fp16`` layout,
removed since: docs/experiments/2026-12-06-stage1-scan.md.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mssan_infer.gallery.view import fetch_rows

from .timing import loadavg, machine_info, numpy_blas_setter, side_by_side, versions

log = logging.getLogger("bench.stage1_scan")

K = 100
SIZES = (5000, 25000, 100000)
DIMS = (2048, 512)
EVICT_MB = 96  # read between two timed scans in the "cold" run: more than the last-level cache
GROUP_ROWS = 8192  # rows per FAISS sub-index in a gallery (mssan_infer.gallery.memory.CODE_ROWS)


# ---- bandwidth -----------------------------------------------------------------------------------
def bandwidth(pool: ThreadPoolExecutor, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s, best of ``repeats``) of numpy reductions over ``gib`` GiB: float32 sum on
    1 thread, on 2 threads (halves), uint64 bitwise-or on 2 threads; and a 2-thread copy (bytes read +
    written)."""
    n = int(gib * 2**30) // 8
    a = np.ones(n, np.uint64)
    f = a.view(np.float32)
    half = n // 2
    out = np.empty_like(a)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return min(t)

    def two(fn: Callable[[np.ndarray], Any], x: np.ndarray) -> Callable[[], Any]:
        h = len(x) // 2
        return lambda: [r.result() for r in (pool.submit(fn, x[:h]), pool.submit(fn, x[h:]))]

    def copy2() -> None:
        futs = [
            pool.submit(np.copyto, out[:half], a[:half]),
            pool.submit(np.copyto, out[half:], a[half:]),
        ]
        for r in futs:
            r.result()

    res = {
        "sum_f32_1thread": a.nbytes / best(lambda: f.sum()) / 1e9,
        "sum_f32_2threads": a.nbytes / best(two(np.sum, f)) / 1e9,
        "or_u64_2threads": a.nbytes / best(two(np.bitwise_or.reduce, a)) / 1e9,
        "copy_2threads": 2 * a.nbytes / best(copy2) / 1e9,
    }
    res["read_gbs"] = max(res["sum_f32_1thread"], res["sum_f32_2threads"], res["or_u64_2threads"])
    return res


# ---- ONNX Runtime graphs -------------------------------------------------------------------------
def _ort_session(graph: Any, threads: int, constants: dict[str, np.ndarray] | None = None) -> Any:
    """A session of ``graph`` whose ``constants`` are graph initializers given from memory (no copy into
    the model: the graph names them as external data, and ONNX Runtime packs them once)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names, values = [], []
    for name, arr in (constants or {}).items():
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=f"{name}.bin")  # never read: given below
        graph.initializer.append(t)
        names.append(name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if names:
        so.add_external_initializers(names, values)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess._mssan_keep = (values, constants)  # the constants' buffers live as long as the session
    return sess


def ort_gallery_a(dim: int, threads: int) -> Any:
    """``y [N, 1] int32 = (a - 128) @ b``: ``a`` the uint8 gallery ``[N, dim]``, ``b`` the int8 query."""
    from onnx import TensorProto as T
    from onnx import helper

    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "az"], ["y"])],
        "scan",
        [
            helper.make_tensor_value_info("a", T.UINT8, ["N", dim]),
            helper.make_tensor_value_info("b", T.INT8, [dim, 1]),
            helper.make_tensor_value_info("az", T.UINT8, []),
        ],
        [helper.make_tensor_value_info("y", T.INT32, ["N", 1])],
    )
    return _ort_session(g, threads)


def ort_prepacked(codes_t: np.ndarray, threads: int = 1) -> Any:
    """``y [1, N] int32 = (a - 64) @ b``: ``b`` the int8 gallery transposed ``[dim, N]``, a constant."""
    from onnx import TensorProto as T
    from onnx import helper

    dim, n = codes_t.shape
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "az"], ["y"])],
        "scan",
        [
            helper.make_tensor_value_info("a", T.UINT8, [1, dim]),
            helper.make_tensor_value_info("az", T.UINT8, []),
        ],
        [helper.make_tensor_value_info("y", T.INT32, [1, n])],
    )
    return _ort_session(g, threads, {"b": codes_t})


def top_rows(scores: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``fetch`` best of ``scores [N]``, best first -> ``(scores, rows)``.

    ``np.argpartition`` over the whole array takes a millisecond and more at 100K; so the rows at or
    above a threshold read from a strided sample (4x the share of rows wanted) are selected first, and
    only those partitioned (the whole array when the sample's threshold leaves fewer than ``fetch``)."""
    n = len(scores)
    if fetch >= n:
        part = np.arange(n)
    else:
        sample = scores[:: max(1, n // 4096)]
        m = min(len(sample), 4 * -(-fetch * len(sample) // n))
        cand = np.flatnonzero(scores >= np.partition(sample, len(sample) - m)[len(sample) - m])
        if len(cand) < fetch:
            cand = np.arange(n)
        part = cand[np.argpartition(-scores[cand], fetch - 1)[:fetch]]
    order = np.argsort(-scores[part], kind="stable")
    return scores[part[order]], part[order]


def int_dot(codes: np.ndarray, q: np.ndarray, rows: int = 8192) -> np.ndarray:
    """Exact integer inner products of int8 ``codes [N, dim]`` with an integer-valued ``q [dim]``."""
    qi = q.astype(np.int64)
    return (
        np.concatenate([codes[a : a + rows].astype(np.int64) @ qi for a in range(0, len(codes), rows)])
        if len(codes)
        else np.zeros(0, np.int64)
    )


# ---- one gallery -----------------------------------------------------------------------------------
def scan_candidates(
    x: np.ndarray, q: np.ndarray, qc: np.ndarray, fetch: int, pool: ThreadPoolExecutor, work: Path
) -> tuple[dict[str, Callable[[], Any]], dict[str, float], dict[str, Any]]:
    """``{name: call}`` for one gallery ``x [N, dim]`` and query ``q [dim]``, the bytes each reads,
    and facts (build times, exactness checks). ``qc``: a query whose top 100 stand clear of the rest."""
    import faiss

    from mssan_infer import GalleryOptions
    from mssan_infer.gallery.folder import encode_stage1
    from mssan_infer.gallery.memory import MemoryGallery
    from mssan_infer.gallery.stage1 import code_searcher, scan_parts
    from mssan_infer.gallery.view import ArrayView

    n, dim = x.shape
    facts: dict[str, Any] = {}
    codec, codes, outliers = encode_stage1("int8", x)
    assert codec.sigma is not None
    u8 = np.ascontiguousarray(codes.view(np.uint8) ^ np.uint8(0x80))
    qs = q.astype(np.float64) * codec.sigma
    q127 = np.rint(qs * 127.0 / np.abs(qs).max()).astype(np.float32)[None]  # FAISS's integer query
    q63 = np.rint(qs * 63.0 / np.abs(qs).max())
    ref63 = int_dot(codes, q63)  # what the 7-bit kernels must compute
    ref127 = int_dot(codes, q127[0])

    def sq8(rows: np.ndarray) -> Any:
        ix = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT
        )
        ix.add_sa_codes(np.ascontiguousarray(rows))
        return ix

    fns: dict[str, Callable[[], Any]] = {}
    nbytes: dict[str, float] = {}
    one = sq8(u8)
    fns["faiss_sq8_1thread"] = lambda: one.search(q127, fetch)
    subs = [sq8(u8[a : a + GROUP_ROWS]) for a in range(0, n, GROUP_ROWS)]
    shards = faiss.IndexShards(dim, True, True)  # the gallery's searcher before: a thread per sub-index
    for s in subs:
        shards.add_shard(s)
    fns["faiss_sq8_thread_per_sub"] = lambda: shards.search(q127, fetch)
    grouped, held = code_searcher(faiss, dim, subs)  # 8192-row sub-indexes, one group per core
    fns["faiss_sq8_grouped_subs"] = lambda: grouped.search(q127, fetch)
    cuts = np.linspace(0, n, scan_parts(u8.nbytes) + 1).astype(int)  # as MemoryGallery.adopt cuts them
    per_core, held2 = code_searcher(faiss, dim, [sq8(u8[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    fns["faiss_sq8_index_per_core"] = lambda: per_core.search(q127, fetch)  # a loaded gallery's
    keep: list[Any] = [one, subs, shards, grouped, held, per_core, held2]
    got = {
        name: fn()
        for name, fn in fns.items()  # every FAISS variant finds the reference's fetch-th score
    }
    kth = np.sort(ref127)[::-1][fetch - 1]
    facts["faiss_kth_equal"] = all(float(r[0][0, -1]) == float(kth) for r in got.values())
    facts["faiss_rows_equal"] = all(
        np.array_equal(np.sort(r[1][0]), np.sort(got["faiss_sq8_1thread"][1][0])) for r in got.values()
    )

    az128, az64 = np.array(128, np.uint8), np.array(64, np.uint8)
    b63 = q63.astype(np.int8)[:, None]
    for threads in (2,):
        s = ort_gallery_a(dim, threads)
        feeds = {"a": u8, "b": b63, "az": az128}
        facts[f"ort_mmi_gallery_a_t{threads}_exact"] = bool(
            np.array_equal(s.run(None, feeds)[0][:, 0], ref63)
        )
        fns[f"ort_mmi_gallery_a_t{threads}"] = lambda s=s, feeds=feeds: top_rows(
            s.run(None, feeds)[0][:, 0], fetch
        )
        keep.append(s)
    a64 = (q63 + 64).astype(np.uint8)[None]
    t0 = time.perf_counter()
    whole = ort_prepacked(np.ascontiguousarray(codes.T))
    facts["ort_prepacked_build_s"] = time.perf_counter() - t0
    halves = [ort_prepacked(np.ascontiguousarray(c.T)) for c in (codes[: n // 2], codes[n // 2 :])]
    feeds = {"a": a64, "az": az64}
    facts["ort_prepacked_exact"] = bool(np.array_equal(whole.run(None, feeds)[0][0], ref63))
    fns["ort_mmi_prepacked_1thread"] = lambda: top_rows(whole.run(None, feeds)[0][0], fetch)

    def two_halves() -> Any:
        futs = [pool.submit(h.run, None, feeds) for h in halves]
        return top_rows(np.concatenate([f.result()[0][0] for f in futs]), fetch)

    fns["ort_mmi_prepacked_2threads"] = two_halves
    keep += [whole, halves]

    fns["numpy_f32"] = lambda: top_rows(x @ q, fetch)
    try:  # not a dependency: `pip install simsimd` to time its integer dot products
        import simsimd
    except ImportError:
        facts["simsimd"] = "not installed"
    else:
        facts["simsimd"] = simsimd.__version__
        qu = (q127 + 128).astype(np.uint8)  # the integer query + 128, as the stored codes are
        rowsum = u8.sum(axis=1, dtype=np.int64).astype(np.float64)
        shift = 128.0 * float(qu.sum(dtype=np.int64)) - 128.0 * 128.0 * dim
        qi8 = q127.astype(np.int8)

        def ss_u8() -> np.ndarray:  # (c+128).(q+128) - 128 sum(c+128) - 128 sum(q+128) + 128^2 dim = c.q
            s = np.asarray(simsimd.cdist(qu, u8, metric="dot", dtype="uint8", threads=2))[0]
            return s - 128.0 * rowsum - shift  # type: ignore[no-any-return]

        def ss_i8() -> np.ndarray:  # codes stored as int8 (not how FAISS holds them)
            return np.asarray(simsimd.cdist(qi8, codes, metric="dot", dtype="int8", threads=2))[0]

        facts["simsimd_u8_exact"] = bool(np.array_equal(ss_u8(), ref127))
        facts["simsimd_i8_exact"] = bool(np.array_equal(ss_i8(), ref127))
        fns["simsimd_u8_2threads"] = lambda: top_rows(ss_u8(), fetch)  # on the codes FAISS holds
        fns["simsimd_i8_2threads"] = lambda: top_rows(ss_i8(), fetch)
    for name in fns:
        nbytes[name] = float(n * dim * (4 if name == "numpy_f32" else 1))

    # the gallery's own stage 1: a loaded index (float32 rows memory-mapped, codes in RAM)
    st = np.lib.format.open_memmap(work / f"stage1-{n}-{dim}.npy", mode="w+", dtype=np.float32, shape=x.shape)
    st[:] = x
    st.flush()
    st = np.load(work / f"stage1-{n}-{dim}.npy", mmap_mode="r", allow_pickle=False)
    blank = (np.zeros((n, 1, 1), np.float32), np.ones((n, 1), np.float32), np.zeros((n, 1, 1), np.float32))
    comp = MemoryGallery(dim, 1, GalleryOptions(layout="int8-stage1"))
    comp.adopt((st, *blank), list(range(n)), codes=codes, codec=codec, outliers=outliers)
    exact = MemoryGallery(dim, 1)
    exact.adopt((x, *blank), list(range(n)))
    q2 = q[None]
    added = MemoryGallery(dim, 1, GalleryOptions(layout="int8-stage1"))
    for a in range(0, n, 5000):
        b = min(n, a + 5000)
        added.add(x[a:b], blank[0][a:b], blank[1][a:b], blank[2][a:b])
    aview = added.view()
    facts["gallery_int8_added_equals_fp32"] = bool(
        np.array_equal(aview.topk(q2, K)[0], exact.view().topk(q2, K)[0])
    )
    fns["gallery_topk_int8_added"] = lambda: aview.topk(q2, K)
    cview, eview = comp.view(), exact.view()
    fns["gallery_topk_int8"] = lambda: cview.topk(q2, K)
    fns["gallery_topk_fp32"] = lambda: eview.topk(q2, K)
    facts["gallery_int8_equals_fp32"] = bool(np.array_equal(cview.topk(q2, K)[0], eview.topk(q2, K)[0]))
    assert cview.searcher is not None and cview.codec is not None
    fetched = fetch_rows(n, K, cview.overfetch)

    def given(query: np.ndarray) -> Any:
        """``cview`` with the scan's result for ``query`` already computed (times what follows the scan)."""
        scanned = cview.searcher.search(cview.codec.query(query)[0], fetched)

        class Given:
            def search(self, _q: np.ndarray, _k: int) -> Any:
                return scanned

        return dataclasses.replace(cview, searcher=Given())

    qc2 = qc[None]
    rview, rview_c = given(q2), given(qc2)
    fns["rescore_select"] = lambda: rview.topk(q2, K)
    fns["rescore_select_certified"] = lambda: rview_c.topk(qc2, K)
    facts["certified_query_equals_fp32"] = bool(
        np.array_equal(rview_c.topk(qc2, K)[0], eview.topk(qc2, K)[0])
    )
    original = ArrayView._rescore
    for name, view, query in (("rescore_select", rview, q2), ("rescore_select_certified", rview_c, qc2)):
        counted: list[int] = []
        ArrayView._rescore = lambda self, qv, rows, *a, counted=counted, **kw: (  # type: ignore[method-assign]
            counted.append(len(rows)) or original(self, qv, rows, *a, **kw)
        )
        try:
            view.topk(query, K)
        finally:
            ArrayView._rescore = original  # type: ignore[method-assign]
        facts[f"{name}_rows"] = sum(counted)
        nbytes[name] = float(sum(counted) * dim * 4)
    nbytes["gallery_topk_int8"] = float(n * dim + facts["rescore_select_rows"] * dim * 4)
    nbytes["gallery_topk_int8_added"] = nbytes["gallery_topk_int8"]
    nbytes["gallery_topk_fp32"] = float(n * dim * 4)
    keep += [comp, exact, cview, eview, rview, rview_c, st, added, aview]
    facts["_keep"] = keep
    return fns, nbytes, facts


def run(
    sizes: tuple[int, ...], dims: tuple[int, ...], repeats: int, work: Path, bandwidth_gib: float = 1.0
) -> dict[str, Any]:
    pool = ThreadPoolExecutor(2)
    numpy_blas_setter()(2)
    out: dict[str, Any] = {"machine": machine_info(), "versions": versions(), "k": K}
    out["fetch"] = {n: fetch_rows(n, K) for n in sizes}
    out["bandwidth_gbs"] = bandwidth(pool, bandwidth_gib)
    read = out["bandwidth_gbs"]["read_gbs"]
    log.info("bandwidth %s", out["bandwidth_gbs"])
    rng = np.random.default_rng(0)
    other = np.ones(EVICT_MB * 2**20 // 4, np.float32)

    def evict() -> None:
        other.sum()

    out["evict_mb"] = EVICT_MB
    out["scans"] = []
    for dim in dims:
        for n in sizes:
            x = rng.standard_normal((n, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            q = rng.standard_normal(dim, dtype=np.float32)
            q /= np.linalg.norm(q)
            qc = rng.standard_normal(dim, dtype=np.float32)
            qc /= np.linalg.norm(qc)
            x[:K] += 0.3 * qc  # the top 100 of qc stand clear: its stage 1 is certified early
            x[:K] /= np.linalg.norm(x[:K], axis=1, keepdims=True)
            fns, nbytes, facts = scan_candidates(x, q, qc, fetch_rows(n, K), pool, work)
            entry: dict[str, Any] = {"dim": dim, "items": n, "loadavg_start": loadavg()}
            for cache in ("warm", "cold"):
                if (
                    cache == "warm"
                ):  # scans back to back: a gallery that fits the last-level cache stays there
                    timed = side_by_side(fns, repeats, warmup=3, max_seconds=60.0, block=5)
                else:  # EVICT_MB of other data read between scans, as a query's other steps do
                    after = {name: evict for name in fns}
                    timed = side_by_side(fns, repeats * 5, warmup=1, max_seconds=60.0, after=after)
                rows = {}
                for name, st in timed.items():
                    gbs = nbytes[name] / (st["p50_ms"] * 1e-3) / 1e9
                    rows[name] = {**st, "bytes": nbytes[name], "gbs": gbs, "of_bandwidth": gbs / read}
                entry[cache] = rows
                log.info(
                    "dim %d, %d items, %s: %s",
                    dim,
                    n,
                    cache,
                    ", ".join(f"{k} {v['p50_ms']:.3f}" for k, v in rows.items()),
                )
            facts.pop("_keep")
            entry.update({"loadavg_end": loadavg(), "facts": facts})
            out["scans"].append(entry)
            del fns
    out["loadavg_end"] = loadavg()
    pool.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage1_scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="gallery sizes, comma separated")
    p.add_argument("--dims", default=",".join(map(str, DIMS)), help="stage-1 widths (2D), comma separated")
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds (5 timed calls each)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="GiB read to measure the bandwidth")
    p.add_argument("--out", default="bench/results/stage1_scan.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="mssan-stage1-scan-") as work:
        res = run(
            tuple(int(s) for s in args.sizes.split(",")),
            tuple(int(d) for d in args.dims.split(",")),
            args.repeats,
            Path(work),
            args.bandwidth_gib,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
