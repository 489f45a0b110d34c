"""TensorRT: profiles, settings and manifest records; the build and the backend through a stand-in;
real engines.

Everything above the ``tensorrt``/``gpu``-marked section runs without TensorRT or a GPU.
The build (``export/tensorrt.py``) and the runtime (``mssan_infer/backends/tensorrt.py``)
are driven through ``tests/trt_standin.py``, a stand-in ``tensorrt`` + ``cudart`` that
records the builder flags, profiles and device calls and runs the plans in ONNX Runtime.
The marked tests build and run real engines; they skip, with the reason, where the
tensorrt package or a CUDA GPU is missing.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest

from mssan_infer import OnnxRuntimeOptions, SearchOptions, TensorRTOptions
from mssan_infer.errors import BackendUnavailableError, BundleError, InputError, MssanError, ParityError
from mssan_infer.spec import DEFAULT_PROFILES, GRAPHS, IMAGE_ENCODER, SCORER, TEXT_ENCODER, TOLERANCES

from . import trt_standin

DIMS = {"D": 32, "D2": 64, "Dv": 24}
HERE = Path(__file__).resolve().parent
# Small profiles keep the ONNX Runtime stand-in cheap; Ni/Nt below the rerank depth force chunking.
SMALL = {"B": (1, 4, 16), "R": (1, 12, 40), "L": (1, 8, 32), "Ni": (1, 8, 24), "Nt": (1, 2, 12)}


# ---- profiles ------------------------------------------------------------------------
def test_profiles_follow_the_graph_specs_with_fixed_dims_from_the_config() -> None:
    from export.tensorrt import derive_profiles, resolve_axes

    axes = resolve_axes()
    img = derive_profiles(IMAGE_ENCODER, DIMS, axes)
    b, r = DEFAULT_PROFILES["B"], DEFAULT_PROFILES["R"]
    assert img["regions"] == ((b[0], r[0], 24), (b[1], r[1], 24), (b[2], r[2], 24))
    assert img["region_mask"] == ((b[0], r[0]), (b[1], r[1]), (b[2], r[2]))
    sc = derive_profiles(SCORER, DIMS, axes)
    ni, nt, l = DEFAULT_PROFILES["Ni"], DEFAULT_PROFILES["Nt"], DEFAULT_PROFILES["L"]
    assert sc["img_gram"] == ((ni[0], r[0], r[0]), (ni[1], r[1], r[1]), (ni[2], r[2], r[2]))
    assert sc["txt_local"] == ((nt[0], l[0], 32), (nt[1], l[1], 32), (nt[2], l[2], 32))
    assert set(derive_profiles(TEXT_ENCODER, DIMS, axes)) == {"tokens", "token_mask"}


def test_profile_override_changes_only_its_axis() -> None:
    from export.tensorrt import derive_profiles, resolve_axes

    axes = resolve_axes({"L": (1, 8, 40)})
    assert axes["L"] == (1, 8, 40) and axes["B"] == DEFAULT_PROFILES["B"]
    txt = derive_profiles(TEXT_ENCODER, DIMS, axes)
    assert txt["tokens"][0][1] == 1 and txt["tokens"][1][1] == 8 and txt["tokens"][2][1] == 40


@pytest.mark.parametrize(
    "bad",
    [
        {"B": (0, 1, 2)},
        {"B": (4, 2, 8)},
        {"R": (1, 9, 8)},
        {"D": (1, 1, 1)},
        {"X": (1, 1, 1)},
        {"L": (1, 2)},
        {"L": "abc"},
        {"B": (2, 4, 8)},
    ],
)
def test_inconsistent_profile_overrides_are_refused(bad: dict) -> None:
    from export.errors import ExportError
    from export.tensorrt import TensorRTSettings, resolve_axes

    with pytest.raises(ExportError):
        resolve_axes(bad)
    with pytest.raises(ExportError):
        TensorRTSettings(profiles=bad)


def test_profile_override_text_syntax() -> None:
    from export.errors import ExportError
    from export.tensorrt import parse_profile_override

    assert parse_profile_override("Ni=1,50,500") == ("Ni", (1, 50, 500))
    for bad in ("Ni=1,50", "Ni:1,2,3", "Q=1,2,3", "B=3,2,1", "B=2,4,8"):
        with pytest.raises(ExportError):
            parse_profile_override(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"precisions": ("int8",)},
        {"num_profiles": 0},
        {"workspace_mib": 1},
        {"hardware_compatibility": "turing"},
        {"typing": "loose"},
        {"optimization_level": 9},
    ],
)
def test_bad_build_settings_are_refused(kwargs: dict) -> None:
    from export.errors import ExportError
    from export.tensorrt import TensorRTSettings

    with pytest.raises(ExportError):
        TensorRTSettings(**kwargs)


def test_bundle_dims_are_read_from_the_graphs(tiny_bundle: Path) -> None:
    from export.tensorrt import bundle_dims

    dims, vocab = bundle_dims(tiny_bundle)
    assert dims == DIMS and vocab > 4


def test_profiles_cover_the_bundles_longest_caption_and_pixel_grid(tiny_bundle: Path) -> None:
    from export.errors import ExportError
    from export.tensorrt import bundle_axes, bundle_shape

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    pixel = {
        **manifest,
        "tokenizer": {**manifest["tokenizer"], "max_len": 80},
        "preprocessing": {"image": {"grid": [14, 14]}},
    }  # a ResNet bundle at 448 px: 196 regions
    shape = bundle_shape(tiny_bundle, pixel)
    assert shape.needs() == {"L": 80, "R": 196} and shape.img_dim == 24
    axes = bundle_axes({}, shape.needs(), shape.typical())
    assert axes["R"] == (1, 196, 196) and axes["L"] == (1, DEFAULT_PROFILES["L"][1], 80)
    assert axes["B"] == DEFAULT_PROFILES["B"]
    assert bundle_axes({"R": (1, 196, 300)}, shape.needs(), shape.typical())["R"] == (1, 196, 300)
    with pytest.raises(ExportError, match=r"R=1,36,100 is too small.*196.*grid cells"):
        bundle_axes({"R": (1, 36, 100)}, shape.needs(), shape.typical())
    with pytest.raises(ExportError, match=r"L=1,8,40 is too small.*80.*max_len"):
        bundle_axes({"L": (1, 8, 40)}, shape.needs())
    regions = bundle_shape(tiny_bundle)  # the region bundle: max_len 32 fits the default
    assert bundle_axes({}, regions.needs(), regions.typical()) == {
        a: tuple(v) for a, v in DEFAULT_PROFILES.items()
    }


# ---- manifest record -------------------------------------------------------------------
def test_engine_record_lists_plans_with_sha256_profiles_limits_and_build_settings(tmp_path: Path) -> None:
    from export.tensorrt import TensorRTSettings, derive_profiles, engine_record, resolve_axes
    from mssan_infer.files import sha256_file
    from mssan_infer.names import plan_name

    settings = TensorRTSettings(
        profiles={"B": (1, 8, 16)}, version_compatible=True, hardware_compatibility="ampere_plus"
    )
    axes = resolve_axes(settings.profiles)
    engines = {}
    for precision in ("fp32", "fp16"):
        engines[precision] = {}
        for g in GRAPHS:
            p = tmp_path / plan_name(g, precision)
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(f"{precision}{g}".encode())
            engines[precision][g] = p
    profiles = {g: derive_profiles(spec, DIMS, axes) for g, spec in GRAPHS.items()}
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0", "device": 0}
    rec = engine_record(
        tmp_path,
        engines,
        profiles,
        settings,
        axes=axes,
        tensorrt_version="10.9.0",
        gpu=gpu,
        typing={"fp32": "strong", "fp16": "strong"},
        builder_flags={"fp16/scorer": {"TF32": False, "FP16": False}},
    )
    assert rec["tensorrt_version"] == "10.9.0" and rec["gpu"] == gpu
    assert rec["settings"]["version_compatible"] is True
    assert rec["settings"]["hardware_compatibility"] == "ampere_plus"
    assert rec["settings"]["profiles"] == {"B": [1, 8, 16]}  # as asked
    assert rec["profiles"]["B"] == [1, 8, 16] and rec["profiles"]["R"] == list(
        DEFAULT_PROFILES["R"]
    )  # as built
    assert rec["limits"] == {"B": 16, "R": 100, "L": 64, "Ni": 256, "Nt": 128}
    e = rec["engines"]["fp16"]["scorer"]
    assert e["file"] == "tensorrt/scorer.fp16.plan" and e["builder_flags"] == {"TF32": False, "FP16": False}
    assert e["sha256"] == sha256_file(tmp_path / "tensorrt/scorer.fp16.plan")
    assert rec["engines"]["fp32"]["image_encoder"]["file"] == "tensorrt/image_encoder.plan"
    assert e["profile_shapes"]["img_local"]["max"] == [
        DEFAULT_PROFILES["Ni"][2],
        DEFAULT_PROFILES["R"][2],
        32,
    ]
    assert rec["engines"]["fp32"]["image_encoder"]["profile_shapes"]["regions"]["opt"][0] == 8


def test_scorer_limits_are_read_from_the_manifest() -> None:
    from mssan_infer.backends.tensorrt import scorer_limits

    limits = {"B": 16, "R": 196, "L": 64, "Ni": 256, "Nt": 128}
    assert scorer_limits({"tensorrt": {"limits": limits}}) == {"Ni": 256, "Nt": 128, "R": 196, "L": 64}
    assert scorer_limits({"graphs": {}}) is None  # no engines: no limits
    for bad in ({"limits": {**limits, "Nt": 0}}, {"limits": {"B": 4}}, {"engines": {}}):
        with pytest.raises(BundleError, match="tensorrt.limits"):
            scorer_limits({"tensorrt": bad})


def _record(version: str = "10.9.0", cc: str = "9.0", name: str = "NVIDIA H100", **settings: object) -> dict:
    return {
        "tensorrt_version": version,
        "gpu": {"name": name, "compute_capability": cc},
        "settings": settings,
        "engines": {},
    }


def test_engines_from_another_tensorrt_version_are_refused_with_a_rebuild_hint() -> None:
    from mssan_infer.backends.tensorrt import TensorRTEngineMismatchError, _check_record

    here = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(TensorRTEngineMismatchError, match="TensorRT 10.9.0.*TensorRT 11.0.0.*--tensorrt"):
        _check_record(_record("10.9.0"), "11.0.0", here)
    _check_record(_record("10.9.0", version_compatible=True), "10.12.0", here)  # allowed: version compatible
    _check_record(_record("10.9.0"), "10.9.0", here)


def test_engines_for_another_gpu_are_refused_unless_hardware_compatible() -> None:
    from mssan_infer.backends.tensorrt import TensorRTEngineMismatchError, _check_record

    l4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    with pytest.raises(TensorRTEngineMismatchError, match="compute capability 9.0.*NVIDIA L4"):
        _check_record(_record(), "10.9.0", l4)
    _check_record(_record(hardware_compatibility="ampere_plus"), "10.9.0", l4)
    with pytest.raises(TensorRTEngineMismatchError):
        _check_record(_record(hardware_compatibility="same_compute_capability"), "10.9.0", l4)
    with pytest.warns(RuntimeWarning, match="built on NVIDIA H100"):
        _check_record(_record(), "10.9.0", {"name": "NVIDIA H100 NVL", "compute_capability": "9.0"})


# ---- missing packages ---------------------------------------------------------------------
def test_tensorrt_backend_without_tensorrt_says_what_to_install(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer import Retriever

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_tensorrt_backend_without_cuda_python_says_what_to_install(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from mssan_infer import Retriever

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="cuda-python"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_bundle_without_engines_says_how_to_build_them(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer import Retriever

    trt_standin.install(monkeypatch)
    with pytest.raises(BundleError, match="--tensorrt"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_tensorrt_export_step_fails_fast_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.tensorrt import make_step

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        make_step()


# ---- chunking beyond the profile (the numpy helpers every backend shares) ----------------------
@pytest.fixture(scope="module")
def ort_backend(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    from mssan_infer import OnnxRuntimeOptions, load_bundle
    from mssan_infer.backends import create_backend

    be = create_backend(OnnxRuntimeOptions(threads=1), load_bundle(tiny_bundle))
    yield be
    be.close()


def _scorer_feeds(be, rng: np.random.Generator, ni: int, nt: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    img = be.run(
        "image_encoder",
        {
            "regions": np.abs(rng.standard_normal((ni, 6, 24))).astype(np.float32),
            "region_mask": (np.arange(6)[None] < rng.integers(1, 7, (ni, 1))).astype(np.float32),
        },
    )
    tok = rng.integers(4, 20, (nt, 5))
    tmask = (np.arange(5)[None] < rng.integers(1, 6, (nt, 1))).astype(np.float32)
    txt = be.run("text_encoder", {"tokens": tok, "token_mask": tmask})
    mask = (np.arange(6)[None] < 3).astype(np.float32).repeat(ni, 0)
    return {
        "img_local": img["img_local"],
        "region_mask": mask,
        "img_gram": img["img_gram"],
        "txt_local": txt["txt_local"],
        "token_mask": tmask,
        "txt_gram": txt["txt_gram"],
    }


def test_inputs_beyond_the_profile_are_chunked_along_batch_axes(ort_backend) -> None:  # type: ignore[no-untyped-def]
    from mssan_infer.backends.base import run_chunked, split_axes

    assert set(split_axes(SCORER)) == {"Ni", "Nt"} and set(split_axes(IMAGE_ENCODER)) == {"B"}
    rng = np.random.default_rng(0)
    feeds = _scorer_feeds(ort_backend, rng, 7, 5)
    calls: list[tuple[int, int]] = []

    def run(f):  # type: ignore[no-untyped-def]
        calls.append((f["img_local"].shape[0], f["txt_local"].shape[0]))
        return ort_backend.run("scorer", f)

    whole = ort_backend.run("scorer", feeds)["s_ll"]
    got = run_chunked(SCORER, feeds, {"Ni": 3, "Nt": 2, "R": 36, "L": 64}, run)["s_ll"]
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got, whole, atol=1e-6)
    assert max(c[0] for c in calls) <= 3 and max(c[1] for c in calls) <= 2 and len(calls) == 9
    img = {"regions": np.ones((5, 4, 24), np.float32), "region_mask": np.ones((5, 4), np.float32)}
    out = run_chunked(IMAGE_ENCODER, img, {"B": 2}, lambda f: ort_backend.run("image_encoder", f))
    np.testing.assert_allclose(out["img_gram"], ort_backend.run("image_encoder", img)["img_gram"], atol=1e-6)


def test_lengths_beyond_the_profile_are_an_input_error_naming_the_axis(ort_backend) -> None:  # type: ignore[no-untyped-def]
    from mssan_infer.backends.base import run_chunked

    img = {"regions": np.ones((1, 40, 24), np.float32), "region_mask": np.ones((1, 40), np.float32)}
    with pytest.raises(InputError, match="axis R is 40.*maximum 36.*--trt-profile R="):
        run_chunked(IMAGE_ENCODER, img, {"B": 8, "R": 36}, lambda f: ort_backend.run("image_encoder", f))
    with pytest.raises(InputError, match="axis R"):
        run_chunked(
            IMAGE_ENCODER, {"regions": np.ones((1, 4, 24)), "region_mask": np.ones((1, 5))}, {}, lambda f: f
        )


# ---- every exported op is in TensorRT 10's ONNX support matrix -----------------------------------
# tests/tensorrt_onnx_ops.txt lists the op types TensorRT's ONNX parser supports for these graphs,
# copied from onnx-tensorrt docs/operators.md ("Operator Support Matrix", TensorRT 10.x). For ops
# whose row restricts an input to an initializer/constant, that input must be a constant here.
_CONSTANT_INPUT = {"ReduceSum": 1, "Squeeze": 1, "Unsqueeze": 1, "Slice": 3}


def _allowed_ops() -> set[str]:
    lines = (HERE / "tensorrt_onnx_ops.txt").read_text(encoding="utf-8").splitlines()
    return {line.split("|")[0].strip() for line in lines if line.strip() and not line.startswith("#")}


def _op_problems(model: onnx.ModelProto, allowed: set[str]) -> tuple[set[str], list[str]]:
    g = model.graph
    constants = {i.name for i in g.initializer} | {
        o for n in g.node if n.op_type == "Constant" for o in n.output
    }
    used: set[str] = set()
    problems: list[str] = []
    for node in g.node:
        used.add(node.op_type)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            problems.append(f"{node.op_type} {node.name} has a subgraph")
        if node.op_type not in allowed:
            problems.append(f"{node.op_type} ({node.name}) is not in tensorrt_onnx_ops.txt")
        pos = _CONSTANT_INPUT.get(node.op_type)
        if pos is not None and len(node.input) > pos and node.input[pos] and node.input[pos] not in constants:
            problems.append(f"{node.op_type} {node.name}: axes input {node.input[pos]} is not a constant")
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"LayerNormalization {node.name}: only the first output is supported")
        if node.op_type == "MaxPool" and any(
            a.name == "dilations" and set(a.ints) - {1} for a in node.attribute
        ):
            problems.append(f"MaxPool {node.name}: dilations other than 1")
        if node.op_type == "GRU":
            acts = [list(a.strings) for a in node.attribute if a.name == "activations"]
            if acts and len(acts[0]) == 4 and acts[0][:2] != acts[0][2:]:
                problems.append(f"GRU {node.name}: forward and reverse activations differ")
    return used, problems


def test_every_exported_op_is_in_the_tensorrt_10_support_matrix(
    tiny_bundle: Path, tiny_bert_bundle: Path, tmp_path: Path
) -> None:
    import torch

    from export.onnx import export_graph
    from export.pixels import PixelEncoderGraph
    from mssan_infer.spec import IMAGE_ENCODER_PIXELS
    from training.backbone import build_backbone
    from training.config import ModelConfig
    from training.model import MSSAN

    allowed = _allowed_ops()
    graphs = {
        f"{name}/{p}/{g}": onnx.load(str(b / (f"fp16/{s.file}" if p == "fp16" else s.file)))
        for name, b in (("bigru", tiny_bundle), ("transformer", tiny_bert_bundle))
        for p in ("fp32", "fp16")
        for g, s in GRAPHS.items()
    }
    assert json.loads((tiny_bert_bundle / "manifest.json").read_text())["model_config"]["agg"] == "lse"
    torch.manual_seed(0)
    model = MSSAN(ModelConfig(vocab_size=8, word_dim=8, embed_size=16, img_dim=256, max_len=8)).eval()
    pixels = {"pixels": np.zeros((1, 3, 64, 64), np.float32)}
    graphs["pixels"] = onnx.load(
        str(
            export_graph(
                PixelEncoderGraph(build_backbone("resnet-tiny"), model).eval(),
                IMAGE_ENCODER_PIXELS,
                pixels,
                tmp_path / "pixels.onnx",
            )
        )
    )
    used_all: set[str] = set()
    for name, m in graphs.items():
        used, problems = _op_problems(m, allowed)
        assert not problems, (name, problems)
        used_all |= used
    assert used_all == allowed  # the list is exactly what is used
    _, problems = _op_problems(
        onnx.helper.make_model(
            onnx.helper.make_graph([onnx.helper.make_node("NonZero", ["x"], ["y"])], "g", [], [])
        ),
        allowed,
    )
    assert problems == ["NonZero () is not in tensorrt_onnx_ops.txt"]  # an unsupported op is caught


# ---- the build, through the stand-in ------------------------------------------------------------
@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> trt_standin.StandIn:
    return trt_standin.install(monkeypatch)


def _copy(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest))


def test_engines_are_strongly_typed_with_tf32_cleared_and_their_profiles_recorded(
    tiny_bundle: Path, tmp_path: Path, standin: trt_standin.StandIn
) -> None:
    from export.tensorrt import TensorRTSettings, build_engines, derive_profiles, resolve_axes

    root = _copy(tiny_bundle, tmp_path / "b")
    rec = build_engines(root, TensorRTSettings(profiles=SMALL, num_profiles=3, parity=False))["tensorrt"]
    assert len(standin.builds) == 6  # 3 graphs x fp32/fp16
    axes = resolve_axes(SMALL)
    for build in standin.builds:
        assert build["flags"]["TF32"] is False and build["flags"]["FP16"] is False
        assert build["network_flags"] == 1 << 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
        graph = Path(build["onnx"]).stem
        want = {n: [list(x) for x in t] for n, t in derive_profiles(GRAPHS[graph], DIMS, axes).items()}
        assert build["profiles"] == [want] * 3  # every profile min/opt/max per input
    for table in rec["engines"].values():
        assert all(
            e["builder_flags"] == {"TF32": False, "FP16": False, "VERSION_COMPATIBLE": False}
            for e in table.values()
        )
    assert rec["limits"] == {a: v[2] for a, v in SMALL.items()} and "parity" not in rec


def test_a_builder_that_keeps_tf32_on_is_refused(
    tiny_bundle: Path, tmp_path: Path, standin: trt_standin.StandIn
) -> None:
    from export.errors import ExportError
    from export.tensorrt import TensorRTSettings, build_engines

    standin.tensorrt.Builder.create_builder_config = (  # type: ignore[union-attr]
        lambda self, real=standin.tensorrt.Builder.create_builder_config: _ignoring_clear(real(self))
    )  # type: ignore[union-attr]
    root = _copy(tiny_bundle, tmp_path / "b")
    with pytest.raises(ExportError, match="TF32"):
        build_engines(root, TensorRTSettings(profiles=SMALL, precisions=("fp32",)))
    assert sorted(p.name for p in root.iterdir()) == sorted(
        p.name for p in tiny_bundle.iterdir()
    )  # nothing left


def _ignoring_clear(config: Any) -> Any:
    config.clear_flag = lambda flag: None
    return config


def test_tf32_rounding_is_past_the_fp32_tolerance(
    tiny_bundle: Path, tmp_path: Path, standin: trt_standin.StandIn
) -> None:
    """Why TF32 is cleared: engines built with TensorRT's default flags (TF32 on; the stand-in rounds
    MatMul/Gemm inputs to 10-bit mantissas as TF32 does) fail the fp32 parity check."""
    from export.tensorrt import bundle_shape, derive_profiles, engine_parity, resolve_axes
    from mssan_infer.backends.tensorrt import TensorRTBackend
    from mssan_infer.names import plan_name

    trt = standin.tensorrt
    root = _copy(tiny_bundle, tmp_path / "b")
    axes = resolve_axes(SMALL)
    for graph, spec in GRAPHS.items():
        builder = trt.Builder(trt.Logger())  # type: ignore[union-attr]
        network = builder.create_network(0)
        trt.OnnxParser(network, None).parse_from_file(str(root / spec.file))  # type: ignore[union-attr]
        config = builder.create_builder_config()  # TF32 left as TensorRT sets it
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in derive_profiles(spec, DIMS, axes).items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        (root / plan_name(graph, "fp32")).parent.mkdir(exist_ok=True)
        (root / plan_name(graph, "fp32")).write_bytes(builder.build_serialized_network(network, config))
    assert all(b["flags"]["TF32"] for b in standin.builds)
    with TensorRTBackend({g: root / plan_name(g, "fp32") for g in GRAPHS}) as be:
        rep = engine_parity(root, be, axes, bundle_shape(root), "fp32")
    assert not rep.passed and max(rep.max_abs().values()) > TOLERANCES["fp32"].atol


def test_same_compute_capability_without_its_binding_is_a_typed_error(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export.tensorrt import TensorRTSettings, build_engines, make_step

    settings = TensorRTSettings(
        profiles=SMALL, precisions=("fp32",), hardware_compatibility="same_compute_capability", parity=False
    )
    trt_standin.install(monkeypatch, version="10.8.0", same_cc_binding=False)
    with pytest.raises(BackendUnavailableError, match=r"SAME_COMPUTE_CAPABILITY.*10\.8\.0.*10\.9"):
        make_step(settings)  # before the ONNX export starts
    s = trt_standin.install(monkeypatch, version="10.9.0")
    rec = build_engines(_copy(tiny_bundle, tmp_path / "b"), settings)["tensorrt"]
    assert {b["hardware_compatibility_level"] for b in s.builds} == {"SAME_COMPUTE_CAPABILITY"}
    assert rec["settings"]["hardware_compatibility"] == "same_compute_capability"


def test_a_wrong_engine_fails_parity_and_nothing_is_written(
    tiny_checkpoint: Path, tmp_path: Path, standin: trt_standin.StandIn
) -> None:
    from export import export_bundle
    from export.tensorrt import TensorRTSettings

    load = standin.tensorrt.Runtime.deserialize_cuda_engine  # type: ignore[union-attr]

    def off_by_a_tenth(self: Any, data: bytes) -> Any:  # the scorer engine adds 0.1
        eng = load(self, data)
        if eng is not None and eng.spec.name == "scorer":
            run = eng.session.run
            eng.session = type(
                "Session", (), {"run": lambda _s, names, feeds: [o + 0.1 for o in run(names, feeds)]}
            )()
        return eng

    standin.tensorrt.Runtime.deserialize_cuda_engine = off_by_a_tenth  # type: ignore[union-attr]
    with pytest.raises(
        ParityError, match=r"(?s)\[tensorrt fp32\] scorer\[.*s_ll: max abs diff 0\.1.*not added"
    ):
        export_bundle(
            tiny_checkpoint, tmp_path / "b", tensorrt=TensorRTSettings(profiles=SMALL, precisions=("fp32",))
        )
    assert list(tmp_path.iterdir()) == []


# ---- the whole path: export -> engines -> parity -> manifest -> Retriever, through the stand-in -----
@pytest.fixture(scope="module")
def standin_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``export --fp16 --tensorrt`` (and the tensorrt flavour of Triton) under the stand-in, which is
    removed after."""
    from export import export_bundle
    from export.tensorrt import TensorRTSettings
    from export.triton import TritonSettings

    with pytest.MonkeyPatch.context() as mp:
        trt_standin.install(mp)
        return export_bundle(
            tiny_checkpoint,
            tmp_path_factory.mktemp("trt-standin") / "bundle",
            fp16=True,
            tensorrt=TensorRTSettings(profiles=SMALL, num_profiles=2),
            triton=TritonSettings(backend="tensorrt"),
        )


