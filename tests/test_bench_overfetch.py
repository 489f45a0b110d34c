"""bench.overfetch: the rank of the last exact row in the compressed order, and what it predicts."""

from __future__ import annotations

import dataclasses

import numpy as np

from bench.overfetch import MULTIPLES, contained, fetch_ranks, stage1_times
from mssan_infer import GalleryOptions
from mssan_infer.gallery.memory import MemoryGallery

D = 16
K = 20


def gallery(n: int = 1500, seed: int = 0) -> MemoryGallery:
    rng = np.random.default_rng(seed)
    local = rng.normal(size=(n, 4, D)).astype(np.float32)
    local /= np.linalg.norm(local, axis=2, keepdims=True)
    g = MemoryGallery(2 * D, D, GalleryOptions(layout="int8"))
    g.add(
        rng.normal(size=(n, 2 * D)).astype(np.float32),
        local,
        np.ones((n, 4), np.float32),
        local @ local.transpose(0, 2, 1),
    )
    return g


def test_fetch_ranks_are_the_fewest_rows_that_hold_the_exact_topk() -> None:
    view = gallery().view()
    q = np.random.default_rng(5).normal(size=(12, 2 * D)).astype(np.float32)
    ranks = fetch_ranks(view, q, k=K, most=10)
    assert (ranks >= K).all() and (ranks <= 10 * K).all()
    assert (ranks > K).any()  # 32 dims in int8: the compressed order differs from the exact one
    full = np.concatenate([b.stage1 for b in view.blocks])
    qq, _ = view.codec.query(q)
    _, order = view.searcher.search(qq, 10 * K)
    for i in range(len(q)):
        exact = set(np.argsort(-(full @ q[i]), kind="stable")[:K].tolist())
        assert exact <= set(order[i, : ranks[i]].tolist())
        assert not exact <= set(order[i, : ranks[i] - 1].tolist())
    # a stage 1 that fetches at least that many rows returns the exact top k
    for i in range(len(q)):
        m = max(1, int(np.ceil(ranks[i] / K)))
        got = dataclasses.replace(view, overfetch=m).topk(q[i : i + 1], K)[0][0]
        assert set(got.tolist()) == set(np.argsort(-(full @ q[i]), kind="stable")[:K].tolist())


def test_contained_counts_queries_within_each_multiple() -> None:
    ranks = np.array([100, 120, 199, 201, 400, 401])
    share = contained(ranks, k=100)
    assert list(share) == [f"{m:g}x" for m in MULTIPLES]
    assert share["1x"] == 1 / 6 and share["2x"] == 3 / 6 and share["4x"] == 5 / 6
    assert list(share.values()) == sorted(share.values())


def test_stage1_times_times_each_overfetch() -> None:
    view = gallery(300).view()
    q = np.random.default_rng(1).normal(size=(3, 2 * D)).astype(np.float32)
    out = stage1_times(view, q, [2, 4], rounds=3, k=K)
    assert set(out) == {"overfetch 2", "overfetch 4"}
    assert all(v["n"] == 3 and v["p50_ms"] > 0 for v in out.values())
