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
    """The tiny BERT checkpoint, recorded as trained on ``split_data`` (as ``python -m training train``
    records it), exported with --int8 and no --int8-data: the gate finds the data from the record."""
    from export import export_bundle
    from training.train import data_record

    root = tmp_path_factory.mktemp("b8")
    ck = shutil.copytree(tiny_bert_checkpoint, root / "ck")
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "data": data_record(split_data, 20, 30, 24)}))
    # An untrained model: its recall is near chance, too weak for the ratio gate: recorded, not judged.
    return export_bundle(ck, root / "b", int8=True, verify=False)


def test_int8_text_encoder_is_fused_quantized_and_recorded(int8_bundle: Path, split_data: Path) -> None:
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
    assert m["verified"] is False  # exported with verify=False: recorded, never "verified"


def test_int8_gate_runs_on_the_training_data_the_checkpoint_records_and_says_so(
    int8_bundle: Path, split_data: Path
) -> None:
    split = json.loads((int8_bundle / "manifest.json").read_text())["parity"]["int8"]["split_check"]
    assert split["data"] == f"{split_data.resolve()} dev split (30 images)"
    assert split["data_source"] == "the checkpoint's training data"


def test_a_model_too_weak_to_judge_gets_no_ratio_verdict_and_is_never_verified(int8_bundle: Path) -> None:
    from export.int8 import TOO_WEAK

    rep = json.loads((int8_bundle / "manifest.json").read_text())["parity"]["int8"]
    split = rep["split_check"]
    assert split["verdict"] == TOO_WEAK and split["judged"] is False and "Train longer" in split["too_weak"]
    assert not any("R@1 ratio" in f for f in rep["failures"])  # the ratio is neither a pass nor a failure
    assert rep["passed"] is False


