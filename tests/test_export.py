"""export: checkpoint -> bundle, parity with PyTorch, fp16 variants, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import ExportError, export_bundle
from export.fp16 import FP16_OPS
from export.graphs import build_graphs
from export.inputs import EXAMPLE_B, EXAMPLE_L, EXAMPLE_R, image_feeds, text_feeds
from export.onnx import check_onnx, export_graph
from export.runners import to_torch
from export.validate import rerank_order_check, validate_graphs
from mssan_infer.bundle import load_bundle
from mssan_infer.errors import BundleError, ParityError
from mssan_infer.names import FORMAT_VERSION, MANIFEST_FILE
from mssan_infer.spec import GRAPHS, IMAGE_ENCODER, QUERY_SCORERS, SCORER, TEXT_ENCODER, TOLERANCES
from training.checkpoint import load_checkpoint
from training.config import ModelConfig
from training.model import MSSAN

REPO = Path(__file__).resolve().parents[1]
BUNDLE_FILES = sorted(
    [spec.file for spec in GRAPHS.values()]
    + [spec.file for spec in QUERY_SCORERS.values()]
    + [f"fp16/{spec.file}" for spec in GRAPHS.values()]
    + ["vocab.json"]
)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> MSSAN:
    return load_checkpoint(tiny_checkpoint).model


def _paths(bundle: Path, precision: str = "fp32") -> dict[str, Path]:
    sub = "" if precision == "fp32" else "fp16/"
    return {name: bundle / f"{sub}{spec.file}" for name, spec in GRAPHS.items()}


# ---- parity ---------------------------------------------------------------------
def test_exported_graphs_match_pytorch_at_shapes_other_than_the_tracing_example(
    tiny_bundle: Path, model: MSSAN
) -> None:
    report = validate_graphs(model, _paths(tiny_bundle), rerank=False)
    assert report.passed, report.failures
    shapes = {(c.graph, c.case): c.shape for c in report.outputs}
    img_b = {s[0] for (g, _), s in shapes.items() if g == IMAGE_ENCODER.name and s}
    img_r = {s[1] for (g, _), s in shapes.items() if g == IMAGE_ENCODER.name and s and len(s) == 3}
    txt_l = {s[1] for (g, _), s in shapes.items() if g == "text_encoder" and s and len(s) == 3}
    assert 1 in img_b and max(img_b) > EXAMPLE_B
    assert 36 in img_r and img_r - {36, EXAMPLE_R}
    assert 1 in txt_l and max(txt_l) > EXAMPLE_L
    assert any("fully_masked" in c.case for c in report.outputs)
    assert all(c.max_abs is not None and c.max_abs <= TOLERANCES["fp32"].atol for c in report.outputs)
    n_cases = {g: len({c.case for c in report.outputs if c.graph == g}) for g in GRAPHS}
    assert len(report.outputs) == sum(len(GRAPHS[g].outputs) * n for g, n in n_cases.items())


def test_final_two_stage_scores_and_rerank_order_match_model_score(tiny_bundle: Path) -> None:
    parity = json.loads((tiny_bundle / MANIFEST_FILE).read_text())["parity"]["fp32"]
    assert parity["passed"] and set(parity["rerank"]) == {"t2i", "i2t"}
    for r in parity["rerank"].values():
        assert r["depth"] == 100
        assert r["max_abs"] <= TOLERANCES["fp32"].atol
        assert r["violations"] == 0


def test_rerank_order_check_allows_near_ties_but_not_real_swaps() -> None:
    ref = np.array([0.9, 0.5, 0.50005, 0.1])
    assert rerank_order_check(ref, ref, 1e-4) == (1.0, 0, 0)
    tie = ref.copy()
    tie[1] = 0.5001  # swaps with a candidate 5e-5 away: allowed
    _, swaps, violations = rerank_order_check(ref, tie, 1e-4)
    assert (swaps, violations) == (1, 0)
    wrong = ref.copy()
    wrong[3] = 0.95  # the worst candidate ranked first
    assert rerank_order_check(ref, wrong, 1e-4)[2] == 3


def test_validator_rejects_a_graph_exported_with_a_frozen_batch_axis(tmp_path: Path, model: MSSAN) -> None:
    from export.inputs import example_feeds

    axes = {k: {i: a for i, a in v.items() if a != "B"} for k, v in IMAGE_ENCODER.dynamic_axes().items()}
    path = export_graph(
        build_graphs(model)[IMAGE_ENCODER.name],
        IMAGE_ENCODER,
        example_feeds(model)[IMAGE_ENCODER.name],
        tmp_path / "frozen.onnx",
        dynamic_axes=axes,
    )
    report = validate_graphs(model, {IMAGE_ENCODER.name: path}, rerank=False)
    assert any("frozen" in m for m in report.contract)
    assert any(not c.ok and "B1_R36" in c.case for c in report.outputs)  # fails at run time too
    with pytest.raises(ParityError, match="(?s)B1_R36.*B9_R3"):  # every failure, one error
        report.raise_if_failed()


def test_validator_rejects_a_graph_that_computes_something_else(tmp_path: Path, model: MSSAN) -> None:
    from export.inputs import example_feeds

    other = MSSAN(ModelConfig.from_dict({**model.cfg.to_dict(), "lam_ll": 2.0}))
    other.load_state_dict(model.state_dict())
    path = export_graph(
        build_graphs(other)[SCORER.name], SCORER, example_feeds(model)[SCORER.name], tmp_path / "s.onnx"
    )
    report = validate_graphs(model, {SCORER.name: path}, rerank=False)
    assert not report.contract
    assert report.outputs and not any(c.ok for c in report.outputs if c.case.startswith("example"))
    with pytest.raises(ParityError, match="max abs diff"):
        report.raise_if_failed()


def test_export_with_failing_parity_raises_and_writes_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="parity check"):
        export_bundle(tiny_checkpoint, out, atol=1e-15)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind


# ---- the bundle ------------------------------------------------------------------
def test_bundle_manifest_hashes_every_file_and_satisfies_the_runtime(
    tiny_bundle: Path, tiny_checkpoint: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest.raw
    on_disk = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert sorted(m["files"]) == BUNDLE_FILES == [f for f in on_disk if f != MANIFEST_FILE]
    assert m["format_version"] == FORMAT_VERSION and m["verified"] is True
    assert m["graphs"] == {name: spec.to_dict() for name, spec in {**GRAPHS, **QUERY_SCORERS}.items()}
    assert m["parity"]["query-scorers"]["passed"] is True
    assert {g: e["file"] for g, e in m["fp16_graphs"].items()} == {
        g: f"fp16/{s.file}" for g, s in GRAPHS.items()
    }
    cfg = load_checkpoint(tiny_checkpoint).model.cfg
    assert m["model_config"] == cfg.to_dict()
    assert m["dims"] == {"D": cfg.embed_size, "D2": 2 * cfg.embed_size, "Dv": cfg.img_dim}
    assert m["tokenizer"]["vocab"] == "vocab.json" and m["tokenizer"]["max_len"] == cfg.max_len
    assert m["scoring"]["final"] == "img_stage1 . txt_stage1 + s_ll"
    assert m["preprocessing"] == {"input": "regions", "feature_dim": cfg.img_dim}
    assert m["versions"]["opset"] == 17 and m["source_checkpoint"]["sha256"]
    for path in bundle.root.rglob("*.onnx"):
        check_onnx(path)  # checker + strict shape inference
        assert not onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_a_flipped_byte_in_any_bundle_file_is_refused(tiny_bundle: Path, tmp_path: Path, name: str) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)


_CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
from mssan_infer.bundle import load_bundle
from mssan_infer.spec import GRAPHS

bundle = load_bundle(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
sess = {g: ort.InferenceSession(str(bundle.graph_path(g, sys.argv[3])), \
providers=["CPUExecutionProvider"]) for g in GRAPHS}
def run(g, f):
    return dict(zip(GRAPHS[g].output_names, sess[g].run(None, {n: f[n] for n in GRAPHS[g].input_names})))
img = run("image_encoder", feeds)
txt = run("text_encoder", feeds)
s_ll = run("scorer", {**feeds, **img, **txt})["s_ll"]
final = img["img_stage1"] @ txt["txt_stage1"].T + s_ll
json.dump({"final": final.tolist(), "torch": "torch" in sys.modules,
           "ours": sorted(m for m in sys.modules if m.split(".")[0] in ("training", "export"))}, sys.stdout)
"""


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_run_in_a_fresh_process_with_runtime_dependencies_only(
    tiny_bundle: Path, model: MSSAN, tmp_path: Path, precision: str
) -> None:
    rng = np.random.default_rng(7)
    feeds = {
        **image_feeds(model.cfg, rng, [36, 3, 0, 20, 36], 36),
        **text_feeds(model.cfg, rng, [4, 1, 9], 9),
    }
    np.savez(tmp_path / "feeds.npz", **feeds)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_bundle), str(tmp_path / "feeds.npz"), precision],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["torch"] is False and out["ours"] == []
    t = to_torch(feeds)
    with torch.inference_mode():
        ref = model.score(
            model.encode_image(t["regions"], t["region_mask"]),
            model.encode_text(t["tokens"], t["token_mask"]),
        ).numpy()
    np.testing.assert_allclose(np.array(out["final"]), ref, rtol=0, atol=TOLERANCES[precision].atol)


