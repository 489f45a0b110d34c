"""The query scorers (``mssan_infer.spec.QUERY_SCORERS``): export and their fatal parity gates.

Every export writes four: ``scorer_t2i`` / ``scorer_i2t`` (one query against float32 candidates, fed
their similarities ``c_local @ q_local^T`` as the runtime computes them where the rows lie) and their
``*_int8`` variants (candidates as the ``int8`` layout stores them: uint8 codes + 128, per-vector
scales, float16 Grams; the query quantized to 7 bits in the graph; the big product an integer GEMM).

Gates (fatal, like the other graphs'):

* float32 query scorers against PyTorch's all-pairs score of the same pairs (``TOLERANCES["fp32"]``).
* int8 query scorers against the float32 query scorer fed the same numbers: the candidates
  dequantized and the query rounded to its 7-bit codes exactly as the graph rounds it. The integer GEMM
  sums exact integer products, so the two differ only by float32 rounding: the fp32 tolerance again.
  What int8 costs in accuracy is then the query's rounding alone (each query value within half a
  step, ``max |q| / 126``; a similarity ``v . q`` within ``|v|_1 max |q| / 126``). It is measured
  here (``query_rounding`` in the report: the largest change of ``s_ll`` on the parity cases, beside
  that product bound) and judged on recall by the bench and by ``export.int8``'s recall gate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mssan_infer.gallery.storage import dequantize_into, store_locals
from mssan_infer.spec import QUERY_SCORERS, SCORER, SIMILARITY, query_scorer
from training.model import MSSAN

from .graphs import QUERY_MAX, build_graphs, build_query_scorers
from .inputs import Case, Feeds, parity_cases
from .onnx import export_graph
from .runners import TorchRunner, onnx_runner
from .validate import ParityReport, compare, tolerance_for

__all__ = ["export_query_scorers", "query_cases", "quantize_like_the_graph", "similarity"]

log = logging.getLogger(__name__)


def quantize_like_the_graph(x: np.ndarray) -> np.ndarray:
    """``x [Q, D]`` rounded to the int8 query scorers' 7-bit codes and back (numpy, the graph's formula)."""
    scale = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-30)) / np.float32(QUERY_MAX)
    return (np.rint(x / scale) * scale).astype(np.float32)


def _sides(query_is_text: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """(candidate prefix, mask prefix), (query prefix, mask prefix)."""
    img, txt = ("img", "region"), ("txt", "token")
    return (img, txt) if query_is_text else (txt, img)


def query_cases(pairs: Feeds, query_is_text: bool, query: int, *, int8: bool) -> Feeds:
    """Feeds of a query scorer from all-pairs scorer feeds: item ``query`` of the query side against every
    item of the other (stored as the ``int8`` layout stores them when ``int8``)."""
    (c, cm), (q, qm) = _sides(query_is_text)
    local, gram = pairs[f"{c}_local"], pairs[f"{c}_gram"]
    q_local = pairs[f"{q}_local"][query]
    feeds: dict[str, np.ndarray] = {
        f"{cm}_mask": pairs[f"{cm}_mask"],
        f"{qm}_mask": pairs[f"{qm}_mask"][query],
        f"{q}_gram": pairs[f"{q}_gram"][query],
    }
    if int8:
        codes, scale, gram16 = store_locals("int8", local.astype(np.float32), gram.astype(np.float32))
        assert scale is not None
        feeds.update({f"{c}_codes": codes, f"{c}_scale": scale, f"{c}_gram": gram16, f"{q}_local": q_local})
    else:
        feeds.update({SIMILARITY: similarity(local, q_local), f"{c}_gram": gram})
    return feeds


def similarity(c_local: np.ndarray, q_local: np.ndarray) -> np.ndarray:
    """The float32 query scorers' ``similarity`` input, ``c_local [K, P, D] @ q_local [Q, D]^T`` in float32,
    the product the runtime computes for them."""
    return np.matmul(c_local.astype(np.float32), q_local.astype(np.float32).T)


def _dequantized(feeds: Feeds, c: str) -> np.ndarray:
    """The candidates' int8 codes of ``feeds`` as float32 (the runtime's own dequantization)."""
    codes = feeds[f"{c}_codes"]
    out = np.empty(codes.shape, np.float32)
    dequantize_into(out, codes, feeds[f"{c}_scale"])
    return out


def _as_fp32(feeds: Feeds, query_is_text: bool, *, round_query: bool) -> Feeds:
    """int8 query-scorer feeds as the float32 query scorer's: candidates dequantized (optionally the
    query rounded as the int8 graph rounds it)."""
    (c, cm), (q, qm) = _sides(query_is_text)
    local = _dequantized(feeds, c)
    q_local = feeds[f"{q}_local"]
    return {
        SIMILARITY: similarity(local, quantize_like_the_graph(q_local) if round_query else q_local),
        f"{cm}_mask": feeds[f"{cm}_mask"],
        f"{c}_gram": feeds[f"{c}_gram"].astype(np.float32),
        f"{qm}_mask": feeds[f"{qm}_mask"],
        f"{q}_gram": feeds[f"{q}_gram"],
    }


def export_query_scorers(
    model: MSSAN,
    out: Path,
    *,
    opset: int,
    atol: float | None = None,
    cases: Mapping[str, Any] | None = None,
) -> tuple[ParityReport, dict[str, Path]]:
    """Export the four query scorers into ``out`` and check them (the report; fatal when it fails).

    Returns:
        ``(report, {graph: path})``; the report's precision is ``"query-scorers"``.
    """
    cfg = model.cfg
    dims = {"D": cfg.embed_size, "D2": 2 * cfg.embed_size, "Dv": cfg.img_dim}
    pair_cases = list((cases or parity_cases(model))[SCORER.name])
    wrappers = build_query_scorers(model)
    feeds: dict[str, list[Case]] = {name: [] for name in QUERY_SCORERS}
    for case in pair_cases:
        ni, nt = case.feeds["img_local"].shape[0], case.feeds["txt_local"].shape[0]
        for query_is_text, n in ((True, nt), (False, ni)):
            for qi in sorted({0, n - 1}):
                for int8 in (False, True):
                    name = query_scorer(query_is_text, int8)
                    f = query_cases(case.feeds, query_is_text, qi, int8=int8)
                    feeds[name].append(Case(f"{case.name}_q{qi}", f))
    paths = {
        name: export_graph(wrappers[name], spec, feeds[name][0].feeds, out / spec.file, opset=opset)
        for name, spec in QUERY_SCORERS.items()
    }
    tol = tolerance_for("fp32", atol)
    report = ParityReport("query-scorers", tol)  # reference: PyTorch fp32 (int8 graphs: see the docstring)
    torch_pairs = TorchRunner({SCORER.name: build_graphs(model)[SCORER.name]}, dims)
    rounding: list[dict[str, float]] = []
    with onnx_runner({k: str(v) for k, v in paths.items()}) as ort:
        for case in pair_cases:
            ref = torch_pairs.run(SCORER.name, case.feeds)["s_ll"]  # [Ni, Nt]
            ni, nt = ref.shape
            for query_is_text, n in ((True, nt), (False, ni)):
                for qi in sorted({0, n - 1}):
                    want = ref[:, qi] if query_is_text else ref[qi, :]
                    fp = query_scorer(query_is_text, False)
                    got = ort.run(fp, query_cases(case.feeds, query_is_text, qi, int8=False))["s_ll"]
                    report.outputs.append(compare(fp, f"{case.name}_q{qi}", "s_ll", got, want, tol))
                    i8 = query_scorer(query_is_text, True)
                    f8 = query_cases(case.feeds, query_is_text, qi, int8=True)
                    got8 = ort.run(i8, f8)["s_ll"]
                    same = ort.run(fp, _as_fp32(f8, query_is_text, round_query=True))["s_ll"]
                    report.outputs.append(compare(i8, f"{case.name}_q{qi}", "s_ll", got8, same, tol))
                    exact = ort.run(fp, _as_fp32(f8, query_is_text, round_query=False))["s_ll"]
                    rounding.append(_rounding(f8, query_is_text, got8, exact))
    worst = max(rounding, key=lambda r: r["s_ll"]) if rounding else {}
    log.info(
        "int8 query scorers: the query's 7-bit rounding moves s_ll by at most %.2e (similarities by at most "
        "%.2e, the bound |v|_1 max|q| / 126)",
        worst.get("s_ll", 0.0),
        worst.get("product_bound", 0.0),
    )
    report.execution += "; int8 graphs: integer GEMM (MatMulInteger, uint8 - 128 x int8)"
    report.notes["int8_query_rounding"] = worst
    for c in report.outputs:
        if not c.ok:
            log.error("%s[%s] s_ll: %s", c.graph, c.case, c.error)
    return report, paths


def _rounding(feeds: Feeds, query_is_text: bool, got: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """How far the query's rounding moved ``s_ll``, beside the bound on the similarities it moved."""
    (c, _), (q, _) = _sides(query_is_text)
    local = _dequantized(feeds, c)
    l1 = np.abs(local).sum(-1).max() if local.size else 0.0
    qmax = float(np.abs(feeds[f"{q}_local"]).max()) if feeds[f"{q}_local"].size else 0.0
    return {
        "s_ll": float(np.abs(got.astype(np.float64) - exact).max()) if got.size else 0.0,
        "product_bound": float(l1 * qmax / (2 * QUERY_MAX)),
    }


