"""Export of the transformer text tower: fp32/fp16 parity at dynamic B and L, the int8 variant and its gate,
the runtime on such bundles, TensorRT profiles and Triton configs for the new graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mssan_infer import OnnxRuntimeOptions, Retriever
from mssan_infer.errors import BundleError, InputError
from mssan_infer.spec import GRAPHS, TEXT_ENCODER, TOLERANCES


def test_transformer_bundle_is_verified_at_fp32_and_fp16_with_dynamic_batch_and_length(
    tiny_bert_bundle: Path,
) -> None:
    m = json.loads((tiny_bert_bundle / "manifest.json").read_text())
    assert m["verified"] and m["model_config"]["text_encoder"] == "transformer"
    for precision in ("fp32", "fp16"):
        rep = m["parity"][precision]
        assert rep["passed"] and rep["max_abs"]["text_encoder"] <= TOLERANCES[precision].atol
        cases = rep["graphs"]["text_encoder"]
        lengths = {c["shapes"]["txt_local"][1] for c in cases.values()}
        batches = {c["shapes"]["txt_local"][0] for c in cases.values()}
        assert len(lengths) >= 4 and max(lengths) == 32 and 1 in lengths and len(batches) >= 4
    g = onnx.load(str(tiny_bert_bundle / "text_encoder.onnx"), load_external_data=False).graph
    tokens = next(i for i in g.input if i.name == "tokens")
    assert [d.dim_param for d in tokens.type.tensor_type.shape.dim] == ["B", "L"]
    assert (tiny_bert_bundle / "tokenizer.json").is_file() and not (tiny_bert_bundle / "vocab.json").exists()
    assert m["files"]["tokenizer.json"] == m["tokenizer"]["sha256"]


def test_runtime_encodings_equal_pytorch_on_the_bundle_tokenizer(
    tiny_bert_bundle: Path, tiny_bert_checkpoint: Path
) -> None:
    from training.checkpoint import load_checkpoint

    caps = ["a red dog near the blue ball", "a cat", "the green tree and a small car on the beach"]
    r = Retriever.load(tiny_bert_bundle)
    got = r.encode_texts(caps)
    ck = load_checkpoint(tiny_bert_checkpoint)
    tokens, mask = ck.tokenizer.encode_batch(caps)
    with torch.inference_mode():
        want = ck.model.encode_text(torch.from_numpy(tokens), torch.from_numpy(mask))
    np.testing.assert_allclose(got.stage1, want.stage1.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.local, want.local.numpy(), atol=1e-4)
    np.testing.assert_array_equal(got.mask, mask)


# ---- int8 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small precomp folder with 24-d regions (the tiny checkpoint's Dv) for the int8 gate."""
    from training.synth import generate

    return generate(
        tmp_path_factory.mktemp("int8") / "data",
        images=20,
        seed=0,
        feat_dim=24,
        eval_images=30,
        regions=12,
        max_object_regions=2,
    )


