"""The bench's Qdrant section at toy sizes: image->text rows, the server options, and their report keys.

Nothing here is timed: the figures only have to exist and be numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.qdrant import MODES, _groups, run_qdrant_latency
from bench.qdrant_server import OPTIONS, run_qdrant_server
from bench.report import _qdrant_markdown, _summarise_qdrant
from mssan_infer import OnnxRuntimeOptions, Retriever

DV = 24


def test_groups_fit_the_free_disk_and_keep_every_mode_once() -> None:
    need = {"exact": 10.0, "int8": 6.0, "hnsw": 10.0}
    assert _groups(MODES, need, 100.0) == [["exact", "int8", "hnsw"]]
    assert _groups(MODES, need, 17.0) == [["exact", "int8"], ["hnsw"]]
    assert _groups(MODES, need, 1.0) == [["exact"], ["int8"], ["hnsw"]]  # one at a time at least


def test_the_qdrant_section_measures_image_to_text_and_the_server_options(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    r = Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1))
    rng = np.random.default_rng(0)
    images = np.abs(rng.standard_normal((8, 6, DV))).astype(np.float32)
    captions = ["a red dog on the beach", "the blue ball", "a man in the street", "a small bird"]
    pools = {"images": r.encode_images(images), "texts": r.encode_texts(captions)}
    queries = {"texts": captions[:2], "images": images[:2]}
    res: dict[str, Any] = {
        "qdrant": run_qdrant_latency(tiny_bundle, pools, [], queries, tmp_path, 1, 2, 5.0, i2t_sizes=[20]),
        "qdrant_server": run_qdrant_server(tiny_bundle, pools["images"], 30, captions, tmp_path, 1, 2, 5.0),
    }
    r.close()
    row = res["qdrant"]["i2t"]["20"]
    assert row["n_items"] == 100 and row["gallery"] == "texts" and row["groups"] == [list(MODES)]
    srv = res["qdrant_server"]
    assert srv["same_hits"] and set(OPTIONS) <= set(srv["candidates_100"])
    assert srv["wire"]["cache"]["rest_mb"] < srv["wire"]["payload"]["rest_mb"]  # no rerank inputs on the wire
    s: dict[str, Any] = {}
    _summarise_qdrant(res, s, {}, {"ref_mmap": 100000})
    for name in ("memory", *MODES):
        for key in (f"qdrant_i2t_p50_ms_20_rerank100_{name}", f"qdrant_i2t_p99_ms_20_rerank100_{name}"):
            assert math.isfinite(s[key]) and s[key] > 0, key
        assert s[f"qdrant_i2t_rss_mb_20_{name}"] > 0
    for mode in MODES:
        assert math.isfinite(s[f"qdrant_i2t_{mode}_vs_memory_p50_20"])
    for option in ("memory", "multivector", "payload", "cache", "cache_miss"):
        assert math.isfinite(s[f"qdrant_server_candidates100_p50_ms_{option}"])
    text = "\n".join(_qdrant_markdown(res))
    assert "| image->text | 20 images (100 captions) | Qdrant Edge int8 |" in text
    assert "| cache_miss |" in text


def test_the_qdrant_section_refuses_a_gallery_the_disk_cannot_hold(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import bench.qdrant

    r = Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1))
    captions = ["a red dog on the beach", "the blue ball"]
    images = np.ones((2, 6, DV), np.float32)
    pools = {"images": r.encode_images(images), "texts": r.encode_texts(captions)}
    r.close()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(bench.qdrant.shutil, "disk_usage", lambda _p: usage._replace(free=1 << 10))
    with pytest.raises(
        SystemExit, match=r"not enough disk in .* for the Qdrant section's i2t 20: .*qdrant_sizes"
    ):
        run_qdrant_latency(
            tiny_bundle, pools, [], {"texts": captions, "images": images}, tmp_path, 1, 2, 5.0, i2t_sizes=[20]
        )
    assert not (tmp_path / "qdrant-i2t-20").exists()  # refused before anything was written
