"""The exact stage-1 product in ONNX Runtime: the hand-encoded one-node graph and its results."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mssan_infer.errors import InputError
from mssan_infer.index import topk_inner_product
from mssan_infer.stage1 import OrtInnerProduct, matmul_model_bytes, numpy_inner_product


def test_hand_encoded_graph_is_the_onnx_helper_graph_and_passes_the_checker() -> None:
    ours = onnx.ModelProto.FromString(matmul_model_bytes())
    onnx.checker.check_model(ours, full_check=True)
    ref = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["base", "q"], ["scores"], name="stage1")], "mssan_stage1",
            [helper.make_tensor_value_info("base", TensorProto.FLOAT, ["N", "D"]),
             helper.make_tensor_value_info("q", TensorProto.FLOAT, ["D", "Q"])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "Q"])]),
        opset_imports=[helper.make_opsetid("", 13)], producer_name="mssan_infer", ir_version=7)
    assert ours == ref


@pytest.mark.parametrize("n, q, d", [(1, 1, 4), (37, 3, 16), (1000, 1, 2048)])
def test_ort_product_equals_numpy(n: int, q: int, d: int) -> None:
    rng = np.random.default_rng(n)
    base = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    got = OrtInnerProduct(threads=2)(queries, base)
    assert got.shape == (q, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_inner_product(queries, base), rtol=1e-5, atol=1e-4)


def test_topk_with_the_ort_product_matches_numpy_over_chunks_and_memmaps(tmp_path: object) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 32), dtype=np.float32)
    path = f"{tmp_path}/base.npy"
    np.save(path, base)
    mm = np.load(path, mmap_mode="r")
    q = rng.standard_normal((4, 32), dtype=np.float32)
    ia, sa = topk_inner_product(q, base, 20)
    for arr in (base, mm):
        for chunk in (1 << 12, 1 << 26):          # several blocks / one block
            ib, sb = topk_inner_product(q, arr, 20, chunk_bytes=chunk, product=OrtInnerProduct(1))
            assert np.array_equal(ia, ib)
            np.testing.assert_allclose(sa, sb, atol=1e-5)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_count_is_an_input_error(threads: object) -> None:
    with pytest.raises(InputError, match="threads"):
        OrtInnerProduct(threads)  # type: ignore[arg-type]
