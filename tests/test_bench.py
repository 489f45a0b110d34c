"""Smoke test of the benchmark machinery (`python -m bench --quick`) at toy sizes.

Checks that every section runs and writes its files, and that the headline
figures exist and are numbers. Nothing here is timed: benchmark targets are
never test assertions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    "layout_sizes": [400, 300],
    "i2t_layout_sizes": [200],
    "ref_mmap": 300,
    "depths": [0, 10, 100],
    "repeats_fast": 2,
    "repeats_slow": 2,
    "pool": 32,
    "queries": 4,
    "train_images": 100,
    "epochs": 1,
    "train_max_steps": 2,
    "train_model_overrides": {"embed_size": 32, "word_dim": 16},
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
    assert {"numpy", "torch", "onnxruntime"} <= set(summary["versions"])
    results = json.loads((out / "results.json").read_text())["results"]
    assert {"scorer", "latency", "recall", "encode", "text"} <= set(results)
    assert "t2i_300_mmap" in results["latency"]
    for key in ("t2i_400", "t2i_300_mmap", "i2t_200"):  # every gallery size in the four layouts
        lay = results["latency"][key]["layouts"]
        assert set(lay) == {"fp32", "fp16", "int8-stage1", "int8"}
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
    for name in ("results.md", "recall_latency_vs_depth.png", "scorer.png"):
        assert (out / name).stat().st_size > 0
    assert "## 1. Scorer throughput" in proc.stdout


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
    assert set(figs) == {"recall_latency_vs_depth.png", "scorer.png"}
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
