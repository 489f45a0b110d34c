"""Turn the sections' results into summary.json, results.md (printed) and PNG plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .floor import OWN_WORDS, PATHS, floor_figure, floor_markdown, summarise_floor
from .labels import DIRECTIONS, candidate_label, count, gallery_label, scorer_shape_label
from .text_tower import TOWERS as TEXT_TOWERS
from .timing import cpu_identity_text

__all__ = ["summarise", "markdown", "figures", "plots", "write_results", "SUMMARY_KEYS"]

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "scorer_speedup_vs_torch",
    "scorer_speedup_vs_loop",
    "scorer_fraction_of_sgemm_peak",
    "twostage_speedup_vs_exhaustive_5k",
    "twostage_speedup_vs_exhaustive_25k",
    "twostage_recall1_ratio_5k",
    "t2i_p50_ms_5k_rerank100",
    "i2t_p50_ms_5k_rerank100",
    # gallery layouts (issue 13)
    "twostage_speedup_vs_exhaustive_25k_int8",
    "twostage_recall1_ratio_5k_int8",
    "t2i_p50_ms_25k_rerank100_no_encode_int8",
    "rss_mb_25k_int8",
    "exhaustive_runtime_vs_torch_5k",
    "t2i_p50_ms_100k_rerank100_int8",
    "text_encode_speedup_int8_vs_bigru",
    "t2i_p50_ms_5k_rerank100_minilm",
    # the default tower's fast path and the floor of a query (issue 27)
    "t2i_p50_ms_5k_rerank100_int8",
    "t2i_p50_ms_25k_rerank100_int8",
    "i2t_p50_ms_5k_rerank100_int8",
    "int8_vs_fp32_p50_5k",
    "fastpath_vs_default_p50_5k",
    "floor_ratio_t2i_5k_int8",
    "floor_ratio_t2i_25k_int8",
    "floor_ratio_i2t_5k_int8",
    "floor_ratio_t2i_5k_fp32",
    "floor_ratio_t2i_25k_fp32",
    "floor_ratio_i2t_5k_fp32",
    "stage1_recall100_5k_t2i",
    "stage1_recall100_5k_i2t",
)
LAYOUT_NAMES = ("fp32", "int8-stage1", "int8")  # fp16 was removed (older results may still hold it)
TARGETS = {
    "scorer_speedup_vs_torch": (">=", 1.5),
    "scorer_fraction_of_sgemm_peak": (">=", 0.30),
    "twostage_speedup_vs_exhaustive_5k": (">=", 10.0),
    "twostage_speedup_vs_exhaustive_25k": (">=", 40.0),
    "twostage_recall1_ratio_5k": (">=", 0.99),
    "t2i_p50_ms_5k_rerank100": ("<=", 6.0),
    "twostage_speedup_vs_exhaustive_25k_int8": (">=", 200.0),
    "twostage_recall1_ratio_5k_int8": (">=", 0.99),
    "t2i_p50_ms_25k_rerank100_no_encode_int8": ("<=", 3.0),
    "rss_mb_25k_int8": ("<=", 2000.0),
    "exhaustive_runtime_vs_torch_5k": (">=", 1.0),
    "t2i_p50_ms_100k_rerank100_int8": ("<=", 12.0),
    "text_encode_speedup_int8_vs_bigru": (">=", 3.0),
    "t2i_p50_ms_5k_rerank100_minilm": ("<=", 5.0),
    "t2i_p50_ms_5k_rerank100_int8": ("<=", 3.0),
    "t2i_p50_ms_25k_rerank100_int8": ("<=", 5.0),
    "i2t_p50_ms_5k_rerank100_int8": ("<=", 8.0),
    "int8_vs_fp32_p50_5k": ("<", 1.0),
    "floor_ratio_t2i_5k_int8": ("<=", 2.0),
    "floor_ratio_t2i_25k_int8": ("<=", 2.0),
    "floor_ratio_i2t_5k_int8": ("<=", 2.0),
}


def _nan(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _nanmin(xs: Any) -> float:
    """The smallest of ``xs``, NaN when any is NaN (a missing measurement is not a pass)."""
    xs = [_nan(x) for x in xs]
    return float("nan") if not xs or any(math.isnan(x) for x in xs) else min(xs)


def summarise(res: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Headline figures (all from this run); ``sources`` says which measurement fed each."""
    s: dict[str, Any] = {}
    src: dict[str, str] = {}
    sc = res.get("scorer", {}).get("shapes", {})
    k_shape = sc.get(cfg["scorer_k_shape"], {})
    shard = sc.get(cfg["scorer_shard_shape"], {})
    s["scorer_speedup_vs_torch"] = _nan(k_shape.get("speedup_ort_vs_torch"))
    s["scorer_speedup_vs_loop"] = _nan(k_shape.get("speedup_ort_vs_loop"))
    s["scorer_fraction_of_sgemm_peak"] = _nan(shard.get("onnxruntime", {}).get("fraction_of_sgemm"))
    src["scorer_speedup_vs_torch"] = src["scorer_speedup_vs_loop"] = f"scorer {cfg['scorer_k_shape']}"
    src["scorer_fraction_of_sgemm_peak"] = f"scorer {cfg['scorer_shard_shape']} (onnxruntime)"
    s["sgemm_gflops"] = _nan(shard.get("sgemm_gflops"))
    lat = res.get("latency", {})
    for tag, n in (("5k", cfg["ref_small"]), ("25k", cfg["ref_large"])):
        row = lat.get(f"t2i_{n}", {})
        s[f"twostage_speedup_vs_exhaustive_{tag}"] = _nan(row.get("speedup_rerank100_vs_exhaustive_torch"))
        src[f"twostage_speedup_vs_exhaustive_{tag}"] = (
            f"latency t2i_{n}: exhaustive PyTorch p50 / rerank 100 p50"
        )
    for d in ("t2i", "i2t"):
        row = lat.get(f"{d}_{cfg['ref_small']}", {})
        s[f"{d}_p50_ms_5k_rerank100"] = _nan(row.get("fast", {}).get("rerank_100", {}).get("p50_ms"))
        src[f"{d}_p50_ms_5k_rerank100"] = (
            f"latency {d}_{cfg['ref_small']} rerank_100 (default backend settings)"
        )
        fast = row.get("fast", {})
        opts = {k: v["p50_ms"] for k, v in fast.items() if k.startswith("rerank_100[")}
        if opts:
            best = min(opts, key=lambda k: opts[k])
            s[f"{d}_p50_ms_5k_rerank100_best"] = opts[best]
            s[f"{d}_best_setting_5k_rerank100"] = best
    row = lat.get(f"t2i_{cfg['ref_large']}", {})
    s["twostage_ivf_speedup_vs_exhaustive_25k"] = _nan(row.get("speedup_rerank100_ivf_vs_exhaustive_torch"))
    src["twostage_ivf_speedup_vs_exhaustive_25k"] = (
        f"latency t2i_{cfg['ref_large']}: exhaustive PyTorch p50 / "
        f"rerank 100 over a FAISS IVF stage 1 {row.get('ivf_options')} p50"
    )
    rec = res.get("recall", {})
    ivf_ratios = [_nan(rec.get(d, {}).get("ivf_100", {}).get("r1_ratio")) for d in ("t2i", "i2t")]
    s["twostage_ivf_recall1_ratio_5k"] = min(ivf_ratios)
    src["twostage_ivf_recall1_ratio_5k"] = (
        f"recall on {rec.get('images')} synthetic images: min over t2i/i2t of "
        f"R@1(rerank 100, IVF stage 1 {rec.get('ivf_options')}) / R@1(exhaustive)"
    )
    ratios = [_nan(rec.get(d, {}).get("100", {}).get("r1_ratio")) for d in ("t2i", "i2t")]
    s["twostage_recall1_ratio_5k"] = min(ratios) if ratios else float("nan")
    s["twostage_recall1_ratio_5k_t2i"], s["twostage_recall1_ratio_5k_i2t"] = ratios
    src["twostage_recall1_ratio_5k"] = (
        f"recall on {rec.get('images')} synthetic images: min over t2i/i2t of "
        "R@1(rerank 100) / R@1(exhaustive)"
    )
    for d in ("t2i", "i2t"):
        s[f"stage1_recall100_5k_{d}"] = _nan(rec.get(d, {}).get("0", {}).get("r100"))
        src[f"stage1_recall100_5k_{d}"] = (
            f"recall on {rec.get('images')} synthetic images: % of {d} queries with a right answer in "
            "the stage-1 top 100 (the candidates of rerank 100)"
        )
    # ---- gallery layouts
    big = lat.get(f"t2i_{cfg['ref_large']}", {})
    s["twostage_speedup_vs_exhaustive_25k_int8"] = _nan(big.get("speedup_rerank100_int8_vs_exhaustive_torch"))
    src["twostage_speedup_vs_exhaustive_25k_int8"] = (
        f"latency t2i_{cfg['ref_large']} slow group: exhaustive PyTorch "
        "p50 / rerank 100 p50 of the fast path (int8 text encoder, int8 layout)"
    )
    lay = big.get("layouts", {}).get("int8", {})
    s["t2i_p50_ms_25k_rerank100_no_encode_int8"] = _nan(lay.get("no_encode_100", {}).get("p50_ms"))
    src["t2i_p50_ms_25k_rerank100_no_encode_int8"] = (
        f"latency t2i_{cfg['ref_large']} layouts group: search_encoded "
        "(stage 1 + gather + scorer) at rerank 100, int8 layout"
    )
    s["rss_mb_25k_int8"] = _nan(lay.get("resident", {}).get("rss_mb"))
    src["rss_mb_25k_int8"] = (
        f"VmRSS of a fresh process holding the bundle and the {cfg['ref_large']}-image gallery "
        "in the int8 layout, after 20 searches"
    )
    ratios = {}
    for d in ("t2i", "i2t"):
        row = lat.get(f"{d}_{cfg['ref_small']}", {})
        ratios[d] = _nan(row.get("exhaustive_runtime_vs_torch"))
        s[f"exhaustive_runtime_vs_torch_5k_{d}"] = ratios[d]
    s["exhaustive_runtime_vs_torch_5k"] = _nanmin(ratios.values())
    src["exhaustive_runtime_vs_torch_5k"] = (
        f"latency t2i/i2t_{cfg['ref_small']} slow group: exhaustive PyTorch p50 / "
        "runtime exhaustive (rerank = gallery) p50, the smaller of the two"
    )
    floor_s, floor_src = summarise_floor(lat, cfg)  # t2i_p50_ms_100k_rerank100_int8 is the fast path's
    s.update(floor_s)
    src.update(floor_src)
    # the exact default's end to end and the fast path's speedup, in processes of their own where measured
    for d in ("t2i", "i2t"):
        if f"{d}_p50_ms_{_tag(cfg['ref_small'])}_rerank100_fp32_shared" in floor_s:
            s[f"{d}_p50_ms_5k_rerank100_shared"] = s[f"{d}_p50_ms_5k_rerank100"]
            s[f"{d}_p50_ms_5k_rerank100"] = floor_s[f"{d}_p50_ms_{_tag(cfg['ref_small'])}_rerank100_fp32"]
            src[f"{d}_p50_ms_5k_rerank100"] = (
                f"latency {d}_{cfg['ref_small']} floor group: rerank 100 end to end ({OWN_WORDS}), "
                f"{PATHS['fp32']}"
            )
    torch_ms = _nan(big.get("slow", {}).get("exhaustive_torch", {}).get("p50_ms"))
    own_ms = floor_s.get(f"t2i_p50_ms_{_tag(cfg['ref_large'])}_rerank100_int8")
    if own_ms is not None and f"t2i_p50_ms_{_tag(cfg['ref_large'])}_rerank100_int8_shared" in floor_s:
        s["twostage_speedup_vs_exhaustive_25k_int8_shared"] = s["twostage_speedup_vs_exhaustive_25k_int8"]
        s["twostage_speedup_vs_exhaustive_25k_int8"] = torch_ms / own_ms
        src["twostage_speedup_vs_exhaustive_25k_int8"] = (
            f"latency t2i_{cfg['ref_large']}: exhaustive PyTorch p50 (slow group) / rerank 100 p50 of the "
            f"fast path ({OWN_WORDS}: the slow group's interleaved ratio)"
        )
    lr = [_nan(rec.get(d, {}).get("layout_int8", {}).get("r1_ratio_vs_fp32")) for d in ("t2i", "i2t")]
    s["twostage_recall1_ratio_5k_int8"] = _nanmin(lr)
    s["twostage_recall1_ratio_5k_int8_t2i"], s["twostage_recall1_ratio_5k_int8_i2t"] = lr
    src["twostage_recall1_ratio_5k_int8"] = (
        f"recall on {rec.get('images')} synthetic images at rerank 100: min over "
        "t2i/i2t of R@1(int8 layout) / R@1(fp32 layout)"
    )
    for name in LAYOUT_NAMES[1:]:
        for d in ("t2i", "i2t"):
            row = rec.get(d, {}).get(f"layout_{name}", {})
            s[f"recall_ratio_5k_{name}_{d}"] = {
                r: _nan(row.get(f"{r}_ratio_vs_fp32")) for r in ("r1", "r5", "r10")
            }
            s[f"score_err_max_5k_{name}_{d}"] = _nan(row.get("score_err_max"))
    s["bandwidth_gbs"] = _nan(res.get("bandwidth_gbs"))
    _summarise_qdrant(res, s, src, cfg)
    enc = res.get("encode", {})
    s["images_per_s"] = _nan(enc.get("images_per_s"))
    s["captions_per_s"] = _nan(enc.get("captions_per_s"))
    txt = res.get("text", {})
    s["text_encode_speedup_int8_vs_bigru"] = _nan(txt.get("speedup_minilm_int8_vs_bigru_b1"))
    src["text_encode_speedup_int8_vs_bigru"] = (
        f"text: Bi-GRU (D={cfg['d']}) p50 / MiniLM int8 p50, text encoder alone, "
        f"one {cfg['words']}-word query, {cfg['threads']} threads"
    )
    s["text_encode_speedup_fp32_vs_bigru"] = _nan(txt.get("speedup_minilm_fp32_vs_bigru_b1"))
    s["text_encode_ms_b1_minilm_int8_products"] = _nan(
        txt.get("encoder", {}).get("minilm_int8_products_b1", {}).get("p50_ms")
    )
    s["text_encode_speedup_bound_int8_vs_bigru"] = _nan(
        txt.get("speedup_bound_minilm_int8_products_vs_bigru_b1")
    )
    src["text_encode_speedup_bound_int8_vs_bigru"] = (
        "text: Bi-GRU p50 / p50 of a graph holding only the MiniLM int8 "
        "encoder's weight products (same shapes and kernels, same rounds)"
    )
    for n in txt.get("layers", []):
        s[f"text_encode_speedup_int8_l{n}_vs_bigru"] = _nan(txt.get(f"speedup_minilm_l{n}_int8_vs_bigru_b1"))
        src[f"text_encode_speedup_int8_l{n}_vs_bigru"] = (
            f"text: Bi-GRU p50 / p50 of the MiniLM cut to its first {n} "
            "layers (--text-layers), int8, in the same rounds"
        )
        s[f"text_encode_speedup_bound_int8_l{n}_vs_bigru"] = _nan(
            txt.get(f"speedup_bound_minilm_l{n}_int8_products_vs_bigru_b1")
        )
    for tower in txt.get("towers", TEXT_TOWERS):
        for b in (1, txt.get("batch", cfg["encode_batch"])):
            s[f"text_encode_ms_b{b}_{tower}"] = _nan(
                txt.get("encoder", {}).get(f"{tower}_b{b}", {}).get("p50_ms")
            )
        for tag, n in (("5k", cfg["ref_small"]), ("25k", cfg["ref_large"])):
            s[f"t2i_p50_ms_{tag}_rerank100_{tower}"] = _nan(
                txt.get("t2i", {}).get(str(n), {}).get(tower, {}).get("p50_ms")
            )
    s["t2i_p50_ms_5k_rerank100_minilm"] = s["t2i_p50_ms_5k_rerank100_minilm_int8"]
    src["t2i_p50_ms_5k_rerank100_minilm"] = (
        f"text: t2i over {cfg['ref_small']} images, rerank 100, MiniLM int8 "
        "text encoder (interleaved with Bi-GRU and MiniLM fp32 on one gallery)"
    )
    s["targets"] = {}
    targets = dict(TARGETS)
    for n in txt.get("layers", []):  # the issue-14 targets, also for each cut MiniLM tower
        targets[f"text_encode_speedup_int8_l{n}_vs_bigru"] = TARGETS["text_encode_speedup_int8_vs_bigru"]
        targets[f"t2i_p50_ms_5k_rerank100_minilm_l{n}_int8"] = TARGETS["t2i_p50_ms_5k_rerank100_minilm"]
    for k, (op, v) in targets.items():
        x = s[k]
        ok = {">=": x >= v, "<=": x <= v, "<": x < v}[op] if not math.isnan(x) else None
        s["targets"][k] = {"target": f"{op} {v}", "value": x, "holds": ok}
    s["sources"] = src
    s["machine"] = res["machine"]
    s["versions"] = res["versions"]
    s["threads"] = cfg["threads"]
    s["mode"] = cfg["mode"]
    return s