def test_export_records_engines_limits_and_parity_in_the_schema_of_the_onnx_check(
    standin_bundle: Path,
) -> None:
    from mssan_infer import load_bundle

    m = load_bundle(standin_bundle).manifest.raw  # every engine hashed
    rec = m["tensorrt"]
    assert set(rec["engines"]) == {"fp32", "fp16"} and rec["limits"] == {a: v[2] for a, v in SMALL.items()}
    for precision, rep in rec["parity"].items():
        assert set(rep) == set(m["parity"][precision])  # one report schema
        assert rep["passed"] and rep["reference"] == "onnxruntime fp32 graphs"
        assert rep["tolerance"]["atol"] == TOLERANCES[precision].atol
        assert {c.split("_")[0] for c in rep["graphs"]["scorer"]} == {"min", "opt", "max"}
        assert (
            set(rep["rerank"]) == {"t2i", "i2t"} and rep["rerank"]["t2i"]["depth"] == 100
        )  # > Ni max: chunked
    assert max(rec["parity"]["fp16"]["max_abs"].values()) > 1e-6  # fp16 rounding is measured, not zero
    assert all(f in m["files"] for t in rec["engines"].values() for f in (e["file"] for e in t.values()))


def test_info_reports_tensorrt_parity_per_precision(standin_bundle: Path) -> None:
    from mssan_infer.cli.info import run_info

    info = run_info(standin_bundle)
    assert (
        set(info["tensorrt"]["parity"]) == {"fp32", "fp16"} and info["tensorrt"]["parity"]["fp32"]["passed"]
    )
    assert info["tensorrt"]["limits"]["Ni"] == SMALL["Ni"][2]
    assert set(info["parity"]) == {"fp32", "fp16", "query-scorers"}


