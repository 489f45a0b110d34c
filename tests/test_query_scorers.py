"""The query scorers: one query against K candidates, float32 or the int8 layout's stored codes."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import mssan_infer
from export.graphs import QUERY_MAX, _MatMulInteger
from export.query_scorers import export_query_scorers
from export.validate import raise_if_failed
from mssan_infer import GalleryOptions, InputError, SearchOptions
from mssan_infer.backends.base import Backend
from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend
from mssan_infer.spec import QUERY_SCORERS
from training.checkpoint import load_checkpoint


class _Product(torch.nn.Module):
    def forward(self, codes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return _MatMulInteger.apply(codes, query)  # type: ignore[no-any-return]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_integer_gemm_is_exact_at_the_extremes_on_this_cpu() -> None:
    """uint8 codes (values -127..127 stored + 128) x 7-bit query codes: on AVX2 without VNNI the u8 x s8
    kernel adds pairs of products in int16, which only a 7-bit operand keeps from saturating."""
    qmax = QUERY_MAX
    d = 1024
    a = np.array([[255] * d, [1] * d, [255, 1] * (d // 2), [128] * d], np.uint8)  # +127, -127, mixed, 0
    b = np.stack([np.full(d, qmax), np.full(d, -qmax), np.tile([qmax, -qmax], d // 2)], 1).astype(np.int8)
    f = io.BytesIO()
    torch.onnx.export(
        _Product(), (torch.from_numpy(a), torch.from_numpy(b)), f, dynamo=False, opset_version=17
    )
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (a, b))))[0]
    want = (a.astype(np.int64) - 128) @ b.astype(np.int64)
    assert np.array_equal(got, want) and np.abs(want).max() == 127 * qmax * d


def test_the_gates_compare_every_query_scorer_and_pass(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_checkpoint(tiny_checkpoint).model
    report, paths = export_query_scorers(model, tmp_path, opset=17)
    raise_if_failed([report])
    assert set(paths) == set(QUERY_SCORERS)
    assert {c.graph for c in report.outputs} == set(QUERY_SCORERS)
    rounding = report.notes["int8_query_rounding"]
    assert 0 < rounding["s_ll"] < 0.05 and rounding["product_bound"] > 0


def test_a_wrong_int8_graph_fails_its_gate(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 gate compares against the float32 scorer fed the same (dequantized, rounded) numbers: a
    graph that forgets the zero point of the stored codes is caught."""

    def off_by_zero_point(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)

    monkeypatch.setattr(
        _MatMulInteger,
        "symbolic",
        staticmethod(lambda g, a, b: g.op("MatMulInteger", a, b)),  # zero points dropped
    )
    monkeypatch.setattr(_MatMulInteger, "forward", staticmethod(off_by_zero_point))
    report, _ = export_query_scorers(load_checkpoint(tiny_checkpoint).model, tmp_path, opset=17)
    bad = {c.graph for c in report.outputs if not c.ok}
    assert bad == {"scorer_t2i_int8", "scorer_i2t_int8"}


