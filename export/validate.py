"""Parity of exported graphs with the PyTorch model, optimum-style.

Reference inputs -> PyTorch under ``torch.inference_mode`` -> ONNX Runtime; per
output a dtype/shape check, then max abs/rel difference against the tolerance
of ``mssan_infer.spec.TOLERANCES``. A static check of each graph's I/O against
its spec (names, dtypes, ranks, which axes are dynamic) and an end-to-end check
(final two-stage scores of one query against ``rerank_depth`` candidates, and
their order) come with it. Every check is logged; all failures are collected
and raised once as a ``ParityError``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mssan_infer.errors import ParityError
from mssan_infer.spec import GRAPHS, IMAGE_ENCODER, SCORER, TEXT_ENCODER, GraphSpec, Tolerance, TOLERANCES

from training.model import MSSAN

from .fp16 import with_explicit_rounding
from .graphs import build_graphs
from .inputs import Case, Feeds, image_feeds, parity_cases, text_feeds, to_torch

__all__ = [
    "OutputCheck", "RerankCheck", "ParityReport", "raise_if_failed", "tolerance_for", "make_session", "check_contract",
    "check_graph", "check_rerank", "rerank_order_check", "validate_graphs",
]

log = logging.getLogger(__name__)

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16"}
TOPK = 10


@dataclass
class OutputCheck:
    """One output of one graph on one case."""

    graph: str
    case: str
    output: str
    expected_shape: list[int]
    shape: list[int] | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    error: str | None = None          # None: passed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RerankCheck:
    """Final two-stage scores (stage 1 + s_ll from ONNX Runtime) of one query against ``depth`` candidates."""

    direction: str                    # "t2i": one caption vs images; "i2t": one image vs captions
    depth: int
    max_abs: float | None = None
    order_agreement: float | None = None    # fraction of rank positions identical to PyTorch's
    tolerated_swaps: int = 0                # inverted pairs whose reference scores lie within atol
    violations: int = 0                     # inverted pairs further apart than atol
    topk_agreement: float | None = None     # |top-10 ONNX ∩ top-10 PyTorch| / 10
    topk_agreement_near_ties: float | None = None   # the same, counting near-ties with PyTorch's 10th as shared
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ParityReport:
    """Every parity check at one precision ("fp32" or "fp16")."""

    precision: str
    tolerance: Tolerance
    execution: str = "onnxruntime CPUExecutionProvider"
    contract: list[str] = field(default_factory=list)     # static I/O contract failures
    outputs: list[OutputCheck] = field(default_factory=list)
    reranks: list[RerankCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        out = [f"[{self.precision}] {m}" for m in self.contract]
        out += [f"[{self.precision}] {c.graph}[{c.case}] {c.output}: {c.error}" for c in self.outputs if c.error]
        out += [f"[{self.precision}] rerank {r.direction}@{r.depth}: {r.error}" for r in self.reranks if r.error]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def max_abs(self) -> dict[str, float]:
        """Largest abs difference per graph over all cases and outputs."""
        worst: dict[str, float] = {}
        for c in self.outputs:
            if c.max_abs is not None:
                worst[c.graph] = max(worst.get(c.graph, 0.0), c.max_abs)
        return worst

    def to_dict(self) -> dict[str, Any]:
        graphs: dict[str, dict[str, Any]] = {}
        for c in self.outputs:
            case = graphs.setdefault(c.graph, {}).setdefault(c.case, {"max_abs": {}, "shapes": {}})
            case["max_abs"][c.output] = c.max_abs
            case["shapes"][c.output] = c.shape
        return {
            "precision": self.precision,
            "tolerance": asdict(self.tolerance),
            "execution": self.execution,
            "passed": self.passed,
            "max_abs": self.max_abs(),
            "graphs": graphs,
            "rerank": {r.direction: {k: v for k, v in asdict(r).items() if k != "direction"} for r in self.reranks},
            "failures": self.failures,
        }

    def raise_if_failed(self) -> None:
        """Raises: ParityError listing every failure (one per line)."""
        raise_if_failed([self])


def raise_if_failed(reports: Sequence[ParityReport]) -> None:
    """Raise one ``ParityError`` listing the failures of all ``reports`` (one per line), if any."""
    failures = [f for r in reports for f in r.failures]
    if not failures:
        return
    tols = ", ".join(f"{r.precision} atol={r.tolerance.atol:g}" for r in reports)
    lines = "\n  ".join(failures)
    raise ParityError(
        f"{len(failures)} parity check(s) failed ({tols}); first: {failures[0]}\n  {lines}\n"
        "The exported graphs do not reproduce the PyTorch model. "
        "Pass verify=False / --no-verify only to inspect a broken export."
    )


def tolerance_for(precision: str, atol: float | None = None) -> Tolerance:
    """``TOLERANCES[precision]``, with ``atol`` overridden when given."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; choose from {sorted(TOLERANCES)}")
    tol = TOLERANCES[precision]
    if atol is None:
        return tol
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    return Tolerance(atol=float(atol), rtol=tol.rtol, rerank_depth=tol.rerank_depth, topk_agreement=tol.topk_agreement)