def _tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _summarise_qdrant(
    res: dict[str, Any], s: dict[str, Any], src: dict[str, str], cfg: dict[str, Any]
) -> None:
    """Qdrant Edge figures: p50 at rerank 100, resident MB, ratios to the in-memory gallery, recall ratios;
    at the memory-mapped size, the ratio to the best in-process layout of the latency section."""
    mm = res.get("latency", {}).get(f"t2i_{cfg.get('ref_mmap')}_mmap", {}).get("layouts", {})
    best = min([_nan(v.get("rerank_100", {}).get("p50_ms")) for v in mm.values()] or [float("nan")])
    fp32_rss = _nan(mm.get("fp32", {}).get("resident", {}).get("rss_mb"))
    q = res.get("qdrant", {}).get("sizes", {})
    for n, row in q.items():
        tag = _tag(int(n))
        lat = row.get("latency", {})
        for name, r in lat.items():
            # a mode's ratio is to the in-memory gallery timed in its own group (the same one unless the
            # galleries were built in groups for disk space)
            mem = _nan(row.get(f"{name}_memory_p50_ms", lat.get("memory", {}).get("p50_ms")))
            s[f"qdrant_t2i_p50_ms_{tag}_rerank100_{name}"] = _nan(r.get("p50_ms"))
            s[f"qdrant_t2i_p99_ms_{tag}_rerank100_{name}"] = _nan(r.get("p99_ms"))
            s[f"qdrant_rss_mb_{tag}_{name}"] = _nan(row.get("rss_mb", {}).get(name))
            if name != "memory":
                s[f"qdrant_{name}_vs_memory_p50_{tag}"] = _nan(r.get("p50_ms")) / mem
                s[f"qdrant_{name}_vs_memory_rss_{tag}"] = _nan(row.get("rss_mb", {}).get(name)) / _nan(
                    row.get("rss_mb", {}).get("memory")
                )
        for mode in ("int8", "hnsw"):
            s[f"qdrant_{mode}_stage1_recall100_{tag}"] = _nan(row.get(f"{mode}_stage1_recall100"))
        if int(n) == cfg.get("ref_mmap"):
            for name, r in lat.items():
                if name != "memory":
                    s[f"qdrant_{name}_vs_best_inprocess_p50_{tag}"] = _nan(r.get("p50_ms")) / best
                    s[f"qdrant_{name}_vs_inprocess_fp32_rss_{tag}"] = (
                        _nan(row.get("rss_mb", {}).get(name)) / fp32_rss
                    )
        src[f"qdrant_*_{tag}"] = (
            f"qdrant {n}: t2i rerank 100, Qdrant Edge vs the in-memory gallery "
            f"({row.get('memory_layout')}) side by side; RSS of a fresh process per gallery"
        )
    for n, row in res.get("qdrant", {}).get("i2t", {}).items():
        tag = _tag(int(n))
        lat, rss = row.get("latency", {}), row.get("rss_mb", {})
        for name, r in lat.items():
            mem = _nan(row.get(f"{name}_memory_p50_ms", lat.get("memory", {}).get("p50_ms")))
            s[f"qdrant_i2t_p50_ms_{tag}_rerank100_{name}"] = _nan(r.get("p50_ms"))
            s[f"qdrant_i2t_p99_ms_{tag}_rerank100_{name}"] = _nan(r.get("p99_ms"))
            s[f"qdrant_i2t_rss_mb_{tag}_{name}"] = _nan(rss.get(name))
            if name != "memory":
                s[f"qdrant_i2t_{name}_vs_memory_p50_{tag}"] = _nan(r.get("p50_ms")) / mem
                s[f"qdrant_i2t_{name}_vs_memory_rss_{tag}"] = _nan(rss.get(name)) / _nan(rss.get("memory"))
        for mode in ("int8", "hnsw"):
            s[f"qdrant_i2t_{mode}_stage1_recall100_{tag}"] = _nan(row.get(f"{mode}_stage1_recall100"))
        src[f"qdrant_i2t_*_{tag}"] = (
            f"qdrant i2t {n}: image->text over the {row.get('n_items')} captions of {n} images, rerank 100, "
            f"Qdrant Edge vs the in-memory gallery ({row.get('memory_layout')}) side by side (groups "
            f"{row.get('groups')}); RSS of a fresh process per gallery"
        )
    srv = res.get("qdrant_server", {})
    if srv:
        cand, full = srv.get("candidates_100", {}), srv.get("search_100", {})
        for name, r in cand.items():
            s[f"qdrant_server_candidates100_p50_ms_{name}"] = _nan(r.get("p50_ms"))
        for name, r in full.items():
            s[f"qdrant_server_t2i_p50_ms_rerank100_{name}"] = _nan(r.get("p50_ms"))
        for name, w in srv.get("wire", {}).items():
            for key in ("rest_mb", "grpc_mb", "rest_parse_ms", "grpc_parse_ms"):
                s[f"qdrant_server_wire_{name}_{key}"] = _nan(w.get(key))
        s["qdrant_server_same_hits"] = bool(srv.get("same_hits"))
        src["qdrant_server_*"] = (
            f"qdrant server options on {srv.get('n')} images through qdrant-client's local mode (no server "
            "binary here): stage 1 + the 100 candidates' rerank inputs, and whole searches, side by side; "
            "wire = each option's stage-1 response as a REST body / gRPC message and qdrant-client's time "
            "to parse it"
        )
    rec = res.get("qdrant_recall", {})
    for d in ("t2i", "i2t"):
        for name, r in rec.get(d, {}).items():
            if name != "memory":
                s[f"qdrant_recall1_ratio_{name}_{d}"] = _nan(r.get("r1_ratio"))