def test_onnx_runtime_runs_the_query_scorers_without_per_candidate_transposes(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """After ONNX Runtime's fusions no node transposes a [K, P, Q] tensor (its Transpose, and its Softmax
    over an axis other than the last, dispatch to the thread pool once per candidate) and no
    ReduceLogSumExp is left (several times slower than the five nodes written out)."""
    import onnx

    for name, spec in QUERY_SCORERS.items():
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(tiny_bundle / spec.file), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(so.optimized_model_filepath).graph.node
        ops = {n.op_type for n in nodes}
        assert "ReduceLogSumExp" not in ops, name
        for n in nodes:
            attrs = {a.name: a for a in n.attribute}
            if n.op_type == "Transpose":
                assert len(attrs["perm"].ints) <= 2, (name, n.name)
            if n.op_type == "Softmax":
                assert attrs["axis"].i == -1, (name, n.name)


@pytest.mark.parametrize("name", sorted(QUERY_SCORERS))
def test_a_zero_length_side_scores_zero_in_the_query_scorers(tiny_bundle: Path, name: str) -> None:
    """Like ``attention_scores`` (the tiny model aggregates by mean): no NaN from a softmax over nothing."""
    sess = ort.InferenceSession(
        str(tiny_bundle / QUERY_SCORERS[name].file), providers=["CPUExecutionProvider"]
    )
    for n_cand, n_query in ((5, 0), (0, 4), (0, 0)):
        feeds = {}
        cand_axis = "R" if name.startswith("scorer_t2i") else "L"  # the candidates' positions; K = 3; D fixed
        size = {"Ni": 3, "Nt": 3, cand_axis: n_cand}
        for i in sess.get_inputs():
            shape = [a if isinstance(a, int) else size.get(a, n_query) for a in i.shape]
            dtype = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(i.type, np.float32)
            feeds[i.name] = np.ones(shape, dtype)
        out = sess.run(None, feeds)[0]
        assert out.shape == (3,) and (out == 0).all(), (name, n_cand, n_query, out)


class _Recorder(Backend):
    name = "recorder"

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        super().__init__("cpu")
        self.inner, self.seen = inner, []  # type: ignore[var-annotated]
        for g in inner.graphs:
            self._add_graph(g, inner.fixed_dims(g))

    def _run(self, graph: str, feeds: Any) -> dict[str, np.ndarray]:
        self.seen.append((graph, {k: v.dtype for k, v in feeds.items()}))
        return self.inner._run(graph, feeds)


@pytest.mark.parametrize("query_is_text", [True, False])
def test_int8_candidates_reach_the_integer_scorer_as_stored_and_rank_like_float32(
    tiny_bundle: Path, query_is_text: bool
) -> None:
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(40, 5, 24)).astype(np.float32)
    captions = [f"a dog {w} the red ball" for w in ("on", "near", "under", "with", "by")] * 8
    hits = {}
    for layout in ("fp32", "int8"):
        r = mssan_infer.Retriever.load(tiny_bundle, gallery=GalleryOptions(layout=layout))
        rec = _Recorder(r.backend)  # type: ignore[arg-type]
        r.backend = rec
        r.add_images(regions)
        r.add_texts(captions)
        q = {"text": "a dog near a ball"} if query_is_text else {"image": regions[3]}
        hits[layout] = r.search(**q, k=10, rerank=30)
        scorers = {g for g, _ in rec.seen if g.startswith("scorer")}
        want = f"scorer_{'t2i' if query_is_text else 'i2t'}{'_int8' if layout == 'int8' else ''}"
        assert scorers == {want}
        dtypes = next(d for g, d in rec.seen if g == want)
        if layout == "int8":
            assert dtypes[f"{'img' if query_is_text else 'txt'}_codes"] == np.uint8  # never widened
        else:  # the candidates' similarities to the query, never their locals
            assert dtypes["similarity"] == np.float32 and not any(n.endswith("_local") for n in dtypes)
    f32, i8 = hits["fp32"], hits["int8"]
    assert [h.id for h in f32[:3]] == [h.id for h in i8[:3]]
    assert max(abs(a.score - b.score) for a, b in zip(f32, i8)) < 0.05


class _Threads(_Recorder):
    """Records each scorer call's graph, candidates, their width and thread, and whether the call ran on
    the graph's one-thread session; fails the call of a share holding item ``fail`` when set."""

    fail: int | None = None

    def _run(self, graph: str, feeds: Any) -> dict[str, np.ndarray]:
        from mssan_infer.backends.base import in_one_thread

        mask = next(v for n, v in feeds.items() if n.endswith("_mask") and v.ndim == 2)
        self.seen.append((graph, mask.shape[0], mask.shape[1], threading.get_ident(), in_one_thread()))
        if self.fail is not None and len(self.seen) == self.fail:
            raise RuntimeError("a share failed")
        return self.inner._run(graph, feeds)


