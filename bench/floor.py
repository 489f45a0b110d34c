"""The floor of a query: each step's measured p50 beside the least time this machine needs for it,
both measured in the same run (part of the latency section, for every gallery it times in all layouts).

Two query paths per gallery, in one interleaved group (:func:`floor_group`):

- ``fp32``: the exact default -- fp32 graphs, ``fp32`` layout;
- ``int8``: the fast path -- the int8 text encoder, ``int8`` layout (an image query runs the fp32 image
  encoder either way).

Steps, each timed alone on the same gallery and queries, and their floors:

- encode: ``encode_texts([q])`` / ``encode_images(q)``; floor: the encoder graph alone (one ONNX Runtime
  session run on prepared feeds, the backend's thread settings; no tokenizer, no checks), its fastest
  round.
- stage 1: the gallery view's top 100; floor: the bytes it scans (the stored stage-1 rows, plus the
  over-fetched float32 rows a compressed stage 1 rescores) / the measured memory bandwidth.
- gather: the 100 candidates' stored locals, scales, masks and Grams; floor: those bytes / bandwidth.
  On the exact path (float32 locals, the query scorers) the gather is also the big product: each row's
  locals times the query's, read where the row lies; its floor is then the larger of those bytes /
  bandwidth and the product's kernel time (below).
- scorer: the query scorer on the gathered candidates; floor: the larger of its big product's FLOPs /
  the peak of the library kernel on the same shapes (its fastest round), timed in the same rounds
  (ONNX Runtime ``MatMulInteger`` u8 x s8 for int8 candidates; sgemm -- the faster of numpy's BLAS and
  ONNX Runtime's ``MatMul`` -- for float32 ones), and the bytes it reads / bandwidth (on the exact path
  the product is the gather's: the bytes alone).
- the rest: Python, checks and hand-offs between the steps, measured inside the query: a traced run of the
  same search times each step where it runs (``e2e_traced``), the rest is its total minus the four; floor 0.

Each step is timed twice: inside the query (the traced run) and alone in a loop. Inside a query a step
finds its data (weights, codes) evicted by the other steps' reads; ``cold_ms`` = the steps inside minus
the steps alone. The gather and the scorer alone take all 100 candidates on one thread; inside the
query the rerank runs in shares, a thread each (``SearchOptions.rerank_threads``), and each step counts
its slowest thread, so ``cold_ms`` can be negative.

``floor_ratio`` = end-to-end p50 / the sum of the step floors. The bandwidth is the larger of the
section's float32 matrix-vector product over 1 GiB (numpy's BLAS, the bench's threads) and a numpy sum
over 1 GiB (one thread), measured at the start of the section. A step whose data stays in the CPU's
caches between calls (a 5K-image fp32 stage 1 is 41 MB, this machine's L3 32 MB) can beat its
bandwidth floor: its ratio is then below 1.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from mssan_infer.gallery.base import Candidates, extent
from mssan_infer.gallery.storage import Layout
from mssan_infer.gallery.view import fetch_rows
from mssan_infer.search import backend_score_fn, uses_query_scorers

from .labels import DIRECTIONS, count
from .timing import cpu_identity_text

__all__ = [
    "PATHS",
    "STEPS",
    "sum_bandwidth_gbs",
    "floor_bandwidth",
    "stage1_bytes",
    "candidate_bytes",
    "scorer_flops",
    "floor_row",
    "add_own_process",
    "traced_steps",
    "record_inside",
    "floor_group",
    "floor_rows",
    "summarise_floor",
    "floor_markdown",
    "floor_figure",
]

log = logging.getLogger(__name__)

PATHS = {
    "fp32": "the exact default (fp32 graphs, fp32 layout)",
    "int8": "the fast path (int8 text encoder, int8 layout)",
}
PATH_WORDS = {"fp32": "exact default, fp32 layout", "int8": "fast path, int8 layout"}
STEPS = ("encode", "stage1", "gather", "scorer")
STEP_WORDS = {
    "encode": "encode the query",
    "stage1": "stage 1 (top 100)",
    "gather": "gather 100 candidates",
    "scorer": "scorer (100 candidates)",
    "non_kernel": "the rest (Python, checks, hand-offs)",
}
IN_QUERY = (*STEPS, "non_kernel", "total")
OWN_WORDS = (
    "in fresh processes that each hold only this path and its gallery, median of their p50s; "
    "`_shared`: in the section's own process"
)
RERANK = 100


# ---- arithmetic (no timing) ---------------------------------------------------------------------
def sum_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s, best of ``repeats``) of a numpy float32 sum over ``gib`` GiB (one
    thread)."""
    a = np.ones(int(gib * 2**30 / 4), np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    n = a.nbytes
    del a
    return n / best / 1e9


def floor_bandwidth(gemv_gbs: float | None) -> dict[str, float]:
    """The bandwidth the floors divide by: the larger of ``gemv_gbs`` (the section's matrix-vector
    probe) and a numpy sum measured now."""
    s = sum_bandwidth_gbs()
    g = float(gemv_gbs) if gemv_gbs else 0.0
    return {"gemv_gbs": g, "sum_gbs": s, "gbs": max(g, s)}


def stage1_bytes(
    layout: Layout, n: int, d2: int, k: int = RERANK, overfetch: int | None = None, outliers: int = 0
) -> float:
    """Bytes a stage-1 top ``k`` reads from a gallery of ``n`` items: every stored stage-1 row, plus, for a
    compressed stage 1, the float32 rows of the over-fetched candidates and outliers it rescores (see
    ``ArrayView._compressed_topk``)."""
    size = {"float32": 4, "float16": 2, "int8": 1}[layout.stage1]
    scan = n * d2 * size
    if layout.compressed_stage1 and k < n:
        fetch = fetch_rows(n, k, overfetch)
        scan += (fetch + outliers) * d2 * 4
    return float(scan)


def candidate_bytes(c: Candidates) -> float:
    """Bytes of gathered candidates: locals (codes) or their similarities to the query, scales, masks,
    Grams."""
    arrays = [c.local, c.similarity, c.mask, c.gram, c.scale]
    return float(sum(a.nbytes for a in arrays if a is not None))


def scorer_flops(k: int, p: int, q: int, d: int) -> float:
    """FLOPs of the scorer's big product ``[K*P, D] x [D, Q]`` (a multiply and an add each)."""
    return 2.0 * k * p * q * d


def floor_row(
    p50: Mapping[str, float],
    e2e_p99: float,
    nbytes: Mapping[str, float],
    flops: float,
    bandwidth_gbs: float,
    inside: Mapping[str, float] | None = None,
    product_in_gather: bool = False,
) -> dict[str, Any]:
    """One query path's steps beside their floors.

    Args:
        p50: measured p50 ms of ``e2e``, ``encode``, ``stage1``, ``gather``, ``scorer`` (each alone),
            ``encoder_graph`` (the encoder alone) and ``kernel`` (the library kernel on the scorer's big
            product).
        e2e_p99: the end-to-end p99 (ms).
        nbytes: bytes read by ``stage1``, ``gather`` and ``scorer``.
        flops: the scorer's big product.
        bandwidth_gbs: memory bandwidth (GB/s).
        inside: p50 ms of each step, of the rest and of the total inside traced queries (:data:`IN_QUERY`);
            without it the rest is the end to end minus the steps alone.
        product_in_gather: the gather computes the big product (the exact path: float32 candidates
            gathered as their similarities to the query); its floor then holds the kernel's.
    Returns:
        ``{"steps": {step: {"p50_ms", "floor_ms", "in_query_ms", ...}}, "e2e_p50_ms", "e2e_p99_ms",
        "floor_ms", "floor_ratio", "cold_ms", "bandwidth_gbs"}``; ``steps`` holds :data:`STEPS` (``p50_ms``
        alone) and ``non_kernel`` (the rest; floor 0).
    """
    ms_per_byte = 1e3 / (bandwidth_gbs * 1e9)
    steps: dict[str, dict[str, Any]] = {
        "encode": {"p50_ms": p50["encode"], "floor_ms": p50["encoder_graph"], "floor_is": "encoder graph"},
        "stage1": {
            "p50_ms": p50["stage1"],
            "floor_ms": nbytes["stage1"] * ms_per_byte,
            "bytes": nbytes["stage1"],
        },
        "gather": {"p50_ms": p50["gather"], "bytes": nbytes["gather"]},
        "scorer": {"p50_ms": p50["scorer"], "bytes": nbytes["scorer"]},
    }
    # the big product's step: its floor is the larger of the kernel alone and its bytes / bandwidth
    kernel_ms = p50["kernel"]
    for name in ("gather", "scorer"):
        st = steps[name]
        st["bytes_ms"] = nbytes[name] * ms_per_byte
        st["floor_ms"], st["floor_is"] = st["bytes_ms"], "bytes read"
    held = steps["gather" if product_in_gather else "scorer"]
    held.update(
        {
            "kernel_ms": kernel_ms,
            "flops": flops,
            "kernel_gflops": flops / (kernel_ms * 1e6) if kernel_ms > 0 else float("nan"),
        }
    )
    if kernel_ms >= held["bytes_ms"]:
        held["floor_ms"], held["floor_is"] = kernel_ms, "kernel FLOPs"
    alone = sum(steps[s]["p50_ms"] for s in STEPS)
    if inside:
        for s in STEPS:
            steps[s]["in_query_ms"] = inside[s]
        rest, cold = inside["non_kernel"], sum(inside[s] for s in STEPS) - alone
    else:
        rest, cold = p50["e2e"] - alone, float("nan")
    steps["non_kernel"] = {"p50_ms": rest, "floor_ms": 0.0, "in_query_ms": rest}
    for st in steps.values():
        st["ratio"] = st["p50_ms"] / st["floor_ms"] if st["floor_ms"] > 0 else float("nan")
    floor = sum(steps[s]["floor_ms"] for s in STEPS)
    return {
        "steps": steps,
        "e2e_p50_ms": p50["e2e"],
        "e2e_p99_ms": e2e_p99,
        "floor_ms": floor,
        "floor_ratio": p50["e2e"] / floor if floor > 0 else float("nan"),
        "cold_ms": cold,
        "traced_p50_ms": inside["total"] if inside else float("nan"),
        "bandwidth_gbs": bandwidth_gbs,
    }


# ---- a query's steps where they run ------------------------------------------------------------
@contextlib.contextmanager
def traced_steps(r: Any, text_query: bool) -> Iterator[dict[str, float]]:
    """Time the steps of the searches ``r`` runs inside the block where they run.

    Yields ``took``, filled once the block ends: seconds spent in each of :data:`STEPS` (the query
    encoder, the gallery view's ``topk`` and ``gather``, the scorer) and ``"total"`` (the whole block).
    A step that runs on several threads at once (a rerank cut into shares) counts the thread that spent
    the most in it. The view's class, ``r``'s scorers and ``r``'s encoder are wrapped for the block
    only.
    """
    took = dict.fromkeys(STEPS, 0.0)
    per_thread: dict[tuple[str, int], float] = {}
    lock = threading.Lock()

    def timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                key = (step, threading.get_ident())
                with lock:
                    per_thread[key] = per_thread.get(key, 0.0) + dt

        return run

    cls = type((r.images if text_query else r.texts).view())
    enc = "encode_texts" if text_query else "encode_images"
    topk, gather_fn, scoring = cls.topk, cls.gather, r._scoring
    cls.topk, cls.gather = timed("stage1", topk), timed("gather", gather_fn)  # type: ignore[method-assign]

    def timed_scoring(query_is_text: bool) -> tuple[Callable[..., Any], Any]:
        score, limits = scoring(query_is_text)
        return timed("scorer", score), limits

    r._scoring = timed_scoring
    setattr(r, enc, timed("encode", getattr(r, enc)))
    t0 = time.perf_counter()
    try:
        yield took
    finally:
        took["total"] = time.perf_counter() - t0
        for (step, _), seconds in per_thread.items():
            took[step] = max(took[step], seconds)
        cls.topk, cls.gather = topk, gather_fn  # type: ignore[method-assign]
        delattr(r, "_scoring")
        delattr(r, enc)


def record_inside(inside: dict[str, list[float]], took: Mapping[str, float]) -> None:
    """Append one traced query (:func:`traced_steps`) to ``inside``: ms per step of :data:`IN_QUERY`, the
    rest (``non_kernel``) being the total minus the steps."""
    for s in STEPS:
        inside[s].append(took[s] * 1e3)
    inside["non_kernel"].append((took["total"] - sum(took[s] for s in STEPS)) * 1e3)
    inside["total"].append(took["total"] * 1e3)


def add_own_process(row: dict[str, Any], own: Mapping[str, Any]) -> None:
    """Make a path's floor row (:func:`floor_row`) speak for the process a deployment runs.

    ``own`` is ``bench.query_path.own_process``: the same path searched in fresh processes that hold only
    it and its gallery. Its end-to-end p50 / p99 and its steps inside the query (``in_query_ms``, the rest,
    ``cold_ms``) replace the shared process's, which stay as ``e2e_p50_ms_shared``, ``e2e_p99_ms_shared``,
    ``floor_ratio_shared`` and each step's ``in_shared_ms``. The floors and the steps alone stay the
    section's (measured in the shared process, kernels at their fastest round).
    """
    steps = row["steps"]
    inside = own["inside"]
    row["own_process"] = dict(own)
    row["e2e_p50_ms_shared"], row["e2e_p99_ms_shared"] = row["e2e_p50_ms"], row["e2e_p99_ms"]
    row["floor_ratio_shared"], row["cold_ms_shared"] = row["floor_ratio"], row["cold_ms"]
    for s in STEPS:
        steps[s]["in_shared_ms"] = steps[s].get("in_query_ms", float("nan"))
        steps[s]["in_query_ms"] = inside[s]
    steps["non_kernel"]["in_shared_ms"] = steps["non_kernel"]["p50_ms"]
    steps["non_kernel"]["p50_ms"] = steps["non_kernel"]["in_query_ms"] = inside["non_kernel"]
    row["cold_ms"] = sum(inside[s] - steps[s]["p50_ms"] for s in STEPS)
    row["e2e_p50_ms"], row["e2e_p99_ms"] = own["p50_ms"], own["p99_ms"]
    row["floor_ratio"] = own["p50_ms"] / row["floor_ms"] if row["floor_ms"] > 0 else float("nan")


# ---- the library kernels --------------------------------------------------------------------------
def _kernel_graph(path: Path, int8: bool) -> Path:
    """A graph of one product ``a [M, D] x b [D, N]``: ``MatMulInteger`` (uint8 zero point 128 x int8, as
    the int8 query scorers run it) or ``MatMul`` (float32)."""
    import onnx
    from onnx import TensorProto, helper

    if path.is_file():
        return path
    if int8:
        inputs = [
            helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", "D"]),
            helper.make_tensor_value_info("b", TensorProto.INT8, ["D", "N"]),
        ]
        zps = [
            helper.make_tensor("za", TensorProto.UINT8, [], [128]),
            helper.make_tensor("zb", TensorProto.INT8, [], [0]),
        ]
        node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.INT32, ["M", "N"])
    else:
        inputs = [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "D"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["D", "N"]),
        ]
        zps = []
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", "N"])
    graph = helper.make_graph([node], "kernel", inputs, [out], zps)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def _kernels(c: Candidates, q_local: np.ndarray, threads: int, work: Path) -> dict[str, Callable[[], Any]]:
    """The library kernel(s) of the scorer's big product on these candidates and query."""
    from mssan_infer.backends.onnxruntime import OnnxGraph

    a = c.local.reshape(-1, c.local.shape[-1])  # [K*P, D]
    if c.scale is not None:
        scale = np.abs(q_local).max(-1, keepdims=True) / 63.0 + 1e-30  # 7-bit query codes, as in the graph
        b = np.ascontiguousarray(np.round(q_local / scale).astype(np.int8).T)  # [D, Q]
        g = OnnxGraph(str(_kernel_graph(work / "kernel-matmulinteger.onnx", True)), threads=threads)
        feeds = {"a": np.ascontiguousarray(a), "b": b}
        return {"kernel_matmulinteger": lambda: g.session.run(None, feeds)}
    bf = np.ascontiguousarray(q_local.T, dtype=np.float32)
    af = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty((af.shape[0], bf.shape[1]), np.float32)
    g = OnnxGraph(str(_kernel_graph(work / "kernel-matmul.onnx", False)), threads=threads)
    feeds_f = {"a": af, "b": bf}
    return {
        "kernel_sgemm_numpy": lambda: np.matmul(af, bf, out=out),
        "kernel_sgemm_ort": lambda: g.session.run(None, feeds_f),
    }


