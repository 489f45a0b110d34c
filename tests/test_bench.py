"""Smoke test of the benchmark machinery (`python -m bench --quick`) at toy sizes.

Checks that every section runs and writes its files, and that the headline
figures exist and are numbers. Nothing here is timed: benchmark targets are
never test assertions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.report import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[1]
TOY = {
    "d": 32,
    "word_dim": 16,
    "dv": 24,
    "scorer_k": 20,
    "shard": 8,
    "scorer_repeats": 2,
    "loop_max_pairs": 64,
    "t2i_sizes": [200, 400],
    "i2t_sizes": [200],
    "mmap_sizes": [300],
    "ivf_sizes": [400],
    "exhaustive_max": 1000,
    "i2t_mmap_sizes": [],
    "layout_sizes": [200, 400, 300],
    "i2t_layout_sizes": [200],
    "ref_mmap": 300,
    "depths": [0, 10, 100],
    "repeats_fast": 2,
    "repeats_slow": 2,
    "own_processes": 1,
    "own_queries": 3,
    "pool": 32,
    "queries": 4,
    "train_images": 100,
    "epochs": 1,
    "train_max_steps": 2,
    "train_model_overrides": {"embed_size": 32, "word_dim": 16, "text_encoder": "bigru"},  # the fast tower
    "recall_images": 40,
    "recall_queries": 10,
    "encode_batch": 4,
    "encode_repeats": 2,
    "ref_small": 200,
    "ref_large": 400,
    "max_seconds": 5.0,
    "text_sizes": [200],
    "text_repeats": 2,
    "text_layers": [1],
}


def test_quick_bench_writes_results_with_numeric_headline_figures(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--keep-openblas-env",
        "--threads",
        "1",
        "--out",
        str(out),
        "--work",
        str(work),
    ]
    for k, v in {**TOY, "text_model": str(tiny_bert_folder)}.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["cpu_model"]
    assert set(summary["machine"].get("cpu_isa", [])) <= {
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_int8",
    }
    assert {"numpy", "torch", "onnxruntime"} <= set(summary["versions"])
    results = json.loads((out / "results.json").read_text())["results"]
    assert {"scorer", "latency", "recall", "encode", "text"} <= set(results)
    assert "t2i_300_mmap" in results["latency"]
    for key in ("t2i_400", "t2i_300_mmap", "i2t_200"):  # every gallery size in the three layouts
        lay = results["latency"][key]["layouts"]
        assert set(lay) == {"fp32", "int8-stage1", "int8"}
        assert all(x["resident"]["rss_mb"] > 0 and x["bytes"]["total"] > 0 for x in lay.values())
    assert "## 2b. Gallery layouts" in proc.stdout
    for d in ("t2i", "i2t"):
        assert (
            0 <= results["recall"][d]["layout_int8"]["r1_ratio_vs_fp32"]
            or summary["twostage_recall1_ratio_5k_int8"] is None
        )
    assert set(results["text"]["t2i"]["200"]) == {"bigru", "minilm_fp32", "minilm_int8", "minilm_l1_int8"}
    assert (
        math.isfinite(summary["text_encode_speedup_int8_l1_vs_bigru"]) and "| minilm_l1_int8 |" in proc.stdout
    )
    assert "## 5. Text towers" in proc.stdout
    prods = results["text"]["int8_products"]
    assert set(prods) == {"minilm_int8", "minilm_l1_int8"} and "weight products alone" in proc.stdout
    assert prods["minilm_l1_int8"]["count"] < prods["minilm_int8"]["count"]  # fewer layers, fewer products
    assert math.isfinite(summary["text_encode_speedup_bound_int8_vs_bigru"])
    assert math.isfinite(summary["text_encode_speedup_bound_int8_l1_vs_bigru"])
    ivf_row = results["latency"]["t2i_400"]
    assert ivf_row["ivf_options"]["nprobe"] >= 1 and "rerank_100_ivf" in ivf_row["slow"]
    assert math.isfinite(summary["twostage_ivf_speedup_vs_exhaustive_25k"])
    assert 0 <= summary["twostage_ivf_recall1_ratio_5k"] or math.isnan(
        summary["twostage_ivf_recall1_ratio_5k"]
    )
    assert "ivf_100" in results["recall"]["t2i"] and "IVF stage 1" in proc.stdout
    for d in ("t2i", "i2t"):  # stage 1 alone reports how many right answers a rerank of 100 can see
        row = results["recall"][d]["0"]
        assert row["r10"] <= row["r100"] == summary[f"stage1_recall100_5k_{d}"] <= 100
    assert results["recall"]["t2i"]["0"]["r100"] == 100  # 40 images: the top 100 is the whole gallery
    for name in ("results.md", "recall_latency_vs_depth.png", "scorer.png", "floor.png"):
        assert (out / name).stat().st_size > 0
    assert "## 1. Scorer throughput" in proc.stdout
    # the latency section runs the default tower (the transformer cut to 2 layers) and shows the floor
    assert results["latency_tower"]["text_layers"] == 2
    for key in ("t2i_400", "t2i_300_mmap", "i2t_200"):
        paths = results["latency"][key]["floor"]["paths"]
        assert set(paths) == {"fp32", "int8"} and paths["int8"]["layout"] == "int8"
        for x in paths.values():
            assert x["cold_ms"] == x["cold_ms"] and x["steps"]["scorer"]["in_query_ms"] > 0  # traced queries
            assert x["floor_ms"] > 0 and set(x["steps"]) == {
                "encode",
                "stage1",
                "gather",
                "scorer",
                "non_kernel",
            }
    assert results["latency"]["t2i_400"]["floor"]["int8_text_encoder"] is True
    # end to end in a process of each path's own; the section's own process beside it
    own = results["latency"]["t2i_300_mmap"]["floor"]["paths"]["int8"]["own_process"]
    assert len(own["processes"]) == 1 and own["inside"]["scorer"] > 0
    assert summary["t2i_p50_ms_5k_rerank100_int8"] == own_p50(results, "t2i_200")
    assert math.isfinite(summary["t2i_p50_ms_5k_rerank100_int8_shared"])
    assert math.isfinite(summary["twostage_speedup_vs_exhaustive_25k_int8_shared"])
    assert "## 2c. The floor of a query" in proc.stdout


def test_the_report_names_the_cpu_extensions_int8_kernels_depend_on() -> None:
    from bench.timing import cpu_identity_text

    zen2 = {"cpu_family_model": "family 23 model 49", "cpu_isa": ["avx2", "fma"]}
    assert cpu_identity_text(zen2) == " (family 23 model 49; AVX2, FMA; no AVX-512, no VNNI)"
    zen4 = {"cpu_family_model": "family 25 model 17", "cpu_isa": ["avx2", "fma", "avx512f", "avx512_vnni"]}
    assert cpu_identity_text(zen4) == " (family 25 model 17; AVX2, FMA, AVX512F, AVX512-VNNI)"
    assert cpu_identity_text({"cpu_family_model": "", "cpu_isa": []}) == (
        " (none of the listed extensions; no AVX-512, no VNNI)"
    )
    assert cpu_identity_text({"cpu_model": "AMD EPYC"}) == ""  # a run recorded before the extensions were


def test_cpu_identity_reads_the_first_processor_and_leaves_unknown_extensions_out(tmp_path: Path) -> None:
    from bench.timing import cpu_identity

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\n"
        "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\nflags\t\t: fpu avx2\n"
    )
    assert cpu_identity(str(x86)) == {
        "cpu_family_model": "family 25 model 17",
        "cpu_isa": ["avx2", "fma", "avx512f", "avx512_vnni"],
    }
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_identity(str(arm)) == {"cpu_family_model": ""}  # unknown: no "no AVX-512" claimed
    assert cpu_identity(str(tmp_path / "missing")) == {"cpu_family_model": ""}


def test_side_by_side_interleaves_blocks_with_an_untimed_settling_call() -> None:
    from bench.timing import side_by_side

    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b")}
    res = side_by_side(fns, repeats=2, warmup=1, block={"a": 3})
    # warm-up a b | round 0: a (settle) a a a, b | round 1 (rotated): b, a (settle) a a a
    assert calls == ["a", "b"] + ["a"] * 4 + ["b"] + ["b"] + ["a"] * 4
    assert res["a"]["n"] == 6 and res["b"]["n"] == 2


def test_plots_have_titles_axis_labels_with_units_and_words_not_result_keys() -> None:
    """The plots of the committed run, drawn again: every axis has a title and labelled axes (units in
    parentheses), and no legend entry or tick label is a raw result key (``t2i_5000``, ``torch_eager``)."""
    import matplotlib.pyplot as plt

    from bench.labels import looks_like_a_key
    from bench.report import figures

    committed = json.loads((ROOT / "bench" / "results" / "results.json").read_text())
    figs = figures(committed["results"], committed["config"])
    assert {"recall_latency_vs_depth.png", "scorer.png"} <= set(figs)
    try:
        for name, fig in figs.items():
            for ax in fig.axes:
                title, x, y = ax.get_title(), ax.get_xlabel(), ax.get_ylabel()
                assert title and x and y, (name, title, x, y)
                assert "(" in y and ")" in y, (name, y)  # a unit: (%), (ms, ...), (p50, ...)
                words = [t.get_text() for t in ax.get_legend().get_texts()]
                words += [t.get_text() for t in ax.get_xticklabels()] + [title, x, y]
                assert words and not [w for w in words if looks_like_a_key(w)], (name, words)
        latency = [t.get_text() for t in figs["recall_latency_vs_depth.png"].axes[1].get_legend().get_texts()]
        assert "text→image, 5K images" in latency and "image→text, 25K captions (5K images)" in latency
        assert "text→image, 100K images (memory-mapped)" in latency
        ticks = [t.get_text() for t in figs["scorer.png"].axes[0].get_xticklabels()]
        assert ticks == ["1 caption × 100 images", "1 image × 100 captions", "128 images × 128 captions"]
    finally:
        for fig in figs.values():
            plt.close(fig)
    assert looks_like_a_key("t2i_5000") and looks_like_a_key("torch_eager") and looks_like_a_key("t2i R@1")


def own_p50(results: dict[str, Any], key: str, path: str = "int8") -> float:
    return float(results["latency"][key]["floor"]["paths"][path]["own_process"]["p50_ms"])


def _floor_fixture() -> tuple[dict[str, object], dict[str, object]]:
    """A latency section's floor rows made from made-up timings (no timing here)."""
    from bench.floor import floor_row

    bw = {"gemv_gbs": 10.0, "sum_gbs": 20.0, "gbs": 20.0}
    lat: dict[str, object] = {}
    for key, direction, n, mmap in (("t2i_5000", "t2i", 5000, False), ("i2t_5000", "i2t", 5000, False)):
        paths = {}
        for p, e2e in (("fp32", 6.0), ("int8", 3.0)):
            t = {"e2e": e2e, "encode": 1.5, "encoder_graph": 1.0, "stage1": 1.0, "gather": 0.5, "scorer": 0.6}
            row = floor_row(
                {**t, "kernel": 0.2}, e2e + 1, {"stage1": 2e7, "gather": 4e6, "scorer": 4e6}, 1e8, 20.0
            )
            row.update({"layout": p, "n": n})
            paths[p] = row
        lat[key] = {
            "n": n,
            "n_items": 5 * n if direction == "i2t" else n,
            "direction": direction,
            "mmap": mmap,
            "layouts": {p: {"rerank_100": {"p50_ms": v}} for p, v in (("fp32", 6.0), ("int8", 4.5))},
            "floor": {"bandwidth": bw, "paths": paths},
        }
    return lat, {"ref_small": 5000, "ref_large": 25000, "ref_mmap": 100000}