@pytest.mark.parametrize("layout", ["fp32", "int8"])
@pytest.mark.parametrize("query_is_text", [True, False])
def test_reranks_cut_into_shares_on_two_threads_score_as_one_share(
    tiny_bundle: Path, query_is_text: bool, layout: str
) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 4, 100)
    lengths[:10] = 8  # long first items (99 of 100 are candidates): the share of the first rows is wider
    regions = [rng.normal(size=(int(n), 24)).astype(np.float32) for n in lengths]
    words = ("a", "dog", "on", "the", "red", "ball", "near", "under", "with", "by")
    captions = [" ".join(["dog", *rng.choice(words, int(n) - 1)]) for n in lengths]
    q = {"text": "a dog near a red ball"} if query_is_text else {"image": regions[3]}
    base = mssan_infer.Retriever.load(tiny_bundle, gallery=GalleryOptions(layout=layout))
    base.add_images(regions)
    base.add_texts(captions)
    graph = f"scorer_{'t2i' if query_is_text else 'i2t'}{'_int8' if layout == 'int8' else ''}"
    # the query scorers keep the backend's threads for unsplit calls and get a one-thread twin for shares
    assert base.backend._single[graph].get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    hits, calls = {}, {}
    for threads in (1, 2):
        r = mssan_infer.Retriever(
            base.bundle,
            _Threads(base.backend),  # type: ignore[arg-type]
            base.tokenizer,
            base.images,
            base.texts,
            SearchOptions(rerank_threads=threads),
        )
        hits[threads] = r.search(**q, k=99, rerank=99)
        calls[threads] = [c for c in r.backend.seen if c[0].startswith("scorer")]  # type: ignore[attr-defined]
        r.close()
    assert [(g, k, one) for g, k, _, _, one in calls[1]] == [(graph, 99, False)]
    assert sorted((g, k, one) for g, k, _, _, one in calls[2]) == [(graph, 49, True), (graph, 50, True)]
    assert len({t for *_, t, _ in calls[2]}) == 2  # each share on its own thread
    assert len({w for _, _, w, _, _ in calls[2]}) == 2  # trimmed to their own widths
    # every candidate comes back with the same score (equal captions tie: their order may differ)
    one, two = ({h.id: h.score for h in hits[t]} for t in (1, 2))
    assert len(one) == 99 and one.keys() == two.keys()
    assert np.allclose([one[i] for i in one], [two[i] for i in one], atol=1e-5, rtol=0)
    # a failing share fails the search, after both shares ended
    failing = _Threads(base.backend)  # type: ignore[arg-type]
    failing.fail = 2
    r = mssan_infer.Retriever(base.bundle, failing, base.tokenizer, base.images, base.texts)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a share failed"):
        r.search(**q, k=80, rerank=99)
    r.close()