# ---- fp16 --------------------------------------------------------------------------
def test_fp16_graphs_agree_with_pytorch_fp32_within_the_fp16_tolerance(
    tiny_bundle: Path, model: MSSAN
) -> None:
    report = validate_graphs(model, _paths(tiny_bundle, "fp16"), precision="fp16")
    assert report.passed, report.failures
    tol = TOLERANCES["fp16"]
    assert len(report.reranks) == 2
    assert all(
        r.topk_agreement is not None and r.topk_agreement >= tol.topk_agreement for r in report.reranks
    )
    worst = report.max_abs()
    assert max(worst.values()) <= tol.atol
    # fp16 rounding is really measured (the CPU provider would otherwise compute in fp32).
    assert worst["scorer"] > 1e-6
    assert json.loads((tiny_bundle / MANIFEST_FILE).read_text())["parity"]["fp16"]["passed"] is True
    strict = validate_graphs(model, _paths(tiny_bundle, "fp16"), precision="fp16", atol=1e-6, rerank=False)
    assert not strict.passed and any("scorer" in f for f in strict.failures)


def test_fp16_graphs_keep_softmax_norms_reductions_and_gru_in_fp32(tiny_bundle: Path) -> None:
    for name, spec in GRAPHS.items():
        model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_bundle / "fp16" / spec.file)))
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
        types.update({t.name: t.data_type for t in g.initializer})
        fp16_ops = set()
        for node in g.node:
            ins = [types.get(i) for i in node.input if i]
            if node.op_type in FP16_OPS:
                assert all(t == onnx.TensorProto.FLOAT16 for t in ins), node.name
                fp16_ops.add(node.op_type)
            elif node.op_type in ("Softmax", "Sqrt", "Div", "ReduceSum", "ReduceMean", "GRU", "Exp", "Log"):
                assert onnx.TensorProto.FLOAT16 not in ins, f"{name}: {node.op_type} {node.name} runs in fp16"
        assert fp16_ops == {"MatMul"}
        assert [types[i.name] for i in g.input] == [
            onnx.TensorProto.FLOAT if t.dtype == "float32" else onnx.TensorProto.INT64 for t in spec.inputs
        ]
        assert {types[o.name] for o in g.output} == {onnx.TensorProto.FLOAT}