def test_export_refuses_int8_for_a_model_too_weak_to_judge_and_writes_nothing(
    tiny_checkpoint: Path, split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.__main__ import main

    out = tmp_path / "b"
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--int8", "--int8-data", str(split_data)]
    assert main([*args, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --int8: the model is too weak to judge") and "Train longer" in err
    assert "--no-verify" in err and "R@1 ratio int8/fp32" not in err
    assert list(tmp_path.iterdir()) == []


def test_int8_gate_data_is_the_int8_data_folder_else_the_recorded_training_data_never_a_guess(
    tiny_checkpoint: Path, split_data: Path, tmp_path: Path
) -> None:
    from export import ExportError
    from export.int8 import gate_data
    from training.checkpoint import load_model
    from training.data import load_split
    from training.train import data_record

    model, _ = load_model(tiny_checkpoint)  # 24-d regions, like split_data
    dev = load_split(split_data, "dev")
    given = gate_data(model, split_data, None)
    assert given.source == "--int8-data" and "dev split" in given.where
    np.testing.assert_array_equal(given.images, dev.images)
    record = data_record(split_data, 20, 30, 24)
    assert record["synth"]["seed"] == 0 and record["path"] == str(split_data.resolve())
    recorded = gate_data(model, None, record)
    assert recorded.source == "the checkpoint's training data" and recorded.captions == dev.captions
    # the synthetic training data is gone: its dev split is regenerated from the record, byte for byte
    gone = {**record, "path": str(tmp_path / "moved-away")}
    regen = gate_data(model, None, gone)
    assert "regenerated" in regen.where and regen.captions == dev.captions
    np.testing.assert_array_equal(regen.images, dev.images)
    with pytest.raises(ExportError, match="moved-away, which is not here.*--int8-data DIR"):
        gate_data(model, None, {k: v for k, v in gone.items() if k != "synth"})
    with pytest.raises(ExportError, match="does not record it.*--int8-data DIR"):
        gate_data(model, None, None)
    other, _ = load_model(tiny_checkpoint)
    other.cfg.img_dim = 256
    with pytest.raises(ExportError, match="24-d regions, but this model takes 256-d"):
        gate_data(other, split_data, None)


def test_the_recorded_training_folder_is_used_only_when_it_still_holds_the_recorded_data(
    tiny_checkpoint: Path, split_data: Path, tmp_path: Path
) -> None:
    """The gate refuses, naming --int8-data, a folder at the recorded path whose split size, feature size
    or synthetic seed differ from the record; a folder without a dev split gives its test split, as
    --int8-data does."""
    from export import ExportError
    from export.int8 import gate_data
    from training.checkpoint import load_model
    from training.data import load_split
    from training.train import data_record

    model, _ = load_model(tiny_checkpoint)
    record = data_record(split_data, 20, 30, 24)
    assert record["splits"] == {"train": 20, "dev": 30, "test": 30}
    for changed, says in (
        ({"splits": {**record["splits"], "dev": 31}}, "its dev split has 30 images, the record says 31"),
        ({"feat_dim": 48}, "its regions are 24-d, the record says 48-d"),
        ({"synth": {**record["synth"], "seed": 1}}, "its synthetic seed is 0, the record says 1"),
    ):
        with pytest.raises(ExportError, match=f"now holds other data \\({says}\\).*--int8-data DIR"):
            gate_data(model, None, {**record, **changed})
    no_dev = tmp_path / "no-dev"
    no_dev.mkdir()
    for f in split_data.iterdir():
        if not f.name.startswith("dev_"):
            shutil.copy(f, no_dev / f.name)
    got = gate_data(model, None, data_record(no_dev, 20, 30, 24))
    assert got.source == "the checkpoint's training data" and "test split" in got.where
    assert got.captions == load_split(split_data, "test").captions
    with pytest.raises(ExportError, match="test split has 30 images, the record says 29"):
        gate_data(model, None, {**data_record(no_dev, 20, 30, 24), "splits": {"dev": 30, "test": 29}})


def test_a_report_that_did_not_pass_is_refused_with_the_reason_it_gives() -> None:
    """raise_if_failed acts on ``passed``: an int8 gate that could not judge (no failure) is refused with
    its reason; with failures too, the ParityError lists both."""
    from export import ExportError
    from export.int8 import Int8Report
    from export.validate import raise_if_failed
    from mssan_infer.errors import ParityError

    split = {"judged": False, "too_weak": "--int8: too weak; train"}
    weak = Int8Report("int8", TOLERANCES["int8"], split=split)
    assert not weak.passed and weak.failures == [] and weak.reasons == ["--int8: too weak; train"]
    with pytest.raises(ExportError, match="^--int8: too weak; train$"):
        raise_if_failed([weak])
    weak.split["failures"] = ["split rerank t2i@100: mean top-10 agreement 0.5 < 0.9"]
    with pytest.raises(ParityError, match="(?s)1 parity check.*top-10 agreement.*--int8: too weak; train"):
        raise_if_failed([weak])
    raise_if_failed([Int8Report("int8", TOLERANCES["int8"], split={"judged": True})])  # passed


def test_the_int8_ratio_is_judged_only_above_a_floor_of_correct_first_hits() -> None:
    from export.int8 import TOO_WEAK, judge, judge_floor

    assert judge_floor(200, 200) == 10 and judge_floor(200, 1000) == 25  # i2t / t2i at 200 images
    good = {"i2t": {"mean": 0.97}, "t2i": {"mean": 0.95}}

    def r1(i2t: float, t2i: float) -> dict[str, dict[str, float]]:
        return {"i2t": {"r1": i2t}, "t2i": {"r1": t2i}}

    # the weak model: t2i 0.3% (3 of 1000 captions) against 0.2% for int8 -- "0.667"
    weak = judge(r1(1.0, 0.3), r1(1.0, 0.2), good, 200, 1000, 100, "dev split")
    assert weak["verdict"] == TOO_WEAK and weak["judged"] is False and weak["failures"] == []
    assert "3 of 1000 queries right, the gate needs 25" in weak["too_weak"]
    strong = judge(r1(60.0, 40.0), r1(60.0, 40.0), good, 200, 1000, 100, "dev split")
    assert strong["verdict"] == "passed" and strong["judged"] is True and "too_weak" not in strong
    lost = judge(r1(60.0, 40.0), r1(60.0, 38.0), good, 200, 1000, 100, "dev split")
    assert lost["verdict"] == "failed" and any("t2i R@1 ratio" in f for f in lost["failures"])
    flipped = judge(r1(1.0, 0.3), r1(1.0, 0.3), {**good, "t2i": {"mean": 0.5}}, 200, 1000, 100, "dev")
    assert flipped["verdict"] == "failed"  # rankings that disagree are a failure whatever the recall


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


# ---- python -m export: the int8 text encoder by default for a transformer tower -----------------------
def test_export_writes_the_int8_text_encoder_of_a_transformer_tower_by_default_and_no_int8_turns_it_off(
    tiny_bert_checkpoint: Path, split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.__main__ import main
    from export.int8 import default_int8
    from training.train import data_record

    ck = shutil.copytree(tiny_bert_checkpoint, tmp_path / "ck")
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "data": data_record(split_data, 20, 30, 24)}))
    assert default_int8(ck) and not default_int8(tmp_path / "nothing-here")
    # the gate stays fatal: an untrained model is too weak to judge, so the default export is refused,
    # and the error says how to export without int8
    assert main(["--checkpoint", str(ck), "--out", str(tmp_path / "refused"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --int8: the model is too weak to judge") and "--no-int8" in err
    assert not (tmp_path / "refused").exists()
    assert main(["--checkpoint", str(ck), "--out", str(tmp_path / "b8"), "--no-verify", "-q"]) == 0
    m = json.loads((tmp_path / "b8" / "manifest.json").read_text())
    assert m["int8_graphs"]["text_encoder"]["file"] == "int8/text_encoder.onnx" and "int8" in m["parity"]
    assert main(["--checkpoint", str(ck), "--out", str(tmp_path / "b"), "--no-int8", "-q"]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["verified"] and "int8_graphs" not in m and not (tmp_path / "b" / "int8").exists()
    assert main(["--checkpoint", str(ck), "--out", str(tmp_path / "c"), "--no-int8", "--int8-data", "d"]) == 1
    assert "--int8-data names the data of the int8 text encoder's gate" in capsys.readouterr().err


def test_a_bigru_export_writes_no_int8_text_encoder_unless_asked(
    tiny_checkpoint: Path, split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.__main__ import main
    from export.int8 import default_int8

    assert not default_int8(tiny_checkpoint)
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "-q"]) == 0
    assert "int8_graphs" not in json.loads((tmp_path / "b" / "manifest.json").read_text())
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "c"),
        "--int8-data",
        str(split_data),
    ]
    assert main([*args, "-q"]) == 1  # --int8-data alone: no int8 graph to gate
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Bi-GRU tower writes none by default" in err and "pass --int8 as well" in err