def test_shares_are_equal_and_never_below_the_minimum() -> None:
    from mssan_infer.parts import part_bounds
    from mssan_infer.search import MIN_SHARE

    def share_bounds(k: int, shares: int) -> list[int]:
        return part_bounds(k, shares, MIN_SHARE)

    assert share_bounds(100, 2) == [0, 50, 100]
    assert share_bounds(100, 1) == [0, 100]
    assert share_bounds(2 * MIN_SHARE - 1, 2) == [0, 2 * MIN_SHARE - 1]  # one share: a second is too small
    assert share_bounds(0, 4) == [0, 0]
    assert share_bounds(7 * MIN_SHARE, 3) == [0, 7 * MIN_SHARE // 3, 14 * MIN_SHARE // 3, 7 * MIN_SHARE]


def test_blocks_open_at_once_on_two_threads_hold_one_thread_until_the_last_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from mssan_infer import parts

    class Lib:  # a process-wide count, as numpy's OpenBLAS (whose own rules on which thread may set it vary)
        n = 2

        def get_num_threads(self) -> int:
            return self.n

        def set_num_threads(self, n: int) -> None:
            self.n = n

    lib = Lib()
    monkeypatch.setattr(parts, "_blas_libs", [lib])
    opened, first_closed = threading.Barrier(2, timeout=10), threading.Event()
    during: list[int] = []

    def search(first: bool) -> None:
        with parts.blas_one_thread():
            opened.wait()
            if not first:
                first_closed.wait(10)
                during.append(lib.n)
        if first:
            first_closed.set()

    threads = [threading.Thread(target=search, args=(f,)) for f in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert during == [1] and lib.n == 2 and parts._blas_users == 0


def test_parts_inside_a_blas_block_call_blas_on_one_thread_and_the_count_comes_back() -> None:
    """One query's float32 scan (the parts that call numpy's BLAS) runs its parts inside
    ``blas_one_thread``: every part sees one BLAS thread; ``run_parts`` alone (gathers and rerank shares,
    which call no BLAS) leaves the count as it is."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mssan_infer import parts
    from mssan_infer.parts import blas_one_thread, run_parts

    # the libraries the runtime holds (found on its first parts; a library loaded later, as scipy's
    # OpenBLAS with transformers, is not among them)
    blas = parts._libs()
    assert blas and all(lib.threading_layer != "openmp" for lib in blas), "no numpy BLAS to hold"
    before = [lib.get_num_threads() for lib in blas]
    for lib in blas:
        lib.set_num_threads(2)
    try:
        seen: dict[int, list[int]] = {}
        both_inside = threading.Barrier(2, timeout=10)

        def part(a: int, b: int) -> None:
            both_inside.wait()  # the two parts really run at once
            seen[a] = [lib.get_num_threads() for lib in blas]

        with ThreadPoolExecutor(1) as pool:
            with blas_one_thread():
                run_parts(part, [0, 5, 10], pool)
            assert seen == {0: [1] * len(blas), 5: [1] * len(blas)}
            assert [lib.get_num_threads() for lib in blas] == [2] * len(blas)
            run_parts(part, [0, 5, 10], pool)  # no block: the parts keep the BLAS's count
            assert seen == {0: [2] * len(blas), 5: [2] * len(blas)}

        # blocks open at once (two searches on two threads): the count comes back when the last one ends
        with blas_one_thread():
            with blas_one_thread():
                assert [lib.get_num_threads() for lib in blas] == [1] * len(blas)
            assert [lib.get_num_threads() for lib in blas] == [1] * len(blas)
        assert [lib.get_num_threads() for lib in blas] == [2] * len(blas)
        with pytest.raises(ValueError, match="a part failed"):  # a part's error still restores the count
            with ThreadPoolExecutor(1) as pool, blas_one_thread():

                def failing(a: int, b: int) -> None:
                    raise ValueError("a part failed")

                run_parts(failing, [0, 5, 10], pool)
        assert [lib.get_num_threads() for lib in blas] == [2] * len(blas)
    finally:
        for lib, n in zip(blas, before):
            lib.set_num_threads(n)


def test_fast_sets_the_int8_encoder_and_layout_or_refuses_a_contradiction(tiny_bundle: Path) -> None:
    from mssan_infer import OnnxRuntimeOptions
    from mssan_infer.options import fast_path

    backend, gallery = fast_path("onnxruntime", None)
    assert backend.precision == "int8" and gallery.resolved_layout().name == "int8"
    with pytest.raises(InputError, match="fast=True uses the int8 layout"):
        fast_path("onnxruntime", GalleryOptions(layout="int8-stage1"))
    with pytest.raises(InputError, match="int8 text encoder on ONNX Runtime"):
        fast_path(OnnxRuntimeOptions(precision="fp16"), None)
    with pytest.raises(InputError, match="int8 text encoder on ONNX Runtime"):
        fast_path("tensorrt", None)


def test_a_bundle_with_query_scorers_of_an_older_form_reranks_with_the_all_pairs_scorer(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Its manifest records other inputs for one of them: a warning that says to re-export, the others still
    load, and the float32 candidates get the same ranking from the all-pairs scorer."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["graphs"]["scorer_t2i"]["inputs"][0] = {
        "name": "img_local",
        "dtype": "float32",
        "axes": ["Ni", "R", "D"],
    }
    (old / "manifest.json").write_text(json.dumps(m))
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(40, 5, 24)).astype(np.float32)
    hits = {}
    for name, bundle in (("new", tiny_bundle), ("old", old)):
        if name == "old":
            with pytest.warns(RuntimeWarning, match="Re-export the bundle"):
                r = mssan_infer.Retriever.load(bundle)
            assert set(QUERY_SCORERS) - set(r.backend.graphs) == {"scorer_t2i"}  # the others still run
        else:
            r = mssan_infer.Retriever.load(bundle)
            assert all(g in r.backend.graphs for g in QUERY_SCORERS)
        r.add_images(regions)
        hits[name] = r.search(text="a dog near a ball", k=10, rerank=30)
    assert [h.id for h in hits["new"]] == [h.id for h in hits["old"]]
    assert max(abs(a.score - b.score) for a, b in zip(hits["new"], hits["old"])) < 1e-4
