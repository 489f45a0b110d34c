"""bench.scan_bits: 4-bit codes, their MatMulNBits scan, the ranks and the stage 1 built on them."""

from __future__ import annotations

import numpy as np
import pytest

from bench.scan_bits import Nbits4Scan, affine4, last_ranks, measure_view, nbits4_topk
from mssan_infer import GalleryOptions
from mssan_infer.gallery.memory import MemoryGallery

pytest.importorskip("faiss")

D = 80  # stage-1 width 160: not a whole number of MatMulNBits blocks (padded)
K = 20


def gallery(n: int = 1200, seed: int = 0) -> MemoryGallery:
    rng = np.random.default_rng(seed)
    local = rng.normal(size=(n, 3, 8)).astype(np.float32)
    g = MemoryGallery(2 * D, 8, GalleryOptions(layout="int8"))
    scale = np.linspace(0.2, 3.0, 2 * D).astype(np.float32)  # dimensions of different ranges
    g.add(
        rng.normal(size=(n, 2 * D)).astype(np.float32) * scale,
        local,
        np.ones((n, 3), np.float32),
        local @ local.transpose(0, 2, 1),
    )
    return g


def test_affine4_codes_are_within_half_a_step() -> None:
    x = np.random.default_rng(1).normal(size=(500, 2 * D)).astype(np.float32) * np.arange(1, 2 * D + 1)
    codes, low, step = affine4(x)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 15
    assert (np.abs(low + codes * step - x) <= step / 2 * (1 + 1e-5)).all()


def test_nbits4_scan_is_the_codes_inner_products() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 2 * D)).astype(np.float32)
    codes, _, step = affine4(x)
    q = rng.normal(size=(4, 2 * D)).astype(np.float32)
    got = Nbits4Scan(codes, step, threads=1).scores(q)
    want = (q * step) @ codes.T.astype(np.float32)
    # int8 compute: the query rounded per block of 128 values to 255 levels
    tol = np.abs(q * step).max() / 127 * 15 * 2 * D
    assert got.shape == (4, 300) and np.abs(got - want).max() <= tol
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999


def test_last_ranks() -> None:
    order = np.array([[5, 3, 9, 1], [2, 4, 6, 8]])
    assert last_ranks(order, np.array([[3, 5], [4, 7]])).tolist() == [2, 5]


def test_nbits4_topk_is_exact_when_it_fetches_past_the_last_exact_row() -> None:
    view = gallery().view()
    full = np.concatenate([b.stage1 for b in view.blocks])
    codes, _, step = affine4(full)
    scan = Nbits4Scan(codes, step, threads=1)
    q = np.random.default_rng(3).normal(size=(6, 2 * D)).astype(np.float32)
    exact = np.argsort(-(q @ full.T), axis=1, kind="stable")[:, :K]
    ranks = last_ranks(np.argsort(-scan.scores(q), axis=1), exact)
    for i in range(len(q)):
        got = nbits4_topk(view, scan, q[i], int(ranks[i]), K)
        assert got.tolist() == exact[i].tolist()  # best first, the exact scores' order


def test_measure_view_reports_every_candidate() -> None:
    view = gallery(600).view()
    q = np.random.default_rng(4).normal(size=(5, 2 * D)).astype(np.float32)
    out = measure_view(view, q, rounds=3, fetch=4 * K, train=600, k=K)
    assert set(out["candidates"]) == {"sq8", "nbits4", "faiss_sq4", "pq_fastscan"}
    for c in out["candidates"].values():
        r = c["rank_of_last_exact"]
        assert K <= r["p50"] <= r["max"] <= out["deep"] + 1
    assert out["candidates"]["sq8"]["bytes_per_row"] == 2 * out["candidates"]["nbits4"]["bytes_per_row"]
    assert len(out["p50_ms"]) == 6 and all(v > 0 for v in out["p50_ms"].values())