def test_triton_tensorrt_flavour_follows_the_engines(standin_bundle: Path) -> None:
    from export.triton import validate_config

    repo = standin_bundle / "triton"
    for graph in ("image_encoder", "text_encoder"):
        cfg = validate_config(repo / graph / "config.pbtxt", standin_bundle / GRAPHS[graph].file)
        assert cfg.max_batch_size == SMALL["B"][2]  # the engines' B maximum, not the default 128
    for graph in GRAPHS:
        cfg = validate_config(repo / graph / "config.pbtxt")
        assert [list(g.profile) for g in cfg.instance_group] == [
            ["0"],
            ["1"],
        ]  # every profile, one instance each
        assert all(g.count == 1 and g.kind == 1 for g in cfg.instance_group)  # KIND_GPU
    ret = validate_config(repo / "retriever" / "config.pbtxt")
    assert json.loads(ret.parameters["scorer_limits"].string_value) == {"Ni": 24, "Nt": 12, "R": 40, "L": 32}


def test_tensorrt_retriever_matches_onnxruntime_through_the_standin(
    standin_bundle: Path, standin: trt_standin.StandIn
) -> None:
    from mssan_infer import Retriever

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((60, 36, 24))).astype(
        np.float32
    )  # 60 > B max 16, rerank 40 > Ni max 24
    caps = ["a red dog on the beach", "a blue ball near a tree", "man sits in a boat"] * 6
    for precision in ("fp32", "fp16"):
        tol = TOLERANCES[precision].atol
        with (
            Retriever.load(standin_bundle, OnnxRuntimeOptions(threads=1)) as ref,
            Retriever.load(standin_bundle, TensorRTOptions(precision=precision)) as r,
        ):
            for x in (ref, r):
                x.add_images(feats)
                x.add_texts(caps)
            for q in ("a red dog on the beach", "the cat runs"):
                a, b = ref.search(text=q, k=10, rerank=40), r.search(text=q, k=10, rerank=40)
                np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=tol)
            a, b = ref.search(image=feats[0], k=5, rerank=18), r.search(image=feats[0], k=5, rerank=18)
            np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=tol)
            with pytest.raises(InputError, match="axis R is 41.*--trt-profile R="):  # R beyond the engines'
                r.backend.run(
                    "image_encoder", {"regions": np.ones((1, 41, 24)), "region_mask": np.ones((1, 41))}
                )
    assert not standin.violations