# ---- the group -------------------------------------------------------------------------------------
def floor_group(
    paths: Mapping[str, tuple[Any, Path]],
    text_query: bool,
    next_q: Callable[[], Any],
    queries: list[Any],
    threads: int,
    work: Path,
    k: int = 10,
) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
    """The callables of one interleaved floor group, and what the floors need of each path.

    Args:
        paths: ``{path name: (Retriever, its query encoder's .onnx file)}`` (:data:`PATHS`).
        text_query: captions search images (else images search captions).
        next_q: the next raw query (caption, or ``[R, Dv]`` regions) for the end-to-end and encode calls.
        queries: raw queries whose encodings drive stage 1 and the gathers (rotating).
        threads: intra-op threads of the encoder graph and kernel sessions.
        work: where the kernel graphs are written.
    Returns:
        ``(fns, meta)``: callables named ``"{step}[{path}]"`` (``e2e``, ``encode``, ``encoder_graph``,
        ``stage1``, ``gather``, ``scorer``, ``kernel_*``), and per path the bytes, FLOPs and shapes.
    """
    fns: dict[str, Callable[[], Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, (r, encoder_file) in paths.items():
        path_fns, meta[name] = _path_group(r, encoder_file, text_query, next_q, queries, threads, work, k)
        fns.update({f"{step}[{name}]": fn for step, fn in path_fns.items()})
    return fns, meta


def _path_group(
    r: Any,
    encoder_file: Path,
    text_query: bool,
    next_q: Callable[[], Any],
    queries: list[Any],
    threads: int,
    work: Path,
    k: int,
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """One path's callables (by step) and meta (see :func:`floor_group`)."""
    from mssan_infer.backends.onnxruntime import OnnxGraph

    view = (r.images if text_query else r.texts).view()
    feeds: dict[str, np.ndarray]
    if text_query:
        encoded = [r.encode_texts([q]) for q in queries]
        tokens, mask = r.tokenizer.encode_batch([queries[0]])
        feeds = {"tokens": tokens, "token_mask": mask}

        def e2e() -> Any:
            return r.search(text=next_q(), k=k, rerank=RERANK)

        def encode() -> Any:
            return r.encode_texts([next_q()])
    else:
        encoded = [r.encode_images(q[None]) for q in queries]
        regions = np.ascontiguousarray(queries[0][None], dtype=np.float32)
        feeds = {"regions": regions, "region_mask": np.ones(regions.shape[:2], np.float32)}

        def e2e() -> Any:
            return r.search(image=next_q(), k=k, rerank=RERANK)

        def encode() -> Any:
            return r.encode_images(next_q()[None])

    enc_graph = OnnxGraph(str(encoder_file), threads=threads)
    rows = [view.topk(e.stage1, RERANK)[0][0] for e in encoded]
    turn = {"stage1": 0, "gather": 0}

    def stage1() -> Any:
        turn["stage1"] = (turn["stage1"] + 1) % len(encoded)
        return view.topk(encoded[turn["stage1"]].stage1, RERANK)

    # the exact path gathers float32 candidates as their similarities to the query (the big product)
    sim = uses_query_scorers(r.backend) and view.layout.local != "int8"
    q_locals = [e.local[0, : max(1, extent(e.mask[:1]))] for e in encoded]

    def gather() -> Any:  # another query's candidates each call: rows read from memory, not cache
        turn["gather"] = (turn["gather"] + 1) % len(rows)
        i = turn["gather"]
        return view.gather(rows[i], r._gatherer(), r.gather_threads, query=q_locals[i] if sim else None)

    inside: dict[str, list[float]] = {s: [] for s in IN_QUERY}

    def e2e_traced() -> Any:
        """``e2e`` with its four steps timed where they run (:func:`traced_steps`)."""
        with traced_steps(r, text_query) as took:
            out = e2e()
        record_inside(inside, took)
        return out

    q0 = encoded[0]
    width = max(1, extent(q0.mask[:1]))
    q_local, q_mask, q_gram = q0.local[0, :width], q0.mask[0, :width], q0.gram[0, :width, :width]
    stored = view.gather(rows[0], r._gatherer(), r.gather_threads)  # as stored: the kernels' operands
    cands = view.gather(rows[0], r._gatherer(), r.gather_threads, query=q_local if sim else None)
    score = backend_score_fn(r.backend, query_is_text=text_query)
    fns: dict[str, Callable[[], Any]] = {
        "e2e": e2e,
        "e2e_traced": e2e_traced,
        "encode": encode,
        "encoder_graph": lambda: enc_graph.session.run(None, feeds),
        "stage1": stage1,
        "gather": gather,
        "scorer": lambda: score(q_local, q_mask, q_gram, cands),
    }
    kern = _kernels(stored, q_local, threads, work)
    fns.update(kern)
    assert stored.local is not None
    kk, p, d = stored.local.shape
    lay = view.layout
    outliers = len(view.outliers) if getattr(view, "outliers", None) is not None else 0
    meta = {
        "inside": inside,
        "layout": lay.name,
        "n": int(view.n),
        "kernels": list(kern),
        "shape": {
            "candidates": int(kk),
            "candidate_length": int(p),
            "query_length": int(width),
            "d": int(d),
        },
        "flops": scorer_flops(kk, p, width, d),
        "product_in_gather": sim,
        "bytes": {
            "stage1": stage1_bytes(lay, int(view.n), int(q0.stage1.shape[1]), outliers=outliers),
            "gather": candidate_bytes(stored),
            "scorer": candidate_bytes(cands) + float(q_local.nbytes + q_mask.nbytes + q_gram.nbytes),
        },
    }
    return fns, meta


def floor_rows(
    timings: Mapping[str, Mapping[str, float]],
    meta: Mapping[str, Mapping[str, Any]],
    bandwidth: Mapping[str, float],
) -> dict[str, Any]:
    """The floor rows of one gallery from a :func:`floor_group`'s timings (``bench.timing.side_by_side``)."""
    out: dict[str, Any] = {"bandwidth": dict(bandwidth), "paths": {}}
    for name, m in meta.items():
        t = {s: timings[f"{s}[{name}]"]["p50_ms"] for s in ("e2e", "encode", *STEPS[1:])}
        # a floor is the least time the library kernel needs: its fastest round alone, not its p50 (in a
        # process running many sessions a kernel's p50 can sit above the same work inside the query)
        t["encoder_graph"] = timings[f"encoder_graph[{name}]"]["min_ms"]
        kernels = {kn: timings[f"{kn}[{name}]"]["min_ms"] for kn in m["kernels"]}
        best = min(kernels, key=lambda kn: kernels[kn])
        t["kernel"] = kernels[best]
        traced = m.get("inside") or {}
        inside = (
            {s: float(np.median(traced[s])) for s in IN_QUERY} if traced and traced.get("total") else None
        )
        in_gather = bool(m.get("product_in_gather"))
        row = floor_row(
            t,
            timings[f"e2e[{name}]"]["p99_ms"],
            m["bytes"],
            m["flops"],
            bandwidth["gbs"],
            inside=inside,
            product_in_gather=in_gather,
        )
        row["steps"]["gather" if in_gather else "scorer"]["kernel"] = best
        row["product_in"] = "gather" if in_gather else "scorer"
        row["kernels_ms"] = kernels
        row.update({k: m[k] for k in ("layout", "n", "shape")})
        row["encoder_graph_p99_ms"] = timings[f"encoder_graph[{name}]"]["p99_ms"]
        out["paths"][name] = row
    return out


# ---- report ----------------------------------------------------------------------------------------
def _tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _row_tag(row: Mapping[str, Any]) -> str:
    return _tag(int(row["n"])) + ("_mmap" if row.get("mmap") else "")


def summarise_floor(lat: Mapping[str, Any], cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Summary figures of the floor rows and the fast path, and their sources.

    Per latency row (size in images, ``_mmap`` for a memory-mapped gallery):
    ``floor_ratio_{d}_{size}_{path}``,
    ``floor_ms_...``, ``non_kernel_ms_...``, ``{d}_p50_ms_{size}_rerank100_int8`` (the fast path end to end),
    ``fastpath_vs_default_p50_{d}_{size}`` and ``int8_vs_fp32_p50_{d}_{size}`` (int8 layout / fp32 layout,
    same text encoder, the layouts group). The issue's names, from the reference sizes (``ref_small`` as
    5k, ``ref_large`` as 25k, ``ref_mmap`` memory-mapped as 100k): ``floor_ratio_{t2i_5k,t2i_25k,i2t_5k}_*``,
    ``t2i_p50_ms_{5k,25k,100k}_rerank100_int8``, ``i2t_p50_ms_5k_rerank100_int8``, ``int8_vs_fp32_p50_5k``,
    ``fastpath_vs_default_p50_5k``. End to end means a process of the path's own where the row has one
    (:func:`add_own_process`); the shared process's figures then stay under the same names + ``_shared``.
    """
    s: dict[str, Any] = {}
    src: dict[str, str] = {}
    for key, row in lat.items():
        d, tag = row["direction"], _row_tag(row)
        paths = (row.get("floor") or {}).get("paths", {})
        for p, x in paths.items():
            s[f"floor_ratio_{d}_{tag}_{p}"] = _num(x.get("floor_ratio"))
            s[f"floor_ms_{d}_{tag}_{p}"] = _num(x.get("floor_ms"))
            s[f"non_kernel_ms_{d}_{tag}_{p}"] = _num(x["steps"]["non_kernel"]["p50_ms"])
            s[f"cold_ms_{d}_{tag}_{p}"] = _num(x.get("cold_ms"))
            if "own_process" in x:
                s[f"floor_ratio_{d}_{tag}_{p}_shared"] = _num(x.get("floor_ratio_shared"))
                s[f"{d}_p50_ms_{tag}_rerank100_{p}_shared"] = _num(x.get("e2e_p50_ms_shared"))
            s[f"{d}_p50_ms_{tag}_rerank100_{p}"] = _num(x.get("e2e_p50_ms"))
        if "int8" in paths and "fp32" in paths:
            s[f"fastpath_vs_default_p50_{d}_{tag}"] = _num(paths["int8"]["e2e_p50_ms"]) / _num(
                paths["fp32"]["e2e_p50_ms"]
            )
        lay = row.get("layouts", {})
        if "int8" in lay and "fp32" in lay:
            s[f"int8_vs_fp32_p50_{d}_{tag}"] = _num(lay["int8"]["rerank_100"]["p50_ms"]) / _num(
                lay["fp32"]["rerank_100"]["p50_ms"]
            )
    small, large, mm = _tag(int(cfg["ref_small"])), _tag(int(cfg["ref_large"])), _tag(int(cfg["ref_mmap"]))
    for name, have, row_key in (
        ("floor_ratio_t2i_5k", f"floor_ratio_t2i_{small}", f"t2i_{cfg['ref_small']}"),
        ("floor_ratio_t2i_25k", f"floor_ratio_t2i_{large}", f"t2i_{cfg['ref_large']}"),
        ("floor_ratio_i2t_5k", f"floor_ratio_i2t_{small}", f"i2t_{cfg['ref_small']}"),
    ):
        for p in PATHS:
            s[f"{name}_{p}"] = s.get(f"{have}_{p}", float("nan"))
            if f"{have}_{p}_shared" in s:
                s[f"{name}_{p}_shared"] = s[f"{have}_{p}_shared"]
        src[f"{name}_*"] = (
            f"latency {row_key} floor group: end-to-end p50 ({OWN_WORDS}) / the sum of the step floors "
            "(encoder graph alone; bytes / bandwidth for stage 1 and gather; the larger of the kernel alone "
            "and bytes / bandwidth for the step with the big product: the scorer, the gather on the fp32 "
            f"path, whose scorer then has its bytes alone); fp32 = {PATHS['fp32']}, int8 = {PATHS['int8']}"
        )
    for name, have, row_key in (
        ("t2i_p50_ms_5k_rerank100_int8", f"t2i_p50_ms_{small}_rerank100_int8", f"t2i_{cfg['ref_small']}"),
        ("t2i_p50_ms_25k_rerank100_int8", f"t2i_p50_ms_{large}_rerank100_int8", f"t2i_{cfg['ref_large']}"),
        ("i2t_p50_ms_5k_rerank100_int8", f"i2t_p50_ms_{small}_rerank100_int8", f"i2t_{cfg['ref_small']}"),
        (
            "t2i_p50_ms_100k_rerank100_int8",
            f"t2i_p50_ms_{mm}_mmap_rerank100_int8",
            f"t2i_{cfg['ref_mmap']}_mmap",
        ),
    ):
        s[name] = s.get(have, float("nan"))
        shared = have.replace("_rerank100_int8", "_rerank100_int8_shared")
        if shared in s:
            s[f"{name}_shared"] = s[shared]
        src[name] = f"latency {row_key} floor group: rerank 100 end to end ({OWN_WORDS}), {PATHS['int8']}" + (
            ", memory-mapped from a saved int8 index" if "mmap" in row_key else ""
        )
    s["int8_vs_fp32_p50_5k"] = s.get(f"int8_vs_fp32_p50_t2i_{small}", float("nan"))
    src["int8_vs_fp32_p50_5k"] = (
        f"latency t2i_{cfg['ref_small']} layouts group: rerank 100 p50 of the int8 layout / the fp32 layout "
        "(the same fp32 text encoder, the same rounds)"
    )
    s["fastpath_vs_default_p50_5k"] = s.get(f"fastpath_vs_default_p50_t2i_{small}", float("nan"))
    src["fastpath_vs_default_p50_5k"] = (
        f"latency t2i_{cfg['ref_small']} floor group: rerank 100 p50 of {PATHS['int8']} / {PATHS['fp32']}"
    )
    return s, src


def _f(x: Any, nd: int = 2) -> str:
    x = _num(x)
    if np.isnan(x):
        return "–"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{nd}f}"


def _gallery_words(row: Mapping[str, Any]) -> str:
    n = int(row["n"])
    mm = " (memory-mapped)" if row.get("mmap") else ""
    if row["direction"] == "i2t":
        return f"{count(int(row.get('n_items', 5 * n)))} captions ({count(n)} images){mm}"
    return f"{count(n)} images{mm}"


def floor_markdown(lat: Mapping[str, Any] | None) -> list[str]:
    """The floor table (markdown lines) of every latency row that has one; ``[]`` when none does."""
    rows = [(k, r) for k, r in (lat or {}).items() if r.get("floor")]
    if not rows:
        return []
    bw = rows[0][1]["floor"]["bandwidth"]
    lines = [
        "",
        "## 2c. The floor of a query (rerank 100; one interleaved group per gallery)",
        "",
        "Each step's p50 inside the query (in brackets: alone, in a loop of its own) / its floor in ms. "
        "Inside the query and end to end: in processes that each hold only that path and its gallery "
        "(median of their p50s), where measured; `shared`: the end to end p50 in the section's own process "
        "(every path, layout and setting side by side). Steps alone, kernels and bandwidth: the section's "
        f"process, in the same rounds. fp32 = {PATHS['fp32']}; "
        f"int8 = {PATHS['int8']}. Floors: encode = the encoder graph alone (fastest round); stage 1 and "
        "gather = bytes "
        f"read / {_f(bw['gbs'], 1)} GB/s (the larger of a float32 matrix-vector product, "
        f"{_f(bw['gemv_gbs'], 1)} GB/s, and a numpy sum, {_f(bw['sum_gbs'], 1)} GB/s, over 1 GiB); "
        "scorer = the larger of its big product "
        "on the library kernel alone (fastest round; MatMulInteger u8 x s8 for int8, the faster sgemm of "
        "numpy and ONNX Runtime for fp32) and its bytes / bandwidth (fp32: the gather computes the big "
        "product, each row's locals times the query's where the row lies, so that floor is the gather's "
        "and the scorer's is its bytes); the rest = Python, checks and "
        "hand-offs inside the query (a traced query's total minus its four steps; floor 0); cold = the four "
        "steps inside the query minus the same steps alone (their weights and codes evicted by the query's "
        "other reads; the gather and scorer alone take the 100 candidates on one thread, inside the query "
        "in shares on a thread each, counted by the slowest, so cold can be negative).",
        "",
        "| query | gallery | path | encode | stage 1 | gather | scorer | kernel GFLOP/s | the rest | cold | "
        "end to end p50 / p99 | shared p50 | sum of floors | end to end / floors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in rows:
        for p, x in row["floor"]["paths"].items():
            st = x["steps"]
            cells = [
                (
                    f"{_f(st[s]['in_query_ms'])} ({_f(st[s]['p50_ms'])})"
                    if "in_query_ms" in st[s]
                    else _f(st[s]["p50_ms"])
                )
                + f" / {_f(st[s]['floor_ms'])}"
                for s in STEPS
            ]
            lines.append(
                f"| {DIRECTIONS[row['direction']]} | {_gallery_words(row)} | {p} | "
                + " | ".join(cells)
                + f" | {_f(st[x.get('product_in', 'scorer')]['kernel_gflops'], 1)} | "
                f"{_f(st['non_kernel']['p50_ms'])} | "
                f"{_f(x.get('cold_ms'))} | "
                f"{_f(x['e2e_p50_ms'])} / {_f(x['e2e_p99_ms'])} | {_f(x.get('e2e_p50_ms_shared'))} | "
                f"{_f(x['floor_ms'])} | "
                f"{_f(x['floor_ratio'])}x |"
            )
    lines += [
        "",
        "Floors of the step that holds the big product (the scorer; the gather on the exact path, which "
        "multiplies each row by the query where it lies) by what bounds them (kernel ms / bytes ms): "
        + "; ".join(
            f"{DIRECTIONS[row['direction']]} {_gallery_words(row)} {p} ({x.get('product_in', 'scorer')}): "
            f"{_f(x['steps'][x.get('product_in', 'scorer')]['kernel_ms'])} / "
            f"{_f(x['steps'][x.get('product_in', 'scorer')]['bytes_ms'])}"
            for _, row in rows
            for p, x in row["floor"]["paths"].items()
        )
        + ".",
    ]
    return lines


def floor_figure(lat: Mapping[str, Any] | None, machine: Mapping[str, Any], threads: int) -> Any:
    """Measured steps beside their floors as stacked bars, one panel per query direction; ``None`` when no
    latency row has a floor. The caller closes the figure."""
    rows = [(k, r) for k, r in (lat or {}).items() if r.get("floor")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = [d for d in DIRECTIONS if any(r["direction"] == d for _, r in rows)]
    fig, axes = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.8), dpi=80, squeeze=False)
    colours = dict(
        zip((*STEPS, "non_kernel"), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray"))
    )
    for ax, d in zip(axes[0], directions):
        labels: list[str] = []
        x = 0.0
        seen: set[str] = set()
        for _, row in [(k, r) for k, r in rows if r["direction"] == d]:
            for p, fl in row["floor"]["paths"].items():
                for j, (what, field) in enumerate((("measured", "in_query_ms"), ("floor", "floor_ms"))):
                    bottom = 0.0
                    for s in (*STEPS, "non_kernel"):
                        step = fl["steps"][s]
                        h = max(0.0, _num(step.get(field, step["p50_ms"])))
                        lab = STEP_WORDS[s] if s not in seen else None
                        seen.add(s)
                        ax.bar(
                            x + 0.4 * j,
                            h,
                            0.38,
                            bottom=bottom,
                            color=colours[s],
                            label=lab,
                            hatch="//" if what == "floor" else None,
                            edgecolor="white",
                        )
                        bottom += h
                labels.append(f"{_gallery_words(row)}\n{PATH_WORDS.get(p, p)}")
                x += 1.0
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, fontsize=7, rotation=30, ha="right")
        ax.set_xlabel(
            "gallery and layout\n(left bar: p50 of each step inside the query, in processes of the path's "
            "own where measured;\nhatched: its floor)",
            fontsize=8,
        )
        ax.set_ylabel("time per query (ms)")
        identity = cpu_identity_text(machine).strip(" ()")
        ax.set_title(
            f"{DIRECTIONS[d]} query at rerank 100: measured vs floor\n"
            f"{machine.get('cpu_model', 'CPU')}, {threads} thread{'' if threads == 1 else 's'}"
            + (f"\n{identity}" if identity else "")
        )
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