def test_floor_arithmetic_and_its_table_and_plot() -> None:
    """The floor of each step from bytes, FLOPs and bandwidth, and what the summary, table and plot make
    of it (made-up timings; nothing is timed)."""
    import matplotlib.pyplot as plt

    from bench.floor import (
        add_own_process,
        candidate_bytes,
        floor_figure,
        floor_markdown,
        floor_row,
        scorer_flops,
        stage1_bytes,
        summarise_floor,
    )
    from bench.labels import looks_like_a_key
    from mssan_infer.gallery.base import Candidates
    from mssan_infer.gallery.storage import LAYOUTS

    # stage 1 reads every stored row; a compressed one also the over-fetched float32 rows it rescores
    assert stage1_bytes(LAYOUTS["fp32"], 5000, 2048) == 5000 * 2048 * 4
    assert stage1_bytes(LAYOUTS["int8"], 5000, 2048, k=100, overfetch=4) == 5000 * 2048 + 400 * 2048 * 4
    assert stage1_bytes(LAYOUTS["int8"], 50, 8, k=100) == 50 * 8  # the whole gallery: no rescoring pass
    c = Candidates(
        np.zeros((100, 36, 1024), np.uint8),
        np.zeros((100, 36), np.float32),
        np.ones((100, 36), np.float32),
        np.zeros((100, 36, 36), np.float16),
    )
    assert candidate_bytes(c) == 100 * 36 * (1024 + 4 + 4 + 36 * 2)
    assert scorer_flops(100, 36, 12, 1024) == 2 * 100 * 36 * 12 * 1024

    p50 = {"e2e": 5.0, "encode": 1.2, "encoder_graph": 1.0, "stage1": 1.5, "gather": 0.4, "scorer": 0.9}
    # scorer: the kernel (0.3 ms) beats its bytes (4e6 B at 20 GB/s = 0.2 ms): compute-bound
    row = floor_row({**p50, "kernel": 0.3}, 7.0, {"stage1": 2e7, "gather": 2e6, "scorer": 4e6}, 9e7, 20.0)
    st = row["steps"]
    assert st["encode"]["floor_ms"] == 1.0
    assert math.isclose(st["stage1"]["floor_ms"], 1.0) and math.isclose(st["gather"]["floor_ms"], 0.1)
    assert st["scorer"]["floor_ms"] == 0.3 and st["scorer"]["floor_is"] == "kernel FLOPs"
    assert math.isclose(st["scorer"]["kernel_gflops"], 9e7 / 0.3e-3 / 1e9)
    assert math.isclose(st["non_kernel"]["p50_ms"], 5.0 - (1.2 + 1.5 + 0.4 + 0.9))
    assert math.isclose(row["floor_ms"], 1.0 + 1.0 + 0.1 + 0.3)
    assert math.isclose(row["floor_ratio"], 5.0 / 2.4) and row["e2e_p99_ms"] == 7.0
    # timed inside traced queries: the rest is what the trace left between the steps, cold what the steps
    # took beyond their time alone
    inside = {"encode": 1.5, "stage1": 2.0, "gather": 0.5, "scorer": 1.0, "non_kernel": 0.2, "total": 5.2}
    traced = floor_row(
        {**p50, "kernel": 0.3}, 7.0, {"stage1": 2e7, "gather": 2e6, "scorer": 4e6}, 9e7, 20.0, inside=inside
    )
    assert traced["steps"]["non_kernel"]["p50_ms"] == 0.2 and traced["steps"]["stage1"]["in_query_ms"] == 2.0
    assert math.isclose(traced["cold_ms"], (1.5 + 2.0 + 0.5 + 1.0) - (1.2 + 1.5 + 0.4 + 0.9))
    assert traced["steps"]["stage1"]["p50_ms"] == 1.5 and traced["floor_ratio"] == row["floor_ratio"]
    assert "2.00 (1.50) / 1.00" in "\n".join(
        floor_markdown(
            {
                "t2i_5000": {
                    "n": 5000,
                    "direction": "t2i",
                    "floor": {
                        "bandwidth": {"gbs": 20.0, "gemv_gbs": 10.0, "sum_gbs": 20.0},
                        "paths": {"int8": traced},
                    },
                }
            }
        )
    )
    # a slower bandwidth makes the scorer memory-bound: its floor is then its bytes / bandwidth
    slow = floor_row({**p50, "kernel": 0.3}, 7.0, {"stage1": 2e7, "gather": 2e6, "scorer": 4e6}, 9e7, 4.0)
    assert (
        math.isclose(slow["steps"]["scorer"]["floor_ms"], 1.0)
        and slow["steps"]["scorer"]["floor_is"] == "bytes read"
    )

    # the exact path: the gather multiplies each row by the query (the big product), so its floor is the
    # larger of the kernel and its bytes; the scorer reads only the small similarities, masks and Grams
    exact = floor_row(
        {**p50, "kernel": 0.3},
        7.0,
        {"stage1": 2e7, "gather": 2e6, "scorer": 4e5},
        9e7,
        20.0,
        product_in_gather=True,
    )
    st = exact["steps"]
    assert st["gather"]["floor_ms"] == 0.3 and st["gather"]["floor_is"] == "kernel FLOPs"
    assert math.isclose(st["gather"]["bytes_ms"], 0.1) and math.isclose(st["gather"]["kernel_gflops"], 300.0)
    assert math.isclose(st["scorer"]["floor_ms"], 0.02) and st["scorer"]["floor_is"] == "bytes read"
    assert "kernel_ms" not in st["scorer"] and math.isclose(exact["floor_ms"], 1.0 + 1.0 + 0.3 + 0.02)
    sim = Candidates(None, None, np.ones((100, 36), np.float32), np.zeros((100, 36, 36), np.float32))
    sim = dataclasses.replace(sim, similarity=np.zeros((100, 36, 12), np.float32))
    assert candidate_bytes(sim) == 100 * 36 * (4 + 36 * 4 + 12 * 4)

    # a path's own processes replace the end to end and the steps inside the query; the shared stay beside
    own_row = floor_row(
        {**p50, "kernel": 0.3}, 7.0, {"stage1": 2e7, "gather": 2e6, "scorer": 4e6}, 9e7, 20.0, inside=inside
    )
    own_inside = {
        "encode": 1.3,
        "stage1": 1.6,
        "gather": 0.45,
        "scorer": 0.95,
        "non_kernel": 0.1,
        "total": 4.4,
    }
    add_own_process(own_row, {"p50_ms": 4.2, "p99_ms": 5.0, "inside": own_inside, "processes": []})
    assert own_row["e2e_p50_ms"] == 4.2 and own_row["e2e_p50_ms_shared"] == 5.0
    assert (
        math.isclose(own_row["floor_ratio"], 4.2 / 2.4)
        and own_row["floor_ratio_shared"] == traced["floor_ratio"]
    )
    assert (
        own_row["steps"]["stage1"]["in_query_ms"] == 1.6 and own_row["steps"]["stage1"]["in_shared_ms"] == 2.0
    )
    assert own_row["steps"]["non_kernel"]["p50_ms"] == 0.1
    assert math.isclose(own_row["cold_ms"], (1.3 + 1.6 + 0.45 + 0.95) - (1.2 + 1.5 + 0.4 + 0.9))

    lat, cfg = _floor_fixture()
    s, src = summarise_floor(lat, cfg)
    assert "t2i_p50_ms_5k_rerank100_int8_shared" not in s  # no own processes in the fixture
    assert math.isclose(
        s["floor_ratio_t2i_5k_int8"], 3.0 / lat["t2i_5000"]["floor"]["paths"]["int8"]["floor_ms"]
    )
    assert s["t2i_p50_ms_5k_rerank100_int8"] == 3.0 and s["i2t_p50_ms_5k_rerank100_int8"] == 3.0
    assert s["int8_vs_fp32_p50_5k"] == 0.75 and s["fastpath_vs_default_p50_5k"] == 0.5
    assert math.isnan(s["floor_ratio_t2i_25k_int8"]) and math.isnan(s["t2i_p50_ms_100k_rerank100_int8"])
    assert "floor_ratio_t2i_5k_*" in src
    lat["t2i_5000"]["floor"]["paths"]["int8"] = own_row  # type: ignore[index]
    s, _ = summarise_floor(lat, cfg)
    assert s["t2i_p50_ms_5k_rerank100_int8"] == 4.2 and s["t2i_p50_ms_5k_rerank100_int8_shared"] == 5.0
    assert s["floor_ratio_t2i_5k_int8"] == own_row["floor_ratio"]
    assert s["floor_ratio_t2i_5k_int8_shared"] == own_row["floor_ratio_shared"]
    md = "\n".join(floor_markdown(lat))
    assert "| 4.20 / 5.00 | 5.00 |" in md  # own processes' p50 / p99, then the shared process's p50
    assert "## 2c. The floor of a query" in md and "| text→image | 5K images | int8 |" in md
    assert "| image→text | 25K captions (5K images) | fp32 |" in md
    assert floor_markdown({}) == [] and floor_figure({}, {}, 2) is None
    fig = floor_figure(lat, {"cpu_model": "AMD EPYC"}, 2)
    try:
        assert len(fig.axes) == 2
        for ax in fig.axes:
            title, x, y = ax.get_title(), ax.get_xlabel(), ax.get_ylabel()
            assert "AMD EPYC" in title and x and "(ms)" in y
            words = [t.get_text() for t in ax.get_legend().get_texts()] + [
                t.get_text() for t in ax.get_xticklabels()
            ]
            assert words and not [w for w in words + [title, x, y] if looks_like_a_key(w)], words
            assert any("int8 layout" in w for w in words) and any("fp32 layout" in w for w in words)
    finally:
        plt.close(fig)


