"""Parity: ONE check of a candidate runner against a reference runner, optimum-style.

Runners are ``mssan_infer`` backends (``export.runners``): the PyTorch graph wrappers,
ONNX Runtime over the ONNX graphs, the TensorRT engines. :func:`compare_runners` runs
each graph's cases through both, and per output checks the shape, that the same values
are finite, and ``|got - ref| <= atol + rtol*|ref|`` (``mssan_infer.spec.TOLERANCES``),
logging the max abs/rel difference; then an end-to-end check of the final two-stage
scores (stage 1 + s_ll) of one query against ``rerank_depth`` candidates, and their
order. Every failure is collected in one :class:`ParityReport` (one schema, written to
the manifest for the ONNX graphs and for the TensorRT engines) and raised once as a
``ParityError``.

:func:`validate_graphs` is the export's use: PyTorch as the reference, the ONNX files in
ONNX Runtime as the candidate, plus a static check of each graph's I/O against its spec
(names, dtypes, ranks, which axes are dynamic). ``export.tensorrt`` calls
:func:`compare_runners` with ONNX Runtime as the reference and the engines as the candidate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch

from mssan_infer.backends.base import Backend
from mssan_infer.errors import MssanError, ParityError
from mssan_infer.spec import GRAPHS, IMAGE_ENCODER, SCORER, TEXT_ENCODER, TOLERANCES, GraphSpec, Tolerance
from training.model import MSSAN

from .errors import ExportError
from .inputs import Case, FeedConfig, Feeds, parity_cases, rerank_inputs, torch_runner
from .runners import onnx_runner, to_torch

__all__ = [
    "OutputCheck",
    "RerankCheck",
    "ParityReport",
    "raise_if_failed",
    "tolerance_for",
    "check_contract",
    "compare",
    "check_graph",
    "final_scores",
    "check_rerank",
    "rerank_order_check",
    "compare_runners",
    "validate_graphs",
    "rerank_cases",
    "ScoreFn",
]

log = logging.getLogger(__name__)

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.FLOAT16: "float16",
}
TOPK = 10
ScoreFn = Callable[[Feeds, Feeds], np.ndarray]  # (image feeds, text feeds) -> final scores [Ni, Nt]


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
    error: str | None = None  # None: passed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RerankCheck:
    """Final two-stage scores (stage 1 + s_ll from ONNX Runtime) of one query against ``depth`` candidates."""

    direction: str  # "t2i": one caption vs images; "i2t": one image vs captions
    depth: int
    max_abs: float | None = None
    order_agreement: float | None = None  # fraction of rank positions identical to PyTorch's
    tolerated_swaps: int = 0  # inverted pairs whose reference scores lie within atol
    violations: int = 0  # inverted pairs further apart than atol
    topk_agreement: float | None = None  # |top-10 ONNX ∩ top-10 PyTorch| / 10
    topk_agreement_near_ties: float | None = (
        None  # the same, counting near-ties with PyTorch's 10th as shared
    )
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ParityReport:
    """Every parity check of one candidate at one precision ("fp32", "fp16", "fp32-pixels").

    ``to_dict()`` is the schema written to the manifest: ``parity.<precision>`` for the ONNX
    graphs (reference PyTorch), ``tensorrt.parity.<precision>`` for the engines (reference
    ONNX Runtime on the fp32 graphs).
    """

    precision: str
    tolerance: Tolerance
    execution: str = "onnxruntime CPUExecutionProvider"
    reference: str = "pytorch fp32"
    label: str = ""  # failure prefix; default: the precision
    contract: list[str] = field(default_factory=list)  # static I/O contract failures
    outputs: list[OutputCheck] = field(default_factory=list)
    reranks: list[RerankCheck] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # measurements recorded beside the checks

    @property
    def failures(self) -> list[str]:
        tag = self.label or self.precision
        out = [f"[{tag}] {m}" for m in self.contract]
        out += [f"[{tag}] {c.graph}[{c.case}] {c.output}: {c.error}" for c in self.outputs if c.error]
        out += [f"[{tag}] rerank {r.direction}@{r.depth}: {r.error}" for r in self.reranks if r.error]
        return out

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def reasons(self) -> list[str]:
        """Why the report did not pass, one line each (empty when it passed): its failures here; a report
        that can also be left unjudged (``export.int8.Int8Report``) adds why."""
        return self.failures

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
            "reference": self.reference,
            "passed": self.passed,
            "max_abs": self.max_abs(),
            "graphs": graphs,
            "rerank": {
                r.direction: {k: v for k, v in asdict(r).items() if k != "direction"} for r in self.reranks
            },
            "failures": self.failures,
            **({"notes": self.notes} if self.notes else {}),
        }

    def raise_if_failed(self) -> None:
        """Raises: ParityError listing every failure (one per line)."""
        raise_if_failed([self])


def raise_if_failed(reports: Sequence[ParityReport], hint: str | None = None) -> None:
    """Refuse ``reports`` unless every one passed, with the reasons the reports give.

    Raises:
        ParityError: listing the failures of all ``reports`` (one per line, then any other reason);
            ``hint`` replaces the default last line (what the user can do).
        ExportError: a report did not pass without a failure (the int8 gate could not judge a model too
            weak): its reasons (what to do).
    """
    failing = [r for r in reports if not r.passed]
    if not failing:
        return
    failures = [f for r in reports for f in r.failures]
    others = [m for r in failing for m in r.reasons if m not in r.failures]
    if not failures:
        tags = ", ".join(r.label or r.precision for r in failing)
        raise ExportError("\n".join(others) or f"{tags}: not passed")
    tols = ", ".join(f"{r.label or r.precision} atol={r.tolerance.atol:g}" for r in reports)
    lines = "\n  ".join(failures + others)
    refs = sorted({r.reference for r in reports})
    raise ParityError(
        f"{len(failures)} parity check(s) failed ({tols}); first: {failures[0]}\n  {lines}\n"
        + (
            hint
            or f"The exported graphs do not reproduce {' / '.join(refs)}. "
            "Pass verify=False / --no-verify only to inspect a broken export."
        )
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
    return Tolerance(
        atol=float(atol), rtol=tol.rtol, rerank_depth=tol.rerank_depth, topk_agreement=tol.topk_agreement
    )


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
                problems.append(
                    f"{spec.name}: {kind} {t.name} has rank {len(shape)}, the spec says {len(t.axes)} "
                    f"{t.axes}"
                )
                continue
            dynamic = t.dynamic_axes()
            for i, (axis, d) in enumerate(zip(t.axes, shape)):
                concrete = d.HasField("dim_value")
                if i in dynamic and concrete:
                    problems.append(
                        f"{spec.name}: {kind} {t.name} axis {i} ({axis}) is frozen at {d.dim_value}; the "
                        "spec makes it dynamic"
                    )
                elif i not in dynamic and concrete and axis in dims and d.dim_value != dims[axis]:
                    problems.append(
                        f"{spec.name}: {kind} {t.name} axis {i} ({axis}) is {d.dim_value}, expected "
                        f"{dims[axis]}"
                    )
    return problems


# ---- per-output parity -------------------------------------------------------
def compare(
    graph: str, case: str, name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance
) -> OutputCheck:
    """One output against its reference: shape, the same values finite, ``|got-ref| <= atol + rtol*|ref|``."""
    check = OutputCheck(graph, case, name, list(ref.shape), shape=list(got.shape))
    if got.shape != ref.shape:
        check.error = f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        return check
    finite_ref, finite_got = np.isfinite(ref), np.isfinite(got)
    if not np.array_equal(finite_ref, finite_got):
        n = int((finite_ref != finite_got).sum())
        check.error = f"{n} value(s) non-finite in one of candidate/reference but not the other"
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


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def check_graph(
    reference: Backend, candidate: Backend, graph: str, cases: Sequence[Case], tol: Tolerance
) -> list[OutputCheck]:
    """Run ``cases`` of ``graph`` through ``reference`` and ``candidate``; one ``OutputCheck`` per case and
    output.

    A candidate that raises on a case fails every output of that case (the message says why);
    the reference raising is a bug of the check itself and propagates.
    """
    spec = reference.spec(graph)
    checks: list[OutputCheck] = []
    for case in cases:
        ref = reference.run(graph, case.feeds)
        try:
            got = candidate.run(graph, case.feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime/TensorRT raise their own types; all are failures here
            msg = f"{candidate.name} rejected inputs {case.shapes()}: {_first_line(e)}"
            for name in spec.output_names:
                checks.append(OutputCheck(graph, case.name, name, list(ref[name].shape), error=msg))
                log.error("%s[%s] %s: %s", graph, case.name, name, msg)
            continue
        for name in spec.output_names:
            c = compare(graph, case.name, name, got[name], ref[name], tol)
            checks.append(c)
            if c.ok:
                log.info(
                    "%s[%s] %s: shape %s ok, max abs %.2e, max rel %.2e",
                    graph,
                    case.name,
                    name,
                    tuple(c.shape or ()),
                    c.max_abs,
                    c.max_rel,
                )
            else:
                log.error("%s[%s] %s: %s", graph, case.name, name, c.error)
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
    r = ref[order_got].astype(np.float64)  # reference scores in candidate rank order
    later_higher = r[None, :] - r[:, None]  # [i,j]: ref[j] - ref[i]
    upper = np.triu(np.ones_like(later_higher, dtype=bool), k=1)
    inverted = upper & (later_higher > 0)  # i ranked above j, but ref says j > i
    violations = int((inverted & (later_higher > atol)).sum())
    return float(np.mean(order_got == order_ref)), int(inverted.sum()) - violations, violations


def final_scores(runner: Backend, images: Feeds, texts: Feeds) -> np.ndarray:
    """``img_stage1 . txt_stage1 + s_ll`` of every image/caption pair, all through ``runner`` -> ``[Ni,
    Nt]``."""
    img = runner.run(IMAGE_ENCODER.name, images)
    txt = runner.run(TEXT_ENCODER.name, texts)
    s_ll = runner.run(
        SCORER.name,
        {
            "img_local": img["img_local"],
            "region_mask": images["region_mask"],
            "img_gram": img["img_gram"],
            "txt_local": txt["txt_local"],
            "token_mask": texts["token_mask"],
            "txt_gram": txt["txt_gram"],
        },
    )["s_ll"]
    return np.asarray(img["img_stage1"] @ txt["txt_stage1"].T + s_ll)


def check_rerank(
    reference: ScoreFn,
    candidate: Backend,
    tol: Tolerance,
    inputs: Sequence[tuple[str, Feeds, Feeds]],
) -> list[RerankCheck]:
    """Final scores of ``candidate`` (:func:`final_scores`) against ``reference`` on each ``(direction,
    images, texts)``.

    Fails past ``tol.atol`` on any score; on the order when ``tol.topk_agreement`` is 1 (except
    near-ties: candidates whose reference scores lie within atol of each other may swap);
    otherwise on top-10 agreement (a candidate within atol of the reference's 10th score
    counts as agreeing: a near-tie).
    """
    checks: list[RerankCheck] = []
    for direction, images, texts in inputs:
        depth = len(images["regions"]) if direction == "t2i" else len(texts["tokens"])
        check = RerankCheck(direction, depth)
        checks.append(check)
        ref = np.asarray(reference(images, texts))  # [Ni,Nt]
        try:
            got = final_scores(candidate, images, texts)
        except Exception as e:  # noqa: BLE001 - onnxruntime/TensorRT raise their own types
            check.error = f"{candidate.name} failed: {_first_line(e)}"
            log.error("rerank %s: %s", direction, check.error)
            continue
        if got.shape != ref.shape or not np.isfinite(got).all():
            check.error = f"final scores have shape {got.shape} (expected {ref.shape}) or are not finite"
            log.error("rerank %s: %s", direction, check.error)
            continue
        ref_1d, got_1d = ref.reshape(-1), got.reshape(-1)
        check.max_abs = float(np.abs(got_1d.astype(np.float64) - ref_1d).max())
        check.order_agreement, check.tolerated_swaps, check.violations = rerank_order_check(
            ref_1d, got_1d, tol.atol
        )
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
                f"rerank order differs from the reference in {check.violations} pair(s) whose reference "
                "scores "
                f"differ by more than atol {tol.atol:g}"
            )
        if check.topk_agreement_near_ties < tol.topk_agreement and tol.topk_agreement < 1.0:
            errors.append(
                f"top-{top} agreement {check.topk_agreement_near_ties:.2f} < {tol.topk_agreement:.2f} "
                f"(counting candidates within atol of the reference's {top}th score as shared)"
            )
        check.error = "; ".join(errors) or None
        log_fn = log.info if check.ok else log.error
        log_fn(
            "rerank %s@%d: max abs %.2e, order agreement %.2f, near-tie swaps %d, violations %d, top-%d "
            "%.2f%s",
            direction,
            check.depth,
            check.max_abs,
            check.order_agreement,
            check.tolerated_swaps,
            check.violations,
            top,
            check.topk_agreement,
            "" if check.ok else f" -- {check.error}",
        )
    return checks


def compare_runners(
    reference: Backend,
    candidate: Backend,
    cases: Mapping[str, Sequence[Case]],
    tol: Tolerance,
    *,
    precision: str,
    rerank: Sequence[tuple[str, Feeds, Feeds]] = (),
    reference_scores: ScoreFn | None = None,
    execution: str | None = None,
    reference_name: str | None = None,
    label: str = "",
) -> ParityReport:
    """The parity of ``candidate`` against ``reference``: every case of every graph, then the reranks.

    Args:
        cases: ``{graph: cases}`` (graphs the candidate lacks are contract failures).
        rerank: ``(direction, images, texts)`` inputs of the end-to-end check (needs the three graphs).
        reference_scores: the reference's final scores (default: :func:`final_scores` of ``reference``).
        execution, reference_name, label: recorded in the report.
    Returns:
        The report; never raises on a mismatch (``raise_if_failed`` makes failures fatal).
    """
    report = ParityReport(
        precision,
        tol,
        execution=execution or candidate.name,
        reference=reference_name or reference.name,
        label=label,
    )
    for graph, graph_cases in cases.items():
        if graph not in candidate.graphs:
            report.contract.append(f"{candidate.name} has no graph {graph!r} (has {candidate.graphs})")
            continue
        report.outputs += check_graph(reference, candidate, graph, graph_cases, tol)
    if rerank:
        if set(GRAPHS) <= set(candidate.graphs):
            scores = reference_scores or (lambda images, texts: final_scores(reference, images, texts))
            report.reranks = check_rerank(scores, candidate, tol, rerank)
        else:
            report.contract.append(f"rerank check needs all of {sorted(GRAPHS)}; have {candidate.graphs}")
    for m in report.contract:
        log.error("[%s] %s", label or precision, m)
    return report


def validate_graphs(
    model: MSSAN,
    paths: Mapping[str, str | os.PathLike[str]],
    *,
    precision: str = "fp32",
    atol: float | None = None,
    cases: Mapping[str, Sequence[Case]] | None = None,
    rerank: bool = True,
    seed: int = 2,
) -> ParityReport:
    """Check the graphs at ``paths`` ({graph name: .onnx}) against ``model``; never raises on a mismatch.

    Args:
        precision: selects ``TOLERANCES[precision]`` ("fp32" or "fp16"); references are always PyTorch fp32.
        atol: overrides the tolerance's atol.
        cases: per graph; defaults to ``export.inputs.parity_cases(model)``.
        rerank: also run the end-to-end check against ``model.score`` (needs all three graphs).
    Returns:
        The report; call ``raise_if_failed()`` on it to make failures fatal.
    """
    tol = tolerance_for(precision, atol)
    cfg = model.cfg
    dims = {"D": cfg.embed_size, "D2": 2 * cfg.embed_size, "Dv": cfg.img_dim}
    execution = "onnxruntime CPUExecutionProvider"
    if precision == "fp16":
        execution += ", explicit fp16 rounding of MatMul/Gemm inputs and outputs (fp32 accumulation)"
    contract: list[str] = []
    for name, path in paths.items():
        contract += check_contract(path, GRAPHS[name], dims)
    try:
        candidate: Backend | None = onnx_runner(paths, precision)
    except MssanError as e:
        contract.append(
            f"ONNX Runtime cannot load {sorted(Path(p).name for p in paths.values())}: {_first_line(e)}"
        )
        candidate = None
    cases = parity_cases(model) if cases is None else cases
    if candidate is None:
        report = ParityReport(precision, tol, execution=execution)
    else:
        with candidate:
            report = compare_runners(
                torch_runner(model),
                candidate,
                {g: cases.get(g, ()) for g in paths},
                tol,
                precision=precision,
                rerank=rerank_cases(cfg, tol.rerank_depth, seed)
                if rerank and set(paths) == set(GRAPHS)
                else (),
                reference_scores=_model_scores(model),
                execution=execution,
                reference_name="pytorch fp32",
            )
        if rerank and set(paths) != set(GRAPHS):
            report.contract.append(f"rerank check needs all of {sorted(GRAPHS)}; have {sorted(paths)}")
    report.contract[:0] = contract
    for m in contract:
        log.error("[%s] %s", precision, m)
    return report


def rerank_cases(
    cfg: FeedConfig, depth: int, seed: int, r_max: int = 36, l_max: int | None = None
) -> list[tuple[str, Feeds, Feeds]]:
    """The inputs of the rerank check: one caption vs ``depth`` images (t2i), one image vs ``depth`` captions
    (i2t)."""
    return [(d, *rerank_inputs(cfg, d, depth, seed + k, r_max, l_max)) for k, d in enumerate(("t2i", "i2t"))]


def _model_scores(model: MSSAN) -> ScoreFn:
    """``model.score`` of encoded images and captions: the independent reference of the final scores."""

    @torch.inference_mode()
    def scores(images: Feeds, texts: Feeds) -> np.ndarray:
        ti, tt = to_torch(images), to_torch(texts)
        return np.asarray(
            model.score(
                model.encode_image(ti["regions"], ti["region_mask"]),
                model.encode_text(tt["tokens"], tt["token_mask"]),
            ).numpy()
        )

    return scores