# ---- arguments, output folder, CLI -----------------------------------------------------
def test_encoders_hold_the_mffm_gate_as_two_square_halves(tiny_bundle: Path, model: MSSAN) -> None:
    """The gate's global half is a product per item, not per local: no [2D, D] weight in any graph, and
    each encoder holds its gate as two [D, D] constants (beside its attention's)."""
    d = model.cfg.embed_size
    for name, spec in GRAPHS.items():
        shapes = [list(t.dims) for t in onnx.load(str(tiny_bundle / spec.file)).graph.initializer]
        assert [2 * d, d] not in shapes and [d, 2 * d] not in shapes, name
        if name in (IMAGE_ENCODER.name, TEXT_ENCODER.name):
            assert shapes.count([d, d]) == 3, name  # att, W_x, W_g (the tiny model has no other [D, D])


def test_tensorrt_without_tensorrt_fails_before_writing_anything(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        export_bundle(tiny_checkpoint, tmp_path / "b", tensorrt=True)
    assert list(tmp_path.iterdir()) == []


def test_an_out_folder_that_is_not_a_bundle_is_never_replaced_not_even_with_overwrite(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not an export bundle"):
            export_bundle(tiny_checkpoint, out, overwrite=overwrite)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="checkpoint"):
        export_bundle(tiny_checkpoint, tiny_checkpoint, overwrite=True)
    assert (tiny_checkpoint / "model.safetensors").is_file()
    (out / "precious.txt").unlink()
    export_bundle(tiny_checkpoint, out)  # an empty folder is written
    assert load_bundle(out).manifest.raw["verified"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_existing_bundle_is_replaced_only_with_overwrite_and_the_error_names_both_ways(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from export.__main__ import main

    out = tmp_path / "bundle"
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fp16", "--triton", "-q"]) == 0
    before = _tree(out)
    assert "triton/retriever/config.pbtxt" in before
    # the README's old second line: exporting again into the bundle would wipe triton/
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--tensorrt", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "already holds a bundle" in err and "Triton repository" in err
    assert "--overwrite" in err and "--add tensorrt" in err
    assert _tree(out) == before  # nothing lost
    with pytest.raises(ExportError, match="--overwrite"):
        export_bundle(tiny_checkpoint, out)
    assert _tree(out) == before
    with caplog.at_level("WARNING", logger="export.api"):
        assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--overwrite", "-q"]) == 0
    assert caplog.text.count("replacing the bundle") == 1 and "Triton repository" in caplog.text
    m = load_bundle(out).manifest.raw  # replaced as asked: no triton/, no fp16/
    assert "triton" not in m and "fp16_graphs" not in m and not (out / "triton").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp folder left


def test_add_triton_keeps_the_graphs_and_the_bundle_id_and_an_installed_index(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from export.__main__ import main
    from mssan_infer import Retriever

    out, index = tmp_path / "bundle", tmp_path / "index"
    export_bundle(tiny_checkpoint, out, fp16=True)
    before, bundle_id = _tree(out), load_bundle(out).bundle_id
    r = Retriever.load(out)
    r.add_images(np.abs(np.random.default_rng(0).standard_normal((4, 5, 24))).astype(np.float32))
    r.save(index)
    assert main(["--out", str(out), "--add", "triton", "--triton-index", str(index), "-q"]) == 0
    b = load_bundle(out)  # every file's sha256, the new ones included
    assert b.bundle_id == bundle_id and [a["part"] for a in b.manifest.raw["added"]] == ["triton"]
    after = _tree(out)
    kept = {k: v for k, v in before.items() if k != MANIFEST_FILE}
    assert {k: after[k] for k in kept} == kept  # graphs, fp16, vocabulary untouched
    assert b.manifest.raw["triton"]["bundle_id"] == bundle_id and b.manifest.raw["fp16_graphs"]
    assert _tree(out / "triton" / "retriever" / "1" / "index") == _tree(index)
    # adding triton again (other settings) replaces the repository and keeps its index
    assert main(["--out", str(out), "--add", "triton", "--triton-threads", "1", "-q"]) == 0
    m = load_bundle(out).manifest.raw
    assert m["triton"]["settings"]["threads"] == 1 and len(m["added"]) == 2
    assert _tree(out / "triton" / "retriever" / "1" / "index") == _tree(index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "index"]


def test_add_refuses_what_it_cannot_do_and_leaves_the_bundle_as_it_was(
    tmp_path: Path,
    tiny_bundle: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from export.__main__ import main

    out = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = _tree(out)
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    weights = bytearray((other / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (other / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no TensorRT here
    cases = [
        (["--add", "triton", "--int8"], "--int8"),
        (["--add", "triton", "--pixels", "--atol", "0.1"], "--pixels, --atol"),
        (["--add", "triton", "--triton"], "--add tensorrt --add triton"),
        (["--add", "triton", "--checkpoint", str(other)], "not the checkpoint"),
        (["--add", "tensorrt"], "tensorrt"),  # the package is missing: nothing is touched
    ]
    for args, match in cases:
        assert main(["--out", str(out), *args, "-q"]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and match in err, (args, err)
    assert _tree(out) == before
    assert main(["--out", str(tmp_path / "nothing"), "--add", "triton", "-q"]) == 1
    assert "not one" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    assert main(["--out", str(out), "-q"]) == 1  # no --checkpoint, no --add
    assert "--checkpoint DIR is required" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "other"]


def test_a_bundle_replace_killed_between_the_two_renames_is_put_back_by_the_next_load(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite replaces a bundle as atomically as an index: where directories cannot be exchanged, a
    process killed between the two renames leaves the old bundle aside, and the next load puts it back."""

    class Died(BaseException):
        pass

    out = export_bundle(tiny_checkpoint, tmp_path / "bundle")
    before = _tree(out)
    monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    real = os.replace

    def replace(src: object, dst: object) -> None:  # dies after the first rename of the swap (out aside)
        if Path(str(dst)) == out:
            raise Died
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)  # a dead process cleans nothing up
    with pytest.raises(Died):
        export_bundle(tiny_checkpoint, out, fp16=True, overwrite=True)
    monkeypatch.undo()
    assert not out.exists() and len(list(tmp_path.glob(".bundle.old-*"))) == 1
    b = load_bundle(out)  # puts the old bundle back
    assert _tree(out) == before and "fp16_graphs" not in b.manifest.raw
    for leftover in tmp_path.glob(".bundle.tmp-*"):  # the dead export's own folder
        shutil.rmtree(leftover)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_add_links_the_kept_files_reuses_their_sha256_and_never_writes_into_them(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import add_to_bundle
    from mssan_infer import Retriever

    out, index = tmp_path / "bundle", tmp_path / "index"
    export_bundle(tiny_checkpoint, out, fp16=True, triton=True)
    r = Retriever.load(out)
    r.add_images(np.abs(np.random.default_rng(0).standard_normal((4, 5, 24))).astype(np.float32))
    r.save(index)
    add_to_bundle(out, triton=_triton_settings(index=str(index)))
    kept = {k: v for k, v in _tree(out).items() if not k.startswith("triton/") or "/index/" in k}
    inodes = {k: (out / k).stat().st_ino for k in kept if k != MANIFEST_FILE}
    hashed: list[str] = []
    import export.manifest

    real_sha = export.manifest.sha256_file

    def counting(path: object, *a: object) -> str:
        hashed.append(Path(str(path)).name)
        return real_sha(path, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(export.manifest, "sha256_file", counting)
    add_to_bundle(out, triton=_triton_settings(threads=1))
    monkeypatch.undo()
    assert {k: (out / k).stat().st_ino for k in inodes} == inodes  # the same files: linked, not copied
    assert not {"image_encoder.onnx", "scorer.onnx", "vocab.json"} & set(hashed)  # sha256 reused
    assert not any(n.endswith(".npy") for n in hashed)  # the installed index: linked and not re-hashed
    b = load_bundle(out)  # every sha256 right
    assert b.manifest.raw["triton"]["settings"]["threads"] == 1
    # a failure after the steps wrote into the copy leaves the bundle byte for byte, the index included
    before = _tree(out)

    def fail(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("export.api.write_manifest", fail)
    with pytest.raises(OSError, match="No space"):
        add_to_bundle(out, triton=_triton_settings(threads=2))
    monkeypatch.undo()
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "index"]


def _triton_settings(**kw: object) -> object:
    from export.triton import TritonSettings

    return TritonSettings(**kw)  # type: ignore[arg-type]


def test_add_refuses_to_undo_a_concurrent_change_of_the_bundle(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another --add or --overwrite that finished while this --add ran is kept, never silently undone."""
    from export import add_to_bundle

    out = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    import export.api

    real = export.api.hash_files

    def concurrent(root: Path, *a: object, **k: object) -> dict[str, str]:
        m = json.loads((out / MANIFEST_FILE).read_text())
        (out / MANIFEST_FILE).write_text(json.dumps({**m, "added": [{"part": "someone else's"}]}))
        return real(root, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(export.api, "hash_files", concurrent)
    with pytest.raises(ExportError, match="changed while --add ran"):
        add_to_bundle(out, triton=True)
    monkeypatch.undo()
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["added"] == [{"part": "someone else's"}] and "triton" not in m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_manifests_are_read_with_the_versioned_reader(tmp_path: Path, tiny_bundle: Path) -> None:
    """A damaged or newer manifest is a BundleError that says what to do, not a JSON traceback."""
    from export.api import bundle_parts
    from export.triton import write_repository

    out = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert bundle_parts(out) == ["fp32 graphs", "fp16 graphs"]
    (out / MANIFEST_FILE).write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="upgrade mssan_infer"):
        write_repository(out)
    (out / MANIFEST_FILE).write_text("{ damaged")
    with pytest.raises(BundleError, match="not valid JSON.*re-export the bundle"):
        write_repository(out)
    assert bundle_parts(out) == []


def test_each_name_has_one_import_path() -> None:
    import export
    import export.errors
    import export.inputs

    assert not hasattr(export, "ParityError") and not hasattr(export.errors, "ParityError")
    assert not hasattr(export.inputs, "to_torch")  # export.runners.to_torch


def test_the_deployment_sequence_adds_engines_to_a_served_bundle_and_keeps_its_triton_repository(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's deployment block: export --fp16 --triton, then --add tensorrt --fp16 (TensorRT through
    the stand-in of tests/test_tensorrt.py)."""
    from export.__main__ import main

    from . import trt_standin

    out, ck = tmp_path / "bundle", str(tiny_checkpoint)
    small = ["--trt-profile", "B=1,4,16", "--trt-profile", "R=1,12,40", "--trt-profile", "Ni=1,8,24"]
    small += ["--trt-profile", "Nt=1,2,12"]
    with pytest.MonkeyPatch.context() as mp:
        trt_standin.install(mp)
        assert main(["--checkpoint", ck, "--out", str(out), "--triton", "-q"]) == 0
        plain = _tree(out)
        assert main(["--out", str(out), "--add", "tensorrt", "--fp16", *small, "-q"]) == 1
        assert "fp16 graphs" in capsys.readouterr().err  # exported without --fp16: said, nothing changed
        assert _tree(out) == plain
        assert main(["--checkpoint", ck, "--out", str(out), "--fp16", "--triton", "--overwrite", "-q"]) == 0
        served, bundle_id = _tree(out), load_bundle(out).bundle_id
        assert main(["--out", str(out), "--add", "tensorrt", "--fp16", *small, "-q"]) == 0
        b = load_bundle(out)
        assert b.bundle_id == bundle_id and set(b.manifest.raw["tensorrt"]["engines"]) == {"fp32", "fp16"}
        after = _tree(out)
        assert {k: after[k] for k in served if k != MANIFEST_FILE} == {
            k: v for k, v in served.items() if k != MANIFEST_FILE
        }  # triton/ and the graphs byte for byte
        assert b.manifest.raw["triton"] and (out / "tensorrt" / "scorer.fp16.plan").is_file()
        # a repository that serves the engines would go stale: --add tensorrt alone is refused then
        assert main(["--out", str(out), "--add", "triton", "--triton-backend", "tensorrt", "-q"]) == 0
        assert main(["--out", str(out), "--add", "tensorrt", *small, "-q"]) == 1
        assert "--add tensorrt --add triton" in capsys.readouterr().err
        assert (
            main(
                ["--out", str(out), "--add", "tensorrt", "--add", "triton", "--triton-backend", "tensorrt"]
                + small
                + ["-q"]
            )
            == 0
        )
        assert load_bundle(out).manifest.raw["triton"]["settings"]["backend"] == "tensorrt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_cli_help_lists_the_options(tmp_path: Path) -> None:
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for opt in (
        "--checkpoint",
        "--out",
        "--opset",
        "--fp16",
        "--atol",
        "--no-verify",
        "--overwrite",
        "--add",
        "--tensorrt",
        "--triton",
    ):
        assert opt in proc.stdout


def test_cli_no_verify_records_failed_parity_and_writes_verified_false(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    proc = _cli(
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "b"),
        "--atol",
        "1e-15",
        "--no-verify",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = load_bundle(tmp_path / "b").manifest.raw
    assert m["verified"] is False
    assert m["parity"]["fp32"]["passed"] is False and m["parity"]["fp32"]["failures"]
    assert "fp16_graphs" not in m


def test_cli_reports_a_typed_error_in_one_line_and_exits_1(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from export.__main__ import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--tensorrt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the same `error: <message>` line as the other two CLIs: no class name
    assert err[-1].startswith("error: ") and "tensorrt" in err[-1] and "Traceback" not in "".join(err)
    assert "BackendUnavailableError" not in err[-1]
    assert main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "BundleError" not in last and str(tmp_path / "missing") in last


def test_non_unit_level_weights_reach_the_manifest_and_both_stages_of_the_runtime(
    tmp_path: Path,
    tiny_checkpoint: Path,
) -> None:
    from mssan_infer import Retriever
    from training.checkpoint import save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    lams = {"lam_gg": 0.3, "lam_gl": 1.7, "lam_ll": 0.6}  # as dev selection may save them
    weighted = MSSAN(ModelConfig.from_dict({**ck.model.cfg.to_dict(), **lams}))
    weighted.load_state_dict(ck.model.state_dict())
    bundle = export_bundle(save_checkpoint(tmp_path / "ck", weighted, ck.tokenizer), tmp_path / "bundle")
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    assert {k: m["scoring"][k] for k in lams} == lams and all(
        m["model_config"][k] == v for k, v in lams.items()
    )

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(12, 5, ck.model.cfg.img_dim)).astype(np.float32)
    caps = ["a red dog on the beach", "the blue ball near a tree", "a man sits"]
    r = Retriever.load(bundle)
    r.add_images(feats)
    with torch.inference_mode():
        img = weighted.encode_image(torch.tensor(feats), torch.ones(12, 5))
        txt = weighted.encode_text(*map(torch.tensor, ck.tokenizer.encode_batch(caps)))
        s1 = (0.3 * weighted.s_gg(img, txt) + 1.7 * weighted.s_gl(img, txt)).numpy()  # [12, 3]
        full = s1 + 0.6 * weighted.s_ll(img, txt).numpy()
    for j, cap in enumerate(caps):
        for h in r.search(text=cap, k=12, rerank=0):  # stage 1 alone: exact lam_gg*S_gg + lam_gl*S_gl
            assert abs(h.stage1 - s1[int(h.id), j]) < 1e-5  # type: ignore[call-overload]
        hits = r.search(text=cap, k=12, rerank=12)
        assert [int(h.id) for h in hits] == np.argsort(-full[:, j], kind="stable").tolist()  # type: ignore[call-overload]
        assert all(abs(h.score - full[int(h.id), j]) < 1e-4 for h in hits)  # type: ignore[call-overload]
