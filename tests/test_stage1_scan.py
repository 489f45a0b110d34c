"""The compressed stage-1 scan: sub-indexes searched in groups, and the exact rescoring after it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer import GalleryOptions, Stage1Options
from mssan_infer.errors import InputError
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.stage1 import MIN_SCAN_BYTES, code_searcher, import_faiss, scan_parts
from mssan_infer.gallery.view import LARGE_GALLERY, ArrayView, fetch_rows

faiss = import_faiss()
DIM = 32
ROOT = Path(__file__).resolve().parents[1]


def sq8(codes: np.ndarray) -> object:
    ix = faiss.IndexScalarQuantizer(
        DIM, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT
    )
    ix.add_sa_codes(np.ascontiguousarray(codes.view(np.uint8) ^ np.uint8(0x80)))
    return ix


@pytest.mark.parametrize("cuts", [[700], [100, 600], [300, 300, 100], [50] * 14, [650, 10, 10, 10, 10, 10]])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_grouped_sub_indexes_find_what_one_index_finds(cuts: list[int], threads: int) -> None:
    rng = np.random.default_rng(len(cuts) * 10 + threads)
    codes = rng.integers(-127, 128, (sum(cuts), DIM)).astype(np.int8)
    bounds = np.cumsum([0, *cuts])
    subs = [sq8(codes[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    searcher, keep = code_searcher(faiss, DIM, subs, threads=threads, min_bytes=1)
    assert all(s in keep for s in subs)
    q = rng.integers(-127, 128, (3, DIM)).astype(np.float32)
    for k in (1, 40, sum(cuts)):
        scores, rows = searcher.search(q, k)
        exact = q.astype(np.int64) @ codes.astype(np.int64).T  # [3, N]
        assert np.array_equal(np.take_along_axis(exact, rows, axis=1), scores.astype(np.int64))
        assert np.array_equal(scores[:, -1], -np.sort(-exact, axis=1)[:, k - 1])  # the k best scores


def test_a_sub_index_per_group_at_most_and_no_empty_group() -> None:
    subs = [sq8(np.zeros((n, DIM), np.int8)) for n in (10, 10, 10, 10, 10)]
    searcher, _ = code_searcher(faiss, DIM, subs, threads=2, min_bytes=1)
    assert searcher.count() == 2 and searcher.ntotal == 50  # two groups of the five, on two threads
    alone, _ = code_searcher(faiss, DIM, subs[:1], threads=2, min_bytes=1)
    assert alone is subs[0]
    assert code_searcher(faiss, DIM, subs, threads=1, min_bytes=1)[0].count() == 5  # one group, in turn


def test_a_small_scan_stays_on_one_thread() -> None:
    subs = [sq8(np.zeros((10, DIM), np.int8)) for _ in range(4)]
    assert code_searcher(faiss, DIM, subs, threads=2)[0].count() == 4  # 1280 bytes: one group
    assert code_searcher(faiss, DIM, subs, threads=2, min_bytes=640)[0].count() == 2
    assert scan_parts(100 << 20, threads=2) == 2 and scan_parts(MIN_SCAN_BYTES - 1, threads=2) == 1


@pytest.mark.parametrize("segment_rows", [64, 4096])
@pytest.mark.parametrize("overfetch", [1, 4])
def test_rescoring_over_segments_returns_the_exact_scan(segment_rows: int, overfetch: int) -> None:
    rng = np.random.default_rng(5)
    n = 900
    st = rng.normal(size=(n, DIM)).astype(np.float32)
    lo = rng.normal(size=(n, 3, DIM // 2)).astype(np.float32)
    ma = np.ones((n, 3), np.float32)
    gr = lo @ lo.transpose(0, 2, 1)
    exact = MemoryGallery(DIM, DIM // 2)
    opts = GalleryOptions(layout="int8-stage1", stage1=Stage1Options(overfetch=overfetch, certify=True))
    comp = MemoryGallery(DIM, DIM // 2, opts, segment_rows=segment_rows)
    for a in range(0, n, 300):
        exact.add(st[a : a + 300], lo[a : a + 300], ma[a : a + 300], gr[a : a + 300])
        comp.add(st[a : a + 300], lo[a : a + 300], ma[a : a + 300], gr[a : a + 300])
    q = rng.normal(size=(4, DIM)).astype(np.float32)
    for k in (1, 10, 100):
        ri, rs = exact.view().topk(q, k)
        ci, cs = comp.view().topk(q, k)
        assert np.array_equal(ci, ri)
        np.testing.assert_allclose(cs, rs, rtol=0, atol=1e-5)


def test_the_scan_bench_checks_every_kernel_against_exact_integer_products(tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    args = ["--sizes", "1500", "--dims", "32", "--repeats", "1", "--bandwidth-gib", "0.02", "--out", str(out)]
    subprocess.run(
        [sys.executable, "-m", "bench.stage1_scan", *args], cwd=ROOT, check=True, capture_output=True
    )
    res = json.loads(out.read_text())
    (scan,) = res["scans"]
    assert all(v for k, v in scan["facts"].items() if not k.endswith("_s")), scan["facts"]
    assert set(scan["warm"]) == set(scan["cold"]) and "gallery_topk_int8" in scan["warm"]
    assert res["bandwidth_gbs"]["read_gbs"] > 0


@pytest.mark.parametrize("n, fetch", [(50, 60), (1500, 200), (30_000, 200), (30_000, 1)])
def test_the_scan_benchs_top_k_selection_is_a_full_sorts(n: int, fetch: int) -> None:
    from bench.stage1_scan import top_rows

    rng = np.random.default_rng(n + fetch)
    for scores in (rng.normal(size=n), np.sort(rng.normal(size=n)), rng.integers(0, 5, size=n).astype(float)):
        got_s, got_r = top_rows(scores, fetch)
        want = np.sort(scores)[::-1][: min(n, fetch)]
        assert np.array_equal(got_s, want) and np.array_equal(scores[got_r], got_s)
        assert len(set(got_r.tolist())) == len(got_r)


def spread_items(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    st = rng.normal(size=(n, DIM)).astype(np.float32)
    st *= rng.uniform(0.2, 3.0, size=(n, 1)).astype(np.float32)  # spread norms: scores far apart
    return st, np.zeros((n, 1, 4), np.float32), np.ones((n, 1), np.float32), np.zeros((n, 1, 1), np.float32)


def counting_rescores(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    rescored: list[int] = []
    original = ArrayView._rescore

    def counting(self: ArrayView, q: np.ndarray, rows: np.ndarray, *args: Any, **kw: Any) -> np.ndarray:
        rescored.append(len(rows))
        return original(self, q, rows, *args, **kw)

    monkeypatch.setattr(ArrayView, "_rescore", counting)
    return rescored


@pytest.mark.parametrize("k", [1, 10, 50])
def test_rescoring_stops_once_the_error_bound_certifies_the_top_k(
    monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    rescored = counting_rescores(monkeypatch)
    data = spread_items(3000)
    # 4x: rows past the first 2k are rescored only when the bound does not certify the first 2k
    opts = GalleryOptions(layout="int8-stage1", stage1=Stage1Options(overfetch=4))
    comp, exact = MemoryGallery(DIM, 4, opts), MemoryGallery(DIM, 4)
    for g in (comp, exact):
        g.add(*data)
    q = np.random.default_rng(1).normal(size=(20, DIM)).astype(np.float32)
    ri, rs = exact.view().topk(q, k)
    rescored.clear()
    ci, cs = comp.view().topk(q, k)
    assert np.array_equal(ci, ri)
    np.testing.assert_allclose(cs, rs, rtol=1e-6, atol=1e-5)  # float32 sums in another order
    fetch = fetch_rows(3000, k, 4)
    assert fetch > 2 * k and sum(rescored) <= len(q) * fetch / 2  # at most half the over-fetched rows


def test_without_a_certificate_every_fetched_row_is_rescored(monkeypatch: pytest.MonkeyPatch) -> None:
    rescored = counting_rescores(monkeypatch)
    rng = np.random.default_rng(3)
    st = (rng.normal(size=(1, DIM)) + 1e-4 * rng.normal(size=(600, DIM))).astype(np.float32)  # scores tie
    _, lo, ma, gr = spread_items(600)
    comp = MemoryGallery(DIM, 4, GalleryOptions(layout="int8-stage1"))
    comp.add(st, lo, ma, gr)
    rescored.clear()
    comp.view().topk(rng.normal(size=(1, DIM)).astype(np.float32), 5)
    assert sum(rescored) == fetch_rows(600, 5)  # the bound never beats the gaps: the whole over-fetch


def test_the_default_fetch_grows_past_a_large_gallery() -> None:
    assert fetch_rows(5000, 100) == 200 and fetch_rows(LARGE_GALLERY, 100) == 200
    assert fetch_rows(LARGE_GALLERY + 1, 100) == 400  # see docs/experiments/2026-12-07-overfetch.md
    assert fetch_rows(100_000, 100, 2) == 200 and fetch_rows(100_000, 100, 3) == 300  # asked for
    assert fetch_rows(5000, 5) == 37 and fetch_rows(150, 100) == 150  # at least k + 32, at most n
    assert Stage1Options().overfetch is None
    with pytest.raises(InputError, match="overfetch must be a positive int or None"):
        Stage1Options(overfetch=0)


@pytest.mark.parametrize("blocks", [[900], [100, 500, 300], [1, 899], [450, 450]])
def test_one_query_scanned_on_a_thread_per_core_finds_what_numpy_finds(
    blocks: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mssan_infer import parts as parts_module
    from mssan_infer.gallery import stage1

    rng = np.random.default_rng(sum(blocks) + len(blocks))
    base = rng.standard_normal((sum(blocks), 64)).astype(np.float32)
    base[7] = base[3]  # a tie: broken by row
    mapped = np.lib.format.open_memmap(tmp_path / "s1.npy", "w+", np.float32, base.shape)
    mapped[:] = base
    bounds = np.cumsum([0, *blocks])
    parts = [
        (int(a), mapped[a:b] if i % 2 else base[a:b]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    q = base[3:4] * 2
    threads: set[int] = set()
    blas_threads: list[int] = []
    run = stage1.run_parts

    def recorded(work: Any, bounds: list[int], executor: Any) -> None:
        def traced(a: int, b: int) -> None:
            threads.add(threading.get_ident())
            # the libraries the runtime holds (numpy's; not FAISS's OpenMP BLAS, nor one loaded later)
            blas_threads.extend(lib.get_num_threads() for lib in parts_module._libs())
            work(a, b)

        run(traced, bounds, executor)

    monkeypatch.setattr(stage1, "run_parts", recorded)
    monkeypatch.setattr(stage1, "MIN_SCAN_BYTES", 1)  # a thread per core even for this small gallery
    monkeypatch.setattr(stage1, "scan_threads", lambda: 2)
    got_i, got_s = stage1.topk_inner_product(q, parts, 50)
    assert len(threads) == 2  # this thread and one helper
    assert blas_threads and set(blas_threads) <= {1}  # each slice's product on its own thread alone
    want_i, want_s = stage1.topk_inner_product(np.repeat(q, 2, axis=0), parts, 50)  # a batch: BLAS in chunks
    exact = (base.astype(np.float64) @ q[0].astype(np.float64)).astype(np.float32)
    assert got_i[0, :2].tolist() == [3, 7] and want_i[0, :2].tolist() == [3, 7]
    assert np.allclose(got_s[0], exact[got_i[0]], atol=1e-4) and np.allclose(want_s[0], got_s[0], atol=1e-4)
    assert set(got_i[0]) == set(want_i[0]) == set(np.argsort(-exact, kind="stable")[:50])


def test_ties_at_the_kth_score_are_broken_by_row() -> None:
    from mssan_infer.gallery import stage1

    rng = np.random.default_rng(5)
    base = rng.standard_normal((2000, 16)).astype(np.float32)
    base[100:] = base[0]  # 1901 rows tie for the best score
    for q in (base[:1], base[[0, 0]]):  # one query (sliced scan) and a batch (BLAS in chunks)
        idx, _ = stage1.topk_inner_product(q, base, 5)
        assert idx.tolist() == [[0, 100, 101, 102, 103]] * len(q)


def test_faiss_loader_lines_do_not_reach_an_application_logging_at_info() -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from mssan_infer.gallery.stage1 import import_faiss\n"
        "import_faiss()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "faiss.loader" not in out.stderr, out.stderr