def test_every_slot_switches_to_its_own_profile_and_a_refusal_is_typed(
    standin_bundle: Path, standin: trt_standin.StandIn
) -> None:
    from mssan_infer import load_bundle
    from mssan_infer.backends.tensorrt import TensorRTBackend

    bundle = load_bundle(standin_bundle)
    with TensorRTBackend.from_bundle(bundle) as be:
        assert be.graphs == sorted(GRAPHS) and str(be.device) == "cuda:0"
        assert be.limits("scorer") == {"Ni": 24, "Nt": 12, "R": 40, "L": 32}
    assert standin.profile_switches == [(1, 0)] * 3  # profile 0 is a new context's own
    with TensorRTBackend.from_bundle(bundle, TensorRTOptions(slots=1)):
        pass
    assert len(standin.profile_switches) == 3
    standin.refuse_profile_switch = True
    with pytest.raises(
        BackendUnavailableError, match="refused optimization profile 1.*Error in set optimization"
    ):
        TensorRTBackend.from_bundle(bundle)
    with pytest.raises(InputError, match="CUDA device"):
        TensorRTBackend({}, device="cpu")


def test_worker_threads_run_on_the_backends_gpu(
    standin_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer import Retriever

    s = trt_standin.install(monkeypatch, devices=2)
    rng = np.random.default_rng(1)
    feats = np.abs(rng.standard_normal((20, 12, 24))).astype(np.float32)
    with Retriever.load(
        standin_bundle, TensorRTOptions(device="cuda:1"), search=SearchOptions(gather_threads=1)
    ) as r:
        r.add_images(feats)
        main = threading.current_thread().name
        assert s.current == 0  # the caller's device is restored
        queries = ["a red dog", "a blue ball near a tree", "man sits in a boat"] * 3
        with ThreadPoolExecutor(3, thread_name_prefix="worker") as pool:
            hits = list(pool.map(lambda q: r.search(text=q, k=5, rerank=10), queries))
        assert all(len(h) == 5 for h in hits)
        worker = [
            (c, d)
            for t, c, d in s.calls
            if t != main and c in ("cudaMalloc", "cudaMemcpyAsync", "execute_async_v3")
        ]
        assert {c for c, _ in worker} == {"cudaMalloc", "cudaMemcpyAsync", "execute_async_v3"}
        assert {d for _, d in worker} == {1} and not s.violations
        # without making its device current, a worker thread would run on device 0
        eng = r.backend._engines["text_encoder"]  # type: ignore[attr-defined]
        feeds = {"tokens": np.full((1, 3), 4, np.int64), "token_mask": np.ones((1, 3), np.float32)}
        with ThreadPoolExecutor(1) as pool, pytest.raises(MssanError, match="execute_async_v3 failed"):
            pool.submit(eng.run, feeds).result()
        assert s.violations


def test_version_compatible_engines_load_with_host_code_allowed(
    tiny_bundle: Path, tmp_path: Path, standin: trt_standin.StandIn
) -> None:
    from export.manifest import hash_files, write_manifest
    from export.tensorrt import TensorRTSettings, build_engines
    from mssan_infer import load_bundle
    from mssan_infer.backends.tensorrt import TensorRTBackend, TensorRTEngineMismatchError

    root = _copy(tiny_bundle, tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(
        build_engines(
            root,
            TensorRTSettings(profiles=SMALL, precisions=("fp32",), version_compatible=True, parity=False),
        )
    )
    manifest["files"] = hash_files(root)
    write_manifest(root, manifest)
    assert all(b["flags"]["VERSION_COMPATIBLE"] for b in standin.builds)
    bundle = load_bundle(root)
    TensorRTBackend.from_bundle(bundle).close()  # the backend allows the embedded lean runtime
    record = {
        **bundle.manifest.raw["tensorrt"],
        "settings": {**bundle.manifest.raw["tensorrt"]["settings"], "version_compatible": False},
    }
    with pytest.raises(TensorRTEngineMismatchError, match="could not deserialize"):
        TensorRTBackend({g: root / e["file"] for g, e in record["engines"]["fp32"].items()}, record=record)


# ---- real engines (TensorRT + GPU only) ----------------------------------------------------------
def _need_gpu() -> None:
    trt = pytest.importorskip(
        "tensorrt", reason="TensorRT engine tests need the tensorrt package (pip install tensorrt)"
    )
    if getattr(trt, "__file__", None) is None:
        pytest.skip("tensorrt in sys.modules is the test stand-in, not TensorRT")
    from mssan_infer.backends.tensorrt import gpu_info

    try:
        gpu_info(0)
    except BackendUnavailableError as e:
        pytest.skip(f"TensorRT engine tests need a CUDA GPU: {e}")


@pytest.fixture(scope="module")
def trt_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    _need_gpu()
    from export import export_bundle
    from export.tensorrt import TensorRTSettings

    yield export_bundle(
        tiny_checkpoint,
        tmp_path_factory.mktemp("trt") / "bundle",
        fp16=True,
        tensorrt=TensorRTSettings(profiles={"B": (1, 8, 32), "Ni": (1, 50, 128)}),
    )


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_are_built_recorded_and_pass_parity(trt_bundle: Path) -> None:
    rec = json.loads((trt_bundle / "manifest.json").read_text())["tensorrt"]
    assert set(rec["engines"]) == {"fp32", "fp16"}
    assert all(r["passed"] for r in rec["parity"].values())
    assert rec["gpu"]["compute_capability"]
    assert all(e["builder_flags"]["TF32"] is False for t in rec["engines"].values() for e in t.values())


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_retriever_matches_onnxruntime(trt_bundle: Path, precision: str) -> None:
    from mssan_infer import Retriever

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((60, 36, 24))).astype(np.float32)
    caps = ["a red dog on the beach", "a blue ball near a tree", "man sits in a boat"] * 4
    tol = TOLERANCES[precision].atol
    with (
        Retriever.load(trt_bundle) as ref,
        Retriever.load(trt_bundle, TensorRTOptions(precision=precision)) as r,
    ):
        for x in (ref, r):
            x.add_images(feats)
            x.add_texts(caps)
        for q in ("a red dog on the beach", "the cat runs"):
            a, b = ref.search(text=q, k=10, rerank=60), r.search(text=q, k=10, rerank=60)
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=tol)
        a, b = ref.search(image=feats[0], k=5, rerank=12), r.search(image=feats[0], k=5, rerank=12)
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=tol)