def make_session(path: str | os.PathLike[str], precision: str = "fp32") -> ort.InferenceSession:
    """A CPU ONNX Runtime session.

    fp32: as the runtime makes it (default graph optimisations). fp16: on a copy
    with explicit fp16 rounding (``export.fp16.with_explicit_rounding``) and graph
    optimisations off, so the check sees the error of a real fp16 device, not the
    fp32 emulation of the CPU provider.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if precision == "fp16":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        model = with_explicit_rounding(onnx.load(str(path)))
        return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# ---- static contract --------------------------------------------------------
def check_contract(path: str | os.PathLike[str], spec: GraphSpec, dims: Mapping[str, int]) -> list[str]:
    """Differences between a graph's declared I/O and ``spec``: names, order, dtypes, ranks, dynamic axes.

    ``dims`` gives the sizes of the fixed axes (D, D2, Dv). A dynamic axis of the
    spec must be symbolic in the graph, a fixed axis (when concrete) must have its size.
    """
    model = onnx.load(str(path), load_external_data=False)
    problems: list[str] = []
    for kind, specs, values in (
        ("input", spec.inputs, [v for v in model.graph.input]),
        ("output", spec.outputs, list(model.graph.output)),
    ):
        names = [v.name for v in values]
        want = [t.name for t in specs]
        if names != want:
            problems.append(f"{spec.name}: {kind}s are {names}, the spec says {want}")
            continue
        for t, v in zip(specs, values):
            tt = v.type.tensor_type
            dtype = _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))
            if dtype != t.dtype:
                problems.append(f"{spec.name}: {kind} {t.name} is {dtype}, the spec says {t.dtype}")
            shape = tt.shape.dim
            if len(shape) != len(t.axes):
                problems.append(f"{spec.name}: {kind} {t.name} has rank {len(shape)}, the spec says {len(t.axes)} {t.axes}")
                continue
            dynamic = t.dynamic_axes()
            for i, (axis, d) in enumerate(zip(t.axes, shape)):
                concrete = d.HasField("dim_value")
                if i in dynamic and concrete:
                    problems.append(
                        f"{spec.name}: {kind} {t.name} axis {i} ({axis}) is frozen at {d.dim_value}; the spec makes it dynamic"
                    )
                elif i not in dynamic and concrete and axis in dims and d.dim_value != dims[axis]:
                    problems.append(f"{spec.name}: {kind} {t.name} axis {i} ({axis}) is {d.dim_value}, expected {dims[axis]}")
    return problems


# ---- per-output parity -------------------------------------------------------
@torch.inference_mode()
def reference(module: nn.Module, spec: GraphSpec, feeds: Feeds) -> dict[str, np.ndarray]:
    """PyTorch outputs of a graph wrapper, keyed by the spec's output names."""
    t = to_torch(feeds)
    out = module(*(t[n] for n in spec.input_names))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.detach().cpu().numpy() for name, o in zip(spec.output_names, outs)}


def _compare(graph: str, case: str, name: str, want_dtype: str, got: Any, ref: np.ndarray, tol: Tolerance) -> OutputCheck:
    check = OutputCheck(graph, case, name, list(ref.shape))
    if not isinstance(got, np.ndarray):
        check.error = f"output is {type(got).__name__}, not an array"
        return check
    check.shape = list(got.shape)
    if got.shape != ref.shape:
        check.error = f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        return check
    if str(got.dtype) != want_dtype:
        check.error = f"dtype {got.dtype}, expected {want_dtype}"
        return check
    finite_ref, finite_got = np.isfinite(ref), np.isfinite(got)
    if not np.array_equal(finite_ref, finite_got):
        check.error = f"{int((finite_ref != finite_got).sum())} value(s) non-finite in one of ONNX/PyTorch but not the other"
        return check
    if got.size == 0:
        check.max_abs = check.max_rel = 0.0
        return check
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    diff = np.where(finite_ref, diff, 0.0)
    check.max_abs = float(diff.max())
    check.max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max())
    over = diff > tol.atol + tol.rtol * np.abs(ref)
    if over.any():
        check.error = (
            f"max abs diff {check.max_abs:.3g} > atol {tol.atol:g} "
            f"({int(over.sum())} of {over.size} values, max rel {check.max_rel:.3g})"
        )
    return check