@pytest.fixture(scope="module")
def int8_bundle(
    tiny_bert_checkpoint: Path, split_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from export import export_bundle

    # An untrained model: its recall is near chance, so the ratio gate is recorded, not enforced, here.
    return export_bundle(
        tiny_bert_checkpoint,
        tmp_path_factory.mktemp("b8") / "b",
        int8=True,
        int8_data=split_data,
        verify=False,
    )


def test_int8_text_encoder_is_fused_quantized_and_recorded(int8_bundle: Path) -> None:
    m = json.loads((int8_bundle / "manifest.json").read_text())
    table = m["int8_graphs"]
    assert (
        table["text_encoder"]["file"] == "int8/text_encoder.onnx"
        and table["text_encoder"]["precision"] == "int8"
    )
    assert table["image_encoder"]["file"] == "image_encoder.onnx" and table["scorer"]["file"] == "scorer.onnx"
    rep = m["parity"]["int8"]
    q = rep["quantization"]
    assert q["fusions"].get("SkipLayerNormalization", 0) >= 2 and q["quantized_nodes"] >= 8
    assert q["fp32_matmuls_left"] >= 1  # attention scores and the Gram: two activations
    assert q["per_channel"] is True and q["reduce_range"] is True  # 7-bit weights: no U8S8 saturation on AVX2
    ops = {n.op_type for n in onnx.load(str(int8_bundle / "int8" / "text_encoder.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert 0 < rep["max_abs"]["text_encoder"] <= TOLERANCES["int8"].atol
    split = rep["split_check"]
    assert set(split) >= {"recall_fp32", "recall_int8", "recall1_ratio", "top10_agreement", "failures"}
    assert split["captions"] == 150 and split["top10_agreement"]["t2i"]["mean"] > 0.5
    assert rep["passed"] == (not rep["failures"])
    assert m["verified"] is False  # exported with verify=False: recorded, never "verified"


def test_retriever_loads_the_int8_text_encoder(int8_bundle: Path) -> None:
    caps = ["a red dog near the blue ball", "a cat on the beach"]
    r32, r8 = Retriever.load(int8_bundle), Retriever.load(int8_bundle, OnnxRuntimeOptions(precision="int8"))
    a, b = r32.encode_texts(caps), r8.encode_texts(caps)
    assert 0 < np.abs(a.local - b.local).max() <= TOLERANCES["int8"].atol
    ims = np.abs(np.random.default_rng(0).standard_normal((5, 6, 24))).astype(np.float32)
    r8.add_images(ims, ids=list("abcde"))
    assert len(r8.search(text=caps[0], k=3, rerank=5)) == 3
    with pytest.raises(BundleError, match="--int8"):
        Retriever.load(_without_int8(int8_bundle), OnnxRuntimeOptions(precision="int8"))
    with pytest.raises(InputError, match="precision"):
        Retriever.load(int8_bundle, OnnxRuntimeOptions(precision="int4"))


def _without_int8(bundle: Path) -> Path:
    out = bundle.parent / "no-int8"
    if not out.exists():
        shutil.copytree(bundle, out)
        m = json.loads((out / "manifest.json").read_text())
        del m["int8_graphs"]
        (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_int8_gate_passes_an_exact_graph_and_fails_another_models_graph(
    tiny_bert_bundle: Path, tiny_bert_folder: Path, split_data: Path, tmp_path: Path
) -> None:
    from export.graphs import build_graphs
    from export.inputs import example_feeds
    from export.int8 import check_split
    from export.onnx import export_graph
    from training.checkpoint import load_model
    from training.config import ModelConfig
    from training.train import pretrained_text_model

    src = json.loads((tiny_bert_bundle / "manifest.json").read_text())["source_checkpoint"]["path"]
    model, tok = load_model(src)
    same = check_split(model, tok, tiny_bert_bundle / "text_encoder.onnx", split_data)
    assert not same["failures"] and same["recall1_ratio"] == {"i2t": 1.0, "t2i": 1.0}
    assert same["top10_agreement"]["t2i"]["mean"] == 1.0
    torch.manual_seed(123)  # another model: another text encoder
    other, _ = pretrained_text_model(
        tiny_bert_folder, ModelConfig(embed_size=32, img_dim=24, max_len=32), None, 24
    )
    for p in other.text_tower.encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = export_graph(
        build_graphs(other)[TEXT_ENCODER.name],
        TEXT_ENCODER,
        example_feeds(other)[TEXT_ENCODER.name],
        tmp_path / "other.onnx",
    )
    wrong = check_split(model, tok, path, split_data)
    assert any("top-10 agreement" in f for f in wrong["failures"]), wrong


# ---- TensorRT and Triton cover the graph ---------------------------------------------------
def test_tensorrt_text_length_profile_runs_up_to_max_len() -> None:
    from export.errors import ExportError
    from export.tensorrt import bundle_axes, derive_profiles

    axes = bundle_axes(None, {"L": 128})
    assert axes["L"] == (1, 16, 128)
    prof = derive_profiles(TEXT_ENCODER, {"D": 32, "D2": 64, "Dv": 24}, axes)
    assert prof["tokens"][2] == (128, 128) and prof["token_mask"][0] == (1, 1)
    assert bundle_axes({"L": (1, 8, 160)}, {"L": 128})["L"] == (1, 8, 160)
    with pytest.raises(ExportError, match="too small for this bundle"):
        bundle_axes({"L": (1, 8, 40)}, {"L": 128})


def test_transformer_graphs_pass_the_engine_parity_machinery_at_max_len(tiny_bert_bundle: Path) -> None:
    from export.tensorrt import bundle_axes, bundle_dims, bundle_shape, engine_parity
    from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend

    dims, vocab = bundle_dims(tiny_bert_bundle)
    assert vocab == len(json.loads((tiny_bert_bundle / "tokenizer.json").read_text())["model"]["vocab"])
    shape = bundle_shape(tiny_bert_bundle)
    axes = bundle_axes({"B": (1, 4, 8), "Ni": (1, 4, 8), "Nt": (1, 1, 4)}, shape.needs())
    assert axes["L"][2] >= shape.max_len
    graphs = {g: tiny_bert_bundle / "fp16" / spec.file for g, spec in GRAPHS.items()}
    with OnnxRuntimeBackend(graphs) as fp16:  # the fp16 graphs stand in for engines
        rep = engine_parity(tiny_bert_bundle, fp16, axes, shape, "fp16")
    assert rep.passed, rep.failures


def test_triton_configs_validate_against_the_transformer_text_encoder(
    tiny_bert_bundle: Path, tmp_path: Path
) -> None:
    from export.triton import SUBWORD_FILE, TritonSettings, validate_config, write_repository

    write_repository(tiny_bert_bundle, TritonSettings(), out=tmp_path / "repo")
    cfg = validate_config(
        tmp_path / "repo" / "text_encoder" / "config.pbtxt", tiny_bert_bundle / "text_encoder.onnx"
    )
    assert [list(i.dims) for i in cfg.input] == [[-1], [-1]]
    assert (tmp_path / "repo" / "retriever" / "1" / SUBWORD_FILE).read_bytes() == (
        tiny_bert_bundle / "tokenizer.json"
    ).read_bytes()


# ---- the real MiniLM -------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_text_encoder_exports_with_fp32_parity(minilm_folder: Path, tmp_path: Path) -> None:
    from export import export_bundle
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.train import pretrained_text_model

    torch.manual_seed(0)
    model, tok = pretrained_text_model(
        minilm_folder, ModelConfig(embed_size=64, img_dim=16, max_len=24), None, 16
    )
    ck = save_checkpoint(tmp_path / "ck", model, tok, state={"epoch": 0})
    b = export_bundle(ck, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    assert m["verified"] and m["parity"]["fp32"]["max_abs"]["text_encoder"] < TOLERANCES["fp32"].atol
    assert m["tokenizer"]["prefix_ids"] == [101] and m["tokenizer"]["suffix_ids"] == [102]
    r = Retriever.load(b)
    assert r.tokenize(["a crimson puppy"]) == [[1037, 11466, 17022]]