def check_fast_recall(
    model: MSSAN,
    tokenizer: Any,
    int8_text: Path,
    scorers: Mapping[str, Path],
    data: Any,
    depth: int = 100,
    batch: int = 64,
) -> dict[str, Any]:
    """The fast path's recall gate: two-stage@``depth`` R@1 with the int8 text encoder, the ``int8`` layout
    and the ``*_int8`` query scorers, over exhaustive R@1 of PyTorch fp32, on the gate's split (``data``:
    an ``export.int8.GateData``), both ways. Returns the record (``failures``: ratios below
    ``INT8_RECALL_RATIO``; a direction too weak to judge, as ``export.int8.judge_floor`` says, is recorded
    as not judged)."""
    from mssan_infer.spec import TEXT_ENCODER
    from training.evaluate import encode_split, ranks_i2t, ranks_t2i, recall_from_ranks, sharded_score

    from .int8 import INT8_RECALL_RATIO, judge_floor

    img, ref = encode_split(model, data.images, data.region_mask, data.captions, tokenizer)
    full_ref = sharded_score(model, img, ref)  # [Ni, Nt]
    ni, nt = full_ref.shape
    with onnx_runner({TEXT_ENCODER.name: int8_text, **{g: str(p) for g, p in scorers.items()}}) as ort:
        st, lo, ma, gr = [], [], [], []
        for s in range(0, nt, batch):
            tokens, tmask = tokenizer.encode_batch(data.captions[s : s + batch])
            res = ort.run(TEXT_ENCODER.name, {"tokens": tokens, "token_mask": tmask})
            st.append(res["txt_stage1"])
            lo.append(res["txt_local"])
            ma.append(tmask.astype(np.float32))
            gr.append(res["txt_gram"])
        width = max(x.shape[1] for x in lo)
        t_st = np.concatenate(st)
        t_lo = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0))) for x in lo])
        t_ma = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in ma])
        t_gr = np.concatenate(
            [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, width - x.shape[1]))) for x in gr]
        )
        i_st, i_lo, i_ma, i_gr = (x.numpy() for x in (img.stage1, img.local, img.mask, img.gram))
        stored = {
            True: store_locals("int8", i_lo, i_gr),  # the image gallery (text queries)
            False: store_locals("int8", t_lo, t_gr),  # the caption gallery (image queries)
        }
        stage1 = i_st @ t_st.T  # [Ni, Nt]
        fast = {True: np.full((ni, nt), -np.inf, np.float32), False: np.full((ni, nt), -np.inf, np.float32)}
        for query_is_text, n_q in ((True, nt), (False, ni)):
            codes, scale, gram16 = stored[query_is_text]
            assert scale is not None
            s1 = stage1.T if query_is_text else stage1  # [queries, gallery]
            k = min(depth, s1.shape[1])
            (c, cm), (q, qm) = _sides(query_is_text)
            q_lo, q_ma, q_gr = (t_lo, t_ma, t_gr) if query_is_text else (i_lo, i_ma, i_gr)
            c_ma = i_ma if query_is_text else t_ma
            for qi in range(n_q):
                cand = np.argpartition(-s1[qi], k - 1)[:k]
                feeds = {
                    f"{c}_codes": codes[cand],
                    f"{c}_scale": scale[cand],
                    f"{cm}_mask": c_ma[cand],
                    f"{c}_gram": gram16[cand],
                    f"{q}_local": q_lo[qi],
                    f"{qm}_mask": q_ma[qi],
                    f"{q}_gram": q_gr[qi],
                }
                final = s1[qi, cand] + ort.run(query_scorer(query_is_text, True), feeds)["s_ll"]
                if query_is_text:
                    fast[True][cand, qi] = final
                else:
                    fast[False][qi, cand] = final
    rec_ref = {"i2t": recall_from_ranks(ranks_i2t(full_ref)), "t2i": recall_from_ranks(ranks_t2i(full_ref))}
    rec_fast = {
        "i2t": recall_from_ranks(ranks_i2t(fast[False])),
        "t2i": recall_from_ranks(ranks_t2i(fast[True])),
    }
    out: dict[str, Any] = {
        "depth": depth,
        "images": ni,
        "captions": nt,
        "recall_fp32_exhaustive": rec_ref,
        "recall_fast_twostage": rec_fast,
        "recall1_ratio": {},
        "judged": {},
        "failures": [],
    }
    for d in ("t2i", "i2t"):
        a, b = rec_fast[d]["r1"], rec_ref[d]["r1"]
        out["recall1_ratio"][d] = a / b if b > 0 else None
        queries = nt if d == "t2i" else ni
        out["judged"][d] = round(b * queries / 100.0) >= judge_floor(ni, queries)
        if out["judged"][d] and a < INT8_RECALL_RATIO * b:
            out["failures"].append(
                f"fast path ({d}): two-stage@{depth} R@1 {a:.1f} < {INT8_RECALL_RATIO} x fp32 "
                f"exhaustive {b:.1f}"
            )
    log.info("fast path recall (two-stage@%d / fp32 exhaustive R@1): %s", depth, out["recall1_ratio"])
    return out