def check_graph(
    module: nn.Module,
    session: ort.InferenceSession,
    spec: GraphSpec,
    cases: Sequence[Case],
    tol: Tolerance,
) -> list[OutputCheck]:
    """Run ``cases`` through PyTorch and ONNX Runtime; one ``OutputCheck`` per case and output."""
    checks: list[OutputCheck] = []
    for case in cases:
        ref = reference(module, spec, case.feeds)
        try:
            got = session.run(spec.output_names, {n: case.feeds[n] for n in spec.input_names})
        except Exception as e:  # onnxruntime raises its own exception types
            msg = f"ONNX Runtime rejected inputs {case.shapes()}: {str(e).splitlines()[0][:300]}"
            for name in spec.output_names:
                checks.append(OutputCheck(spec.name, case.name, name, list(ref[name].shape), error=msg))
                log.error("%s[%s] %s: %s", spec.name, case.name, name, msg)
            continue
        for t, g in zip(spec.outputs, got):
            c = _compare(spec.name, case.name, t.name, t.dtype, g, ref[t.name], tol)
            checks.append(c)
            if c.ok:
                log.info("%s[%s] %s: shape %s ok, max abs %.2e, max rel %.2e", spec.name, case.name, t.name,
                         tuple(c.shape or ()), c.max_abs, c.max_rel)
            else:
                log.error("%s[%s] %s: %s", spec.name, case.name, t.name, c.error)
    return checks


# ---- end-to-end: two-stage scores and rerank order ------------------------------
def rerank_order_check(ref: np.ndarray, got: np.ndarray, atol: float) -> tuple[float, int, int]:
    """Compare the ranking of ``got`` with that of ``ref`` (1-D scores of the same candidates).

    Returns:
        (fraction of rank positions holding the same candidate,
         inverted pairs whose reference scores lie within ``atol`` (near-ties, allowed),
         inverted pairs further apart than ``atol`` (violations)).
    """
    order_got = np.argsort(-got, kind="stable")
    order_ref = np.argsort(-ref, kind="stable")
    r = ref[order_got].astype(np.float64)            # reference scores in ONNX rank order
    later_higher = r[None, :] - r[:, None]           # [i,j]: ref[j] - ref[i]
    upper = np.triu(np.ones_like(later_higher, dtype=bool), k=1)
    inverted = upper & (later_higher > 0)            # i ranked above j, but ref says j > i
    violations = int((inverted & (later_higher > atol)).sum())
    return float(np.mean(order_got == order_ref)), int(inverted.sum()) - violations, violations


def _run(session: ort.InferenceSession, spec: GraphSpec, feeds: Feeds) -> dict[str, np.ndarray]:
    outs = session.run(spec.output_names, {n: feeds[n] for n in spec.input_names})
    return dict(zip(spec.output_names, outs))


def _rerank_inputs(model: MSSAN, direction: str, depth: int, seed: int) -> tuple[Feeds, Feeds]:
    cfg, rng = model.cfg, np.random.default_rng(seed)
    lq = min(12, cfg.max_len)
    lc = min(20, max(cfg.max_len, 2))
    if direction == "t2i":
        lengths = rng.integers(5, 37, size=depth)
        lengths[:3] = (1, 2, 36)
        return image_feeds(cfg, rng, lengths.tolist(), 36), text_feeds(cfg, rng, [max(1, lq - 3)], lq)
    lengths = rng.integers(1, lc + 1, size=depth)
    lengths[:2] = (1, lc)
    return image_feeds(cfg, rng, [30], 36), text_feeds(cfg, rng, lengths.tolist(), lc)


