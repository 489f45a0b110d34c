"""The exact path's per-row products (``mssan_infer.gallery.products``): the graph written as protobuf bytes
is a valid ONNX model meaning ``MatMul`` per row in both ONNX implementations, and the runner multiplies
rows of any width where they lie, from several threads at once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from mssan_infer.gallery.products import ROWS_PER_RUN, RowProducts, matmuls_model


def test_the_written_graph_is_a_valid_onnx_model_of_one_matmul_per_row() -> None:
    model = onnx.load_from_string(matmuls_model(3))
    onnx.checker.check_model(model, full_check=True)  # shapes inferred too
    assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    g = model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("MatMul", [f"a{i}", "q"], [f"c{i}"]) for i in range(3)
    ]
    assert [i.name for i in g.input] == ["a0", "a1", "a2", "q"]
    assert [o.name for o in g.output] == ["c0", "c1", "c2"]
    dims = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    assert dims["a1"] == ["P1", "D"] and dims["q"] == ["D", "Q"] and dims["c1"] == ["P1", "Q"]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*g.input, *g.output])
    # the same bytes onnx.helper writes for that graph (field for field)
    value = helper.make_tensor_value_info
    want = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", [f"a{i}", "q"], [f"c{i}"]) for i in range(3)],
            "row_products",
            [value(f"a{i}", onnx.TensorProto.FLOAT, [f"P{i}", "D"]) for i in range(3)]
            + [value("q", onnx.TensorProto.FLOAT, ["D", "Q"])],
            [value(f"c{i}", onnx.TensorProto.FLOAT, [f"P{i}", "Q"]) for i in range(3)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="mssan_infer",
    )
    assert model == want


def test_reference_evaluator_and_onnx_runtime_agree_with_numpy() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(p, 32)).astype(np.float32) for p in (5, 1, 0)]
    q = rng.normal(size=(32, 4)).astype(np.float32)
    feed = {f"a{i}": r for i, r in enumerate(rows)} | {"q": q}
    ref = ReferenceEvaluator(onnx.load_from_string(matmuls_model(3))).run(None, feed)
    out = [np.full((r.shape[0], 4), np.nan, np.float32) for r in rows]
    RowProducts(per_run=3).run(rows, q, out)
    for r, a, b in zip(rows, ref, out):
        np.testing.assert_allclose(a, r @ q, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, r @ q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, ROWS_PER_RUN - 1, ROWS_PER_RUN, 2 * ROWS_PER_RUN + 3])
def test_rows_of_any_width_in_ram_or_mapped_in_runs_of_any_length(count: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(count)
    gallery = np.lib.format.open_memmap(tmp_path / "g.npy", "w+", np.float32, (50, 9, 64))
    gallery[:] = rng.normal(size=gallery.shape)
    plain = np.array(gallery)
    picks = rng.integers(0, 50, count)
    widths = rng.integers(0, 10, count)  # 0..9 positions of each row
    q = rng.normal(size=(64, 6)).astype(np.float32)
    for src in (gallery, plain):
        rows = [src[r, :w] for r, w in zip(picks, widths)]
        out = np.full((count, 9, 6), np.nan, np.float32)
        RowProducts.get().run(rows, q, [out[i, :w] for i, w in enumerate(widths)])
        for i, (r, w) in enumerate(zip(picks, widths)):
            np.testing.assert_allclose(out[i, :w], plain[r, :w] @ q, rtol=1e-5, atol=1e-4)
            assert np.isnan(out[i, w:]).all()  # nothing written past a row's width


def test_threads_share_the_runner() -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(40, 12, 32)).astype(np.float32)
    qs = [rng.normal(size=(32, 3 + t)).astype(np.float32) for t in range(4)]
    outs = [np.empty((40, 12, 3 + t), np.float32) for t in range(4)]
    runner = RowProducts.get()
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for _ in range(5):
            runner.run(list(rows), qs[t], list(outs[t]))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for q, out in zip(qs, outs):
        np.testing.assert_allclose(out, rows @ q, rtol=1e-5, atol=1e-4)
    assert RowProducts.get() is runner  # one per process