def _f(x: Any, nd: int = 2) -> str:
    x = _nan(x)
    if math.isnan(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def markdown(res: dict[str, Any], summary: dict[str, Any], cfg: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"# MSSAN benchmark ({cfg['mode']})",
        "",
        f"{m['cpu_model']}{cpu_identity_text(m)}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{cfg['threads']} threads; "
        f"load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}; "
        "CPU pressure (PSI) at start "
        f"'{m.get('cpu_pressure_start')}', at end '{m.get('cpu_pressure_end')}'. "
        f"Model D={cfg['d']}, word {cfg['word_dim']}, Dv={cfg['dv']}, R={cfg['regions']}, "
        f"captions of {cfg['words']} words. p50 / p99 over interleaved rounds.",
        "",
        "## Headline",
        "",
        "| figure | value | target | holds |",
        "|---|---|---|---|",
    ]
    for k in SUMMARY_KEYS:
        t = summary["targets"].get(k)
        lines.append(
            f"| {k} | {_f(summary[k], 3)} | {t['target'] if t else ''} | "
            f"{'' if not t else ('yes' if t['holds'] else ('no' if t['holds'] is False else '?'))} |"
        )
    lines.append(f"| sgemm peak (numpy, GFLOP/s, p50) | {_f(summary['sgemm_gflops'], 1)} | | |")
    for k in ("twostage_ivf_speedup_vs_exhaustive_25k", "twostage_ivf_recall1_ratio_5k"):
        lines.append(f'| {k} (opt-in `stage1="faiss-ivf"`) | {_f(summary.get(k), 3)} | | |')
    sc = res.get("scorer")
    if sc:
        lines += [
            "",
            "## 1. Scorer throughput",
            "",
            "| shape | candidate | p50 ms | p99 ms | pairs/s | GFLOP/s | of sgemm peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in sc["shapes"].items():
            for c in ("onnxruntime", "torch_eager", "scan_loop"):
                if c in row:
                    x = row[c]
                    lines.append(
                        f"| {name} ({row['ni']}x{row['nt']}) | {c} | {_f(x['p50_ms'])} | {_f(x['p99_ms'])} | "
                        f"{_f(x['pairs_per_s'], 0)} | {_f(x['gflops'], 1)} | "
                        f"{_f(100 * x['fraction_of_sgemm'], 1)}% |"
                    )
            lines.append(
                f"| {name} | sgemm 2048³ | {_f(row['sgemm']['p50_ms'])} | {_f(row['sgemm']['p99_ms'])} | | "
                f"{_f(row['sgemm_gflops'], 1)} | 100% |"
            )
        lines.append("")
        lines.append(
            "FLOPs per pair (Gram form, matrix products only): "
            + ", ".join(f"{n}: {_f(r['flops_per_pair'] / 1e6, 3)} M" for n, r in sc["shapes"].items())
            + ". Max |score - PyTorch| per candidate: "
            + "; ".join(
                f"{n}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff_vs_torch"].items())
                for n, r in sc["shapes"].items()
            )
            + "."
        )
    lat = res.get("latency")
    if lat:
        depths = cfg["depths"]
        lines += [
            "",
            "## 2. End-to-end query latency (ms, p50 / p99)",
            "",
            "| query | gallery | "
            + " | ".join(f"rerank {d}" for d in depths)
            + " | exhaustive runtime | exhaustive PyTorch | rerank 100 (same rounds) | "
            "speedup vs PyTorch | peak RSS MB |",
            "|---|---|" + "---|" * (len(depths) + 5),
        ]
        for key, row in lat.items():
            f, s = row["fast"], row["slow"]
            cells = [f"{_f(f[f'rerank_{d}']['p50_ms'])} / {_f(f[f'rerank_{d}']['p99_ms'])}" for d in depths]
            ex = [
                f"{_f(s[c]['p50_ms'])} / {_f(s[c]['p99_ms'])}" if c in s else "–"
                for c in ("exhaustive_runtime", "exhaustive_torch", "rerank_100")
            ]
            gal = f"{row.get('n_items', row['n']):,} {row['gallery']}" + (
                f" ({row['dtype']} mmap)" if row["mmap"] else ""
            )
            lines.append(
                f"| {row['direction']} | {gal} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(ex)
                + f" | {_f(row.get('speedup_rerank100_vs_exhaustive_torch'), 1)}x | "
                f"{_f(row['peak_rss_mb'], 0)} |"
            )
        lines += [
            "",
            "Breakdown of rerank 100 (p50 ms): "
            + "; ".join(
                f"{k}: "
                + ", ".join(
                    f"{c} {_f(row['fast'][c]['p50_ms'])}"
                    for c in ("encode_query", "stage1_topk100", "gather_100", "rerank_step_100")
                )
                for k, row in lat.items()
            ),
        ]
        lines += [
            "",
            "Runtime settings at rerank 100, interleaved in their own group (p50 ms; default = ORT "
            "workers spin inside a run and stop at its end, candidates gathered on one thread; spin = ORT "
            "allow_spinning on (workers keep spinning after a run), nospin = workers never spin, txt1 = text "
            "encoder on 1 thread, gather2 = candidates gathered on 2 threads, blas1 = numpy stage 1 on 1 "
            "thread): "
            + "; ".join(
                f"{k}: "
                + ", ".join(
                    f"{c[11:-1]} {_f(v['p50_ms'])}"
                    for c, v in row["fast"].items()
                    if c.startswith("rerank_100[")
                )
                for k, row in lat.items()
            ),
        ]
        ivf_rows = [(k, row) for k, row in lat.items() if "ivf_options" in row]
        if ivf_rows:
            lines += [
                "",
                'Opt-in FAISS IVF stage 1 (`stage1="faiss-ivf"`; approximate candidates, exact final '
                "scores), rerank 100, p50 / p99 ms in the slow group: "
                + "; ".join(
                    f"{k} {row['ivf_options']}: {_f(row['slow'].get('rerank_100_ivf', {}).get('p50_ms'))} / "
                    f"{_f(row['slow'].get('rerank_100_ivf', {}).get('p99_ms'))}, "
                    f"{_f(row.get('speedup_rerank100_ivf_vs_exhaustive_torch'), 1)}x vs exhaustive PyTorch "
                    f"(IVF built in {_f(row['ivf_build_s'], 1)} s)"
                    for k, row in ivf_rows
                ),
            ]
    lay_rows = [(k, row) for k, row in (lat or {}).items() if "layouts" in row]
    if lay_rows:
        bw = _nan(res.get("bandwidth_gbs"))
        base = res.get("resident_bundle_only", {})
        lines += [
            "",
            "## 2b. Gallery layouts (rerank 100; one interleaved group per gallery)",
            "",
            f"Measured memory read bandwidth: {_f(bw, 1)} GB/s (float32 matrix-vector product over 1 GiB, "
            f"{cfg['threads']} threads). Resident MB: VmRSS of a fresh process holding the bundle and the "
            f"gallery in that layout after 20 searches (bundle alone: {_f(base.get('rss_mb'), 0)} MB). Bytes "
            "per query: stage-1 scan (+ the 400 over-fetched float32 rows of a compressed stage 1) + the 100 "
            "candidates' stored items + the scorer's inputs (the int8 layout's codes as stored, float32 for "
            "the others), against the no-encode p50.",
            "",
            "| query | gallery | layout | p50 / p99 ms | no encode p50 | stage 1 | gather | scorer | "
            "speedup vs "
            "exhaustive PyTorch | resident MB | MB read / query | GB/s | of bandwidth |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, row in lay_rows:
            torch_ms = _nan(row.get("slow", {}).get("exhaustive_torch", {}).get("p50_ms"))
            gal = f"{row['n_items']:,} {row['gallery']}" + (" (mmap)" if row["mmap"] else "")
            for name, x in row["layouts"].items():
                lines.append(
                    f"| {row['direction']} | {gal} | {name} | {_f(x['rerank_100']['p50_ms'])} / "
                    f"{_f(x['rerank_100']['p99_ms'])} | {_f(x['no_encode_100']['p50_ms'])} | "
                    f"{_f(x['stage1_topk100']['p50_ms'])} | {_f(x['gather_100']['p50_ms'])} | "
                    f"{_f(x['scorer_100']['p50_ms'])} | {_f(torch_ms / x['rerank_100']['p50_ms'], 1)}x | "
                    f"{_f(x.get('resident', {}).get('rss_mb'), 0)} | {_f(x['bytes']['total'] / 1e6, 1)} | "
                    f"{_f(x['gb_per_s'], 1)} | {_f(100 * _nan(x.get('fraction_of_bandwidth')), 0)}% |"
                )
        lines += [
            "",
            "Speedups in this table divide the exhaustive PyTorch p50 of the slow group by the layout "
            "group's p50 (two groups of one run); the headline int8 speedup is measured inside the "
            "slow group.",
        ]
    lines += floor_markdown(lat)
    rec = res.get("recall")
    if rec:
        lines += [
            "",
            f"## 3. Recall vs rerank depth ({rec['images']} synthetic images, {rec['captions']} captions; "
            f"{rec['queries_t2i']} caption / {rec['queries_i2t']} image queries)",
            "",
            "| depth | t2i R@1 | R@5 | R@10 | R@1 / exhaustive | i2t R@1 | R@5 | R@10 | R@1 / exhaustive |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in rec["t2i"]:
            a, b = rec["t2i"][d], rec["i2t"][d]
            label = (
                f"100, IVF stage 1 (images {rec['ivf_options']['images']}, "
                f"texts {rec['ivf_options']['texts']})"
                if d == "ivf_100"
                else d
            )
            lines.append(
                f"| {label} | {_f(a['r1'], 1)} | {_f(a['r5'], 1)} | {_f(a['r10'], 1)} | "
                f"{_f(a['r1_ratio'], 3)} | "
                f"{_f(b['r1'], 1)} | {_f(b['r5'], 1)} | {_f(b['r10'], 1)} | {_f(b['r1_ratio'], 3)} |"
            )
        s1 = rec["t2i"].get("0", {}), rec["i2t"].get("0", {})
        if "r100" in s1[0] and "r100" in s1[1]:
            lines += [
                "",
                f"Stage 1 alone (depth 0) R@100: t2i {_f(s1[0]['r100'], 1)}, i2t {_f(s1[1]['r100'], 1)} "
                "(a right answer among the candidates of rerank 100).",
            ]
        lays = [d for d in rec["t2i"] if d.startswith("layout_")]
        if lays:
            lines += [
                "",
                "Layouts at rerank 100, against the fp32 layout at rerank 100 (ratios of R@1 / R@5 / R@10; "
                "largest |final score - fp32 final score| of a returned hit):",
                "",
                "| layout | t2i ratios | t2i score error | i2t ratios | i2t score error |",
                "|---|---|---|---|---|",
            ]
            for d in lays:
                a, b = rec["t2i"][d], rec["i2t"][d]
                lines.append(
                    f"| {d[7:]} | "
                    f"{' / '.join(_f(a[f'{r}_ratio_vs_fp32'], 3) for r in ('r1', 'r5', 'r10'))} | "
                    f"{a['score_err_max']:.1e} | "
                    f"{' / '.join(_f(b[f'{r}_ratio_vs_fp32'], 3) for r in ('r1', 'r5', 'r10'))} | "
                    f"{b['score_err_max']:.1e} |"
                )
        tr = res.get("train", {})
        lines += ["", f"Checkpoint: {json.dumps(tr)}"]
    enc = res.get("encode")
    if enc:
        t = enc["timings"]
        lines += ["", "## 4. Encoding", "", "| what | p50 ms | p99 ms | throughput |", "|---|---|---|---|"]
        for k, v in t.items():
            n = enc["batch"] if not k.endswith("_b1") else 1
            unit = "images/s" if k.startswith("images") else "captions/s"
            lines.append(
                f"| {k} | {_f(v['p50_ms'])} | {_f(v['p99_ms'])} | {_f(n / v['p50_ms'] * 1e3, 1)} {unit} |"
            )
        if lat:
            lines += ["", "| gallery | locals | peak RSS MB (after load + searches) |", "|---|---|---|"]
            for key, row in lat.items():
                lines.append(
                    f"| {row['direction']} {row['n']:,} {row['gallery']} | {row['dtype']}"
                    f"{' mmap' if row['mmap'] else ' RAM'} | {_f(row['peak_rss_mb'], 0)} |"
                )
    txt = res.get("text")
    if txt:
        b = txt["batch"]
        lines += [
            "",
            f"## 5. Text towers ({txt['words']}-word query; tokens per query {txt['tokens_per_query']}; "
            f"MiniLM text encoder {_f(txt['fp32_file_mb'], 1)} MB fp32, "
            f"{_f(txt['int8_file_mb'], 1)} MB int8)",
            "",
            "| tower | encoder b1 p50 / p99 ms | encoder b"
            + str(b)
            + " p50 ms | tokenize b1 ms | "
            + " | ".join(f"t2i {int(n):,} rerank 100 p50 / p99 ms" for n in txt["t2i"])
            + " |",
            "|---|---|---|---|" + "---|" * len(txt["t2i"]),
        ]
        for tower in txt.get("towers", TEXT_TOWERS):
            e = txt["encoder"]
            cells = [f"{_f(v[tower]['p50_ms'])} / {_f(v[tower]['p99_ms'])}" for v in txt["t2i"].values()]
            lines.append(
                f"| {tower} | {_f(e[f'{tower}_b1']['p50_ms'])} / {_f(e[f'{tower}_b1']['p99_ms'])} | "
                f"{_f(e[f'{tower}_b{b}']['p50_ms'])} | {_f(txt['tokenize_b1'][tower]['p50_ms'], 3)} | "
                + " | ".join(cells)
                + " |"
            )
        for tower, prod in txt.get("int8_products", {}).items():
            p = txt["encoder"][f"{tower}_products_b1"]
            lines += [
                "",
                f"{tower}: its {prod['count']} weight products alone (a graph of only those MatMuls, "
                f"{prod['rows']} rows each, int8 like the encoder), in the same rounds: {_f(p['p50_ms'])} / "
                f"{_f(p['p99_ms'])} ms, so no fusion of the rest can make that encoder more than "
                f"{_f(txt[f'speedup_bound_{tower}_products_vs_bigru_b1'])}x the Bi-GRU here.",
            ]
    lines += _qdrant_markdown(res)
    lines += ["", "Notes: " + " ".join(cfg.get("notes", []))]
    return "\n".join(lines) + "\n"


def _qdrant_markdown(res: dict[str, Any]) -> list[str]:
    qd = res.get("qdrant", {})
    if not qd.get("sizes") and not qd.get("i2t"):
        return []
    lines = [
        "",
        "## 6. Galleries in Qdrant Edge (rerank 100, side by side)",
        "",
        "| direction | gallery size | gallery | p50 ms | p99 ms | x in-memory p50 | RSS MB | "
        "x in-memory RSS | disk MB | fill s | stage-1 recall@100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for direction, key in (("text->image", "sizes"), ("image->text", "i2t")):
        for n, row in qd.get(key, {}).items():
            lat, rss, disk = row["latency"], row.get("rss_mb", {}), row.get("disk_mb", {})
            mem_rss = _nan(rss.get("memory"))
            size = f"{int(n):,} images" + (f" ({int(row['n_items']):,} captions)" if key == "i2t" else "")
            for name, r in lat.items():
                mem_p50 = _nan(row.get(f"{name}_memory_p50_ms", lat["memory"]["p50_ms"]))
                label = (
                    f"in-memory ({row.get('memory_layout')})" if name == "memory" else f"Qdrant Edge {name}"
                )
                disk_key = "index" if name == "memory" else name
                lines.append(
                    f"| {direction} | {size} | {label} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                    f"{_f(_nan(r['p50_ms']) / mem_p50)} | "
                    f"{_f(rss.get(name), 0)} | {_f(_nan(rss.get(name)) / mem_rss)} | "
                    f"{_f(disk.get(disk_key), 0)} | "
                    f"{_f(row.get(f'{name}_fill_s' if name != 'memory' else 'memory_fill_s'), 0)} | "
                    f"{_f(row.get(f'{name}_stage1_recall100'), 3)} |"
                )
            groups = row.get("groups", [])
            for gi, group in enumerate(groups[1:], 1):  # the in-memory gallery as timed beside each group
                by = row.get("memory_latency_by_group", [])
                r = by[gi] if gi < len(by) else {"p50_ms": row.get(f"{group[0]}_memory_p50_ms")}
                lines.append(
                    f"| {direction} | {size} | in-memory, timed beside {', '.join(group)} | "
                    f"{_f(r.get('p50_ms'))} | {_f(r.get('p99_ms'))} | 1.00 | | | | | |"
                )
            if len(groups) > 1:
                lines.append(
                    f"| | | (built and timed in groups {groups} for disk space; the first in-memory row was "
                    "timed beside the first group; each ratio is to the in-memory gallery timed in its "
                    "group) | | | | | | | | |"
                )
    lines += _qdrant_server_markdown(res.get("qdrant_server", {}))
    rec = res.get("qdrant_recall", {})
    if rec:
        lines += [
            "",
            "Recall through Qdrant Edge galleries (trained model, rerank 100): R@1 / ratio to in-memory",
            "",
            "| gallery | t2i R@1 | t2i ratio | i2t R@1 | i2t ratio |",
            "|---|---|---|---|---|",
        ]
        for name in rec.get("t2i", {}):
            a, b = rec["t2i"][name], rec["i2t"][name]
            lines.append(
                f"| {name} | {_f(a['r1'], 1)} | {_f(a['r1_ratio'], 3)} | {_f(b['r1'], 1)} | "
                f"{_f(b['r1_ratio'], 3)} |"
            )
    return lines


def _qdrant_server_markdown(srv: dict[str, Any]) -> list[str]:
    """The server options (bench.qdrant_server) as a table."""
    if not srv:
        return []
    cand, full, wire = srv.get("candidates_100", {}), srv.get("search_100", {}), srv.get("wire", {})
    lines = [
        "",
        f"Qdrant server options, {srv.get('n'):,} images, float32 locals, through qdrant-client's local mode "
        "(no server binary here): stage 1 + the 100 candidates' rerank inputs, a whole text->image search "
        "at rerank 100, and each option's stage-1 response as a server would send it (size; qdrant-client's "
        "parse time); same hits everywhere: " + str(srv.get("same_hits")),
        "",
        "| option | stage 1 + candidates p50 ms | search p50 ms | REST MB | REST parse ms | gRPC MB | "
        "gRPC parse ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("memory", "multivector", "payload", "cache", "cache_miss", "stage1_only"):
        if name not in cand:
            continue
        w = wire.get(name, wire.get("cache_miss_fetch", {}) if name == "cache_miss" else {})
        lines.append(
            f"| {name} | {_f(cand[name]['p50_ms'])} | {_f(full.get(name, {}).get('p50_ms'))} | "
            f"{_f(w.get('rest_mb'))} | {_f(w.get('rest_parse_ms'))} | {_f(w.get('grpc_mb'))} | "
            f"{_f(w.get('grpc_parse_ms'))} |"
        )
    return lines


def figures(res: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The plots as matplotlib figures, ``{file name: Figure}``: ``recall_latency_vs_depth.png`` (recall
    and latency by rerank depth) and ``scorer.png`` (scorer throughput), each with a title, axis labels
    with units and words for the result keys (``bench.labels``). The caller closes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")  # log axes: 20, not 2x10^1
    out: dict[str, Any] = {}
    rec, lat = res.get("recall"), res.get("latency")
    if rec or lat:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
        if rec:
            depths = [d for d in rec["t2i"] if d.isdigit()]
            xs = [int(d) for d in depths]
            for direction, style in (("t2i", "-o"), ("i2t", "-s")):
                words = DIRECTIONS[direction]
                ys = [rec[direction][d]["r1"] for d in depths]
                axes[0].plot(xs, ys, style, label=f"{words}, two-stage")
                colour = axes[0].lines[-1].get_color()
                axes[0].axhline(
                    rec[direction]["exhaustive"]["r1"],
                    ls="--",
                    lw=0.8,
                    color=colour,
                    label=f"{words}, exhaustive",
                )
                if "ivf_100" in rec[direction]:
                    axes[0].plot(
                        [100],
                        [rec[direction]["ivf_100"]["r1"]],
                        "x",
                        ms=9,
                        color=colour,
                        label=f"{words}, FAISS IVF stage 1 (rerank 100)",
                    )
            axes[0].set_xlabel("rerank depth (stage-1 candidates rescored)")
            axes[0].set_ylabel("R@1 (%)")
            axes[0].set_title(
                f"Recall@1 vs rerank depth\n({count(rec['images'])} synthetic images, "
                f"{count(rec.get('captions') or 5 * rec['images'])} captions)"
            )
            axes[0].legend(fontsize=7)
        if lat:
            for key, row in lat.items():
                ds = [d for d in cfg["depths"]]
                axes[1].plot(
                    ds,
                    [row["fast"][f"rerank_{d}"]["p50_ms"] for d in ds],
                    "-o",
                    label=gallery_label(key, row),
                )
            axes[1].set_yscale("log")
            axes[1].yaxis.set_major_formatter(plain)
            axes[1].yaxis.set_minor_formatter(plain)
            axes[1].set_xlabel("rerank depth (stage-1 candidates rescored)")
            axes[1].set_ylabel("p50 latency per query (ms, log scale)")
            axes[1].set_title("End-to-end query latency vs rerank depth\n(encode + stage 1 + rerank, p50)")
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        out["recall_latency_vs_depth.png"] = fig
    sc = res.get("scorer")
    if sc:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
        names = list(sc["shapes"])
        cands = ("onnxruntime", "torch_eager", "scan_loop")
        w = 0.25
        for i, c in enumerate(cands):
            ax.bar(
                [j + i * w for j in range(len(names))],
                [sc["shapes"][n].get(c, {}).get("pairs_per_s", 0.0) for n in names],
                w,
                label=candidate_label(c),
            )
        ax.set_xticks(
            [j + w for j in range(len(names))],
            [scorer_shape_label(n, sc["shapes"][n]) for n in names],
            fontsize=8,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("scorer call (queries × candidates)")
        ax.set_ylabel("image–caption pairs per second (p50, log scale)")
        ax.set_title("Cross-attention scorer throughput")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["scorer.png"] = fig
    fl = floor_figure(lat, res.get("machine", {}), int(cfg.get("threads", 0)))
    if fl is not None:
        out["floor.png"] = fl
    return out


def plots(res: dict[str, Any], cfg: dict[str, Any], out: Path) -> list[str]:
    """Write ``figures(res, cfg)`` as PNG files into ``out``; returns their names."""
    figs = figures(res, cfg)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figs.items():
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)
    return written


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, so the files are strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results(
    res: dict[str, Any], cfg: dict[str, Any], out: Path, with_plots: bool = True
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(res, cfg)
    (out / "results.json").write_text(
        json.dumps(_json_safe({"config": cfg, "results": res}), indent=1, default=str, allow_nan=False)
    )
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, default=str, allow_nan=False))
    md = markdown(res, summary, cfg)
    (out / "results.md").write_text(md, encoding="utf-8")
    if with_plots:
        plots(res, cfg, out)
    return summary