def check_rerank(
    model: MSSAN,
    sessions: Mapping[str, ort.InferenceSession],
    tol: Tolerance,
    seed: int = 2,
) -> list[RerankCheck]:
    """Final scores (img_stage1 . txt_stage1 + s_ll, all from ONNX Runtime) vs ``model.score``.

    One caption against ``tol.rerank_depth`` images (t2i) and one image against as
    many captions (i2t). Fails past ``tol.atol`` on any score; on the order when
    ``tol.topk_agreement`` is 1 (except near-ties: candidates whose reference scores
    lie within atol of each other may swap); otherwise on top-10 agreement (a
    candidate within atol of PyTorch's 10th score counts as agreeing: a near-tie).
    """
    checks: list[RerankCheck] = []
    for k, direction in enumerate(("t2i", "i2t")):
        images, texts = _rerank_inputs(model, direction, tol.rerank_depth, seed + k)
        check = RerankCheck(direction, tol.rerank_depth)
        checks.append(check)
        with torch.inference_mode():
            ti, tt = to_torch(images), to_torch(texts)
            ref = model.score(model.encode_image(ti["regions"], ti["region_mask"]),
                              model.encode_text(tt["tokens"], tt["token_mask"])).numpy()     # [Ni,Nt]
        try:
            img = _run(sessions[IMAGE_ENCODER.name], IMAGE_ENCODER, images)
            txt = _run(sessions[TEXT_ENCODER.name], TEXT_ENCODER, texts)
            s_ll = _run(sessions[SCORER.name], SCORER, {**img, **txt, **images, **texts})["s_ll"]
            got = img["img_stage1"] @ txt["txt_stage1"].T + s_ll                             # [Ni,Nt]
        except Exception as e:  # onnxruntime raises its own exception types
            check.error = f"ONNX Runtime failed: {str(e).splitlines()[0][:300]}"
            log.error("rerank %s: %s", direction, check.error)
            continue
        if got.shape != ref.shape or not np.isfinite(got).all():
            check.error = f"final scores have shape {got.shape} (expected {ref.shape}) or are not finite"
            log.error("rerank %s: %s", direction, check.error)
            continue
        ref_1d, got_1d = ref.reshape(-1), got.reshape(-1)
        check.max_abs = float(np.abs(got_1d.astype(np.float64) - ref_1d).max())
        check.order_agreement, check.tolerated_swaps, check.violations = rerank_order_check(ref_1d, got_1d, tol.atol)
        top = min(TOPK, ref_1d.size)
        top_got = np.argsort(-got_1d, kind="stable")[:top]
        top_ref = np.argsort(-ref_1d, kind="stable")[:top]
        check.topk_agreement = len(set(top_got) & set(top_ref)) / top
        check.topk_agreement_near_ties = float(np.mean(ref_1d[top_got] >= ref_1d[top_ref[-1]] - tol.atol))
        errors = []
        if check.max_abs > tol.atol:
            errors.append(f"max abs diff of final scores {check.max_abs:.3g} > atol {tol.atol:g}")
        if tol.topk_agreement >= 1.0 and check.violations:
            errors.append(
                f"rerank order differs from PyTorch in {check.violations} pair(s) whose reference scores "
                f"differ by more than atol {tol.atol:g}"
            )
        if check.topk_agreement_near_ties < tol.topk_agreement and tol.topk_agreement < 1.0:
            errors.append(
                f"top-{top} agreement {check.topk_agreement_near_ties:.2f} < {tol.topk_agreement:.2f} "
                f"(counting candidates within atol of PyTorch's {top}th score as shared)"
            )
        check.error = "; ".join(errors) or None
        log_fn = log.info if check.ok else log.error
        log_fn("rerank %s@%d: max abs %.2e, order agreement %.2f, near-tie swaps %d, violations %d, top-%d %.2f%s",
               direction, check.depth, check.max_abs, check.order_agreement, check.tolerated_swaps,
               check.violations, top, check.topk_agreement, "" if check.ok else f" -- {check.error}")
    return checks


def validate_graphs(
    model: MSSAN,
    paths: Mapping[str, str | os.PathLike[str]],
    *,
    precision: str = "fp32",
    atol: float | None = None,
    cases: Mapping[str, Sequence[Case]] | None = None,
    rerank: bool = True,
) -> ParityReport:
    """Check the graphs at ``paths`` ({graph name: .onnx}) against ``model``; never raises on a mismatch.

    Args:
        precision: selects ``TOLERANCES[precision]`` ("fp32" or "fp16"); references are always PyTorch fp32.
        atol: overrides the tolerance's atol.
        cases: per graph; defaults to ``export.inputs.parity_cases(model)``.
        rerank: also run the end-to-end check (needs all three graphs).
    Returns:
        The report; call ``raise_if_failed()`` on it to make failures fatal.
    """
    tol = tolerance_for(precision, atol)
    report = ParityReport(precision, tol)
    if precision == "fp16":
        report.execution += ", explicit fp16 rounding of MatMul/Gemm inputs and outputs (fp32 accumulation)"
    cfg = model.cfg
    dims = {"D": cfg.embed_size, "D2": 2 * cfg.embed_size, "Dv": cfg.img_dim}
    wrappers = build_graphs(model)
    cases = parity_cases(model) if cases is None else cases
    sessions: dict[str, ort.InferenceSession] = {}
    for name, path in paths.items():
        spec = GRAPHS[name]
        report.contract += check_contract(path, spec, dims)
        try:
            sessions[name] = make_session(path, precision)
        except Exception as e:  # onnxruntime raises its own exception types
            report.contract.append(f"{name}: ONNX Runtime cannot load {Path(path).name}: {str(e).splitlines()[0][:300]}")
            continue
        report.outputs += check_graph(wrappers[name], sessions[name], spec, cases.get(name, ()), tol)
    for m in report.contract:
        log.error("[%s] %s", precision, m)
    if rerank and set(sessions) == set(GRAPHS):
        report.reranks = check_rerank(model, sessions, tol)
    elif rerank:
        report.contract.append(f"rerank check needs all of {sorted(GRAPHS)}; have {sorted(sessions)}")
    return report