def test_query_path_times_one_path_per_process_with_each_ort_setting(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """``bench.query_path``'s child: one path's queries timed after a warm-up, under each ORT setting it
    offers; an unknown setting is refused in the flags' words. Nothing asserts how fast anything is."""
    from bench.floor import IN_QUERY
    from bench.query_path import SETTINGS, _child, _gallery, main, own_process
    from mssan_infer import Retriever

    r = Retriever.load(tiny_bundle)
    dv = r.bundle.manifest.img_dim
    r.add_images(np.abs(np.random.default_rng(0).normal(size=(40, 3, dv))).astype(np.float32))
    r.add_texts([f"a red dog number {i}" for i in range(40)])
    r.save(tmp_path / "index")
    for setting in SETTINGS:
        res = _child(tiny_bundle, tmp_path / "none.onnx", tmp_path / "index", "exact", 5, 1, setting)
        assert (
            set(res) == {"runtime", "p50_ms", "p90_ms", "p99_ms", "inside"}
            and 0 < res["p50_ms"] <= res["p99_ms"]
        )
        assert set(res["inside"]) == set(IN_QUERY) and res["inside"]["scorer"] > 0  # traced queries
    res = _child(
        tiny_bundle, tmp_path / "none.onnx", tmp_path / "index", "exact", 5, 1, "default", True, True
    )
    assert 0 < res["p50_ms"] <= res["p99_ms"]  # image queries over captions, memory-mapped
    own = own_process(tiny_bundle, None, tmp_path / "index", "exact", processes=2, queries=3, threads=1)
    assert len(own["processes"]) == 2 and own["p50_ms"] > 0 and own["inside"]["encode"] > 0
    from bench.query_path import ROOT

    assert own["processes"][0]["runtime"] == str(ROOT / "mssan_infer")
    # --before: processes run with the code of another checkout (a copy of the runtime here)
    import shutil

    other = tmp_path / "before"
    shutil.copytree(ROOT / "mssan_infer", other / "mssan_infer")
    shutil.copytree(ROOT / "bench", other / "bench")
    kw: dict[str, Any] = {"processes": 1, "queries": 3, "threads": 1}
    got = own_process(tiny_bundle, None, tmp_path / "index", "exact", code=other, **kw)
    assert got["processes"][0]["runtime"] == str((other / "mssan_infer").resolve()) and got["p50_ms"] > 0
    assert _gallery(tmp_path, "i2t:5000", "b", "fast")[:3] == (
        "i2t_5000",
        tmp_path / "gallery-texts-25000-float32-b",
        True,
    )
    assert _gallery(tmp_path, "t2i:9:mmap", "b", "fast")[1].name.endswith("-int8")
    for bad in (["--settings", "default,warp"], ["--galleries", "i2t:5:mmap"], ["--before", str(tmp_path)]):
        with pytest.raises(SystemExit):
            main(bad)


def test_gather_bench_times_the_runtime_gather_beside_its_per_row_reference(tmp_path: Path) -> None:
    """``bench.gather``: the per-row reference returns what the runtime's gather returns (so the two are
    compared on the same work), in row and stage-1 order, and the run reports each gallery kind's figures
    for one and two threads. Nothing asserts how fast anything is."""
    from bench.gather import KINDS, galleries, main, per_row

    views = galleries(130, tmp_path / "spill", batch=32)
    assert {k: len(v.blocks) for k, (_, v) in views.items()} == {
        "one block": 1,
        "segments": 5,
        "memory-mapped": 1,
    }
    rng = np.random.default_rng(0)
    for kind in KINDS:
        view = views[kind][1]
        for rows in (rng.choice(130, 50, replace=False), np.sort(rng.choice(130, 50, replace=False))):
            got = view.gather(rows)
            ref = per_row(view, rows)
            for a, b in zip((got.local, got.scale, got.gram, got.mask), ref):
                assert a is not None and a.dtype == b.dtype and np.array_equal(a, b)
    # segments of different widths (shortest first): the reference pads as the runtime does
    from mssan_infer import GalleryOptions
    from mssan_infer.gallery.memory import MemoryGallery

    g = MemoryGallery(16, 8, GalleryOptions(layout="int8"), segment_rows=16)
    for w in (2, 5, 3, 7):
        loc = rng.normal(size=(16, w, 8)).astype(np.float32)
        g.add(
            rng.normal(size=(16, 16)).astype(np.float32),
            loc,
            np.ones((16, w), np.float32),
            loc @ loc.transpose(0, 2, 1),
        )
    view = g.view()
    assert len({b.local.shape[1] for b in view.blocks}) > 1
    rows = rng.choice(64, 30, replace=False)
    got, ref = view.gather(rows), per_row(view, rows)
    for a, b in zip((got.local, got.scale, got.gram, got.mask), ref):
        assert a is not None and np.array_equal(a, b)
    out = tmp_path / "gather.json"
    main(["--items", "130", "--calls", "2", "--rounds", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["rows"] == 50 and res["ordered"] is True and set(res["blocks"]) == set(KINDS)
    assert len(res["p50_ms"]) == 10 and all(v > 0 for v in res["p50_ms"].values())
    with pytest.raises(SystemExit):
        main(["--items", "10"])
