"""TensorRT: profiles from the graph specs, manifest records, missing-package errors, chunking, fp16 parity.

Everything above the ``tensorrt``/``gpu``-marked section runs without TensorRT or a
GPU. The marked tests build and run real engines; they skip, with the reason,
where the tensorrt package or a CUDA GPU is missing.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mssan_infer.errors import BackendUnavailableError, BundleError, InputError
from mssan_infer.spec import DEFAULT_PROFILES, GRAPHS, IMAGE_ENCODER, SCORER, TEXT_ENCODER, TOLERANCES

DIMS = {"D": 32, "D2": 64, "Dv": 24}


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

    axes = resolve_axes({"L": (2, 8, 40)})
    assert axes["L"] == (2, 8, 40) and axes["B"] == DEFAULT_PROFILES["B"]
    txt = derive_profiles(TEXT_ENCODER, DIMS, axes)
    assert txt["tokens"][0][1] == 2 and txt["tokens"][1][1] == 8 and txt["tokens"][2][1] == 40


@pytest.mark.parametrize("bad", [{"B": (0, 1, 2)}, {"B": (4, 2, 8)}, {"R": (1, 9, 8)}, {"D": (1, 1, 1)},
                                 {"X": (1, 1, 1)}, {"L": (1, 2)}, {"L": "abc"}])
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
    for bad in ("Ni=1,50", "Ni:1,2,3", "Q=1,2,3", "B=3,2,1"):
        with pytest.raises(ExportError):
            parse_profile_override(bad)


@pytest.mark.parametrize("kwargs", [{"precisions": ("int8",)}, {"num_profiles": 0}, {"workspace_mib": 1},
                                    {"hardware_compatibility": "turing"}, {"typing": "loose"}, {"optimization_level": 9}])
def test_bad_build_settings_are_refused(kwargs: dict) -> None:
    from export.errors import ExportError
    from export.tensorrt import TensorRTSettings

    with pytest.raises(ExportError):
        TensorRTSettings(**kwargs)


def test_bundle_dims_are_read_from_the_graphs(tiny_bundle: Path) -> None:
    from export.tensorrt import bundle_dims

    dims, vocab = bundle_dims(tiny_bundle)
    assert dims == DIMS and vocab > 4


# ---- manifest record -------------------------------------------------------------------
def test_engine_record_lists_plans_with_sha256_profiles_and_build_settings(tmp_path: Path) -> None:
    from export.tensorrt import TensorRTSettings, derive_profiles, engine_record, resolve_axes
    from mssan_infer.backends.tensorrt import plan_name
    from mssan_infer.spec import sha256_file

    settings = TensorRTSettings(profiles={"B": (1, 8, 16)}, version_compatible=True, hardware_compatibility="ampere_plus")
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
    rec = engine_record(tmp_path, engines, profiles, settings, tensorrt_version="10.9.0", gpu=gpu,
                        typing={"fp32": "strong", "fp16": "strong"})
    assert rec["tensorrt_version"] == "10.9.0" and rec["gpu"] == gpu
    assert rec["settings"]["version_compatible"] is True
    assert rec["settings"]["hardware_compatibility"] == "ampere_plus"
    assert rec["settings"]["profiles"]["B"] == [1, 8, 16]
    e = rec["engines"]["fp16"]["scorer"]
    assert e["file"] == "tensorrt/scorer.fp16.plan"
    assert e["sha256"] == sha256_file(tmp_path / "tensorrt/scorer.fp16.plan")
    assert rec["engines"]["fp32"]["image_encoder"]["file"] == "tensorrt/image_encoder.plan"
    assert e["profile_shapes"]["img_local"]["max"] == [DEFAULT_PROFILES["Ni"][2], DEFAULT_PROFILES["R"][2], 32]
    assert rec["engines"]["fp32"]["image_encoder"]["profile_shapes"]["regions"]["opt"][0] == 8


def _record(version: str = "10.9.0", cc: str = "9.0", name: str = "NVIDIA H100", **settings: object) -> dict:
    return {"tensorrt_version": version, "gpu": {"name": name, "compute_capability": cc}, "settings": settings,
            "engines": {}}


def test_engines_from_another_tensorrt_version_are_refused_with_a_rebuild_hint() -> None:
    from mssan_infer.backends.tensorrt import TensorRTEngineMismatchError, _check_record

    here = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(TensorRTEngineMismatchError, match="TensorRT 10.9.0.*TensorRT 11.0.0.*--tensorrt"):
        _check_record(_record("10.9.0"), "11.0.0", here)
    _check_record(_record("10.9.0", version_compatible=True), "10.12.0", here)   # allowed: version compatible
    _check_record(_record("10.9.0"), "10.9.0", here)


def test_engines_for_another_gpu_are_refused_unless_hardware_compatible() -> None:
    from mssan_infer.backends.tensorrt import TensorRTEngineMismatchError, _check_record

    l4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    with pytest.raises(TensorRTEngineMismatchError, match="compute capability 9.0.*NVIDIA L4"):
        _check_record(_record(), "10.9.0", l4)
    _check_record(_record(hardware_compatibility="ampere_plus"), "10.9.0", l4)
    with pytest.warns(RuntimeWarning, match="built on NVIDIA H100"):
        _check_record(_record(), "10.9.0", {"name": "NVIDIA H100 NVL", "compute_capability": "9.0"})


# ---- missing packages ---------------------------------------------------------------------
def test_tensorrt_backend_without_tensorrt_says_what_to_install(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mssan_infer import Retriever

    monkeypatch.setitem(sys.modules, "tensorrt", None)          # import tensorrt -> ImportError
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_tensorrt_backend_without_cuda_python_says_what_to_install(tiny_bundle: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from mssan_infer import Retriever

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="cuda-python"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_bundle_without_engines_says_how_to_build_them(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from mssan_infer import Retriever

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    cuda = types.ModuleType("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=cuda))
    with pytest.raises(BundleError, match="--tensorrt"):
        Retriever.load(tiny_bundle, backend="tensorrt")


def test_tensorrt_export_step_fails_fast_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.tensorrt import make_step

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        make_step()


# ---- chunking beyond the profile ------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_backend(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    from mssan_infer import load_bundle
    from mssan_infer.backends import create_backend

    be = create_backend("onnxruntime", load_bundle(tiny_bundle), threads=1)
    yield be
    be.close()


def _scorer_feeds(be, rng: np.random.Generator, ni: int, nt: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    img = be.run("image_encoder", {"regions": np.abs(rng.standard_normal((ni, 6, 24))).astype(np.float32),
                                   "region_mask": (np.arange(6)[None] < rng.integers(1, 7, (ni, 1))).astype(np.float32)})
    tok = rng.integers(4, 20, (nt, 5))
    tmask = (np.arange(5)[None] < rng.integers(1, 6, (nt, 1))).astype(np.float32)
    txt = be.run("text_encoder", {"tokens": tok, "token_mask": tmask})
    mask = (np.arange(6)[None] < 3).astype(np.float32).repeat(ni, 0)
    return {"img_local": img["img_local"], "region_mask": mask, "img_gram": img["img_gram"],
            "txt_local": txt["txt_local"], "token_mask": tmask, "txt_gram": txt["txt_gram"]}


def test_inputs_beyond_the_profile_are_chunked_along_batch_axes(ort_backend) -> None:  # type: ignore[no-untyped-def]
    from mssan_infer.backends.tensorrt import run_chunked, split_axes

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
    from mssan_infer.backends.tensorrt import run_chunked

    img = {"regions": np.ones((1, 40, 24), np.float32), "region_mask": np.ones((1, 40), np.float32)}
    with pytest.raises(InputError, match="axis R is 40.*maximum 36.*--trt-profile R="):
        run_chunked(IMAGE_ENCODER, img, {"B": 8, "R": 36}, lambda f: ort_backend.run("image_encoder", f))
    with pytest.raises(InputError, match="axis R"):
        run_chunked(IMAGE_ENCODER, {"regions": np.ones((1, 4, 24)), "region_mask": np.ones((1, 5))}, {}, lambda f: f)


# ---- parity machinery, on ONNX Runtime fp16 graphs (what a TensorRT fp16 engine computes) -----
def test_fp16_graphs_pass_the_engine_parity_check_at_fp16_tolerance(tiny_bundle: Path) -> None:
    from export.tensorrt import bundle_dims, check_engine_parity, resolve_axes
    from export.validate import make_session

    dims, vocab = bundle_dims(tiny_bundle)
    sessions = {g: make_session(tiny_bundle / "fp16" / spec.file, "fp16") for g, spec in GRAPHS.items()}
    runners = {g: (lambda f, g=g: dict(zip(GRAPHS[g].output_names, sessions[g].run(None, dict(f)))))
               for g in GRAPHS}
    axes = resolve_axes({"B": (1, 4, 16), "Ni": (1, 8, 16), "Nt": (1, 1, 8), "R": (1, 12, 36), "L": (1, 8, 32)})
    rep = check_engine_parity(tiny_bundle, runners, axes, dims, vocab, "fp16")
    assert rep["passed"], rep["failures"]
    assert rep["tolerance"] == TOLERANCES["fp16"].atol
    assert 0 < max(rep["max_abs"].values()) <= TOLERANCES["fp16"].atol     # fp16 rounding is measured, not zero
    assert {c["case"].split("[")[1].split()[0] for c in rep["cases"]} == {"min", "opt", "max"}


def test_engine_parity_check_reports_a_wrong_engine(tiny_bundle: Path) -> None:
    from export.tensorrt import bundle_dims, check_engine_parity, resolve_axes
    from export.validate import make_session

    dims, vocab = bundle_dims(tiny_bundle)
    sessions = {g: make_session(tiny_bundle / spec.file) for g, spec in GRAPHS.items()}

    def run(g: str, f):  # type: ignore[no-untyped-def]
        out = dict(zip(GRAPHS[g].output_names, sessions[g].run(None, dict(f))))
        if g == "scorer":
            out["s_ll"] = out["s_ll"] + 0.1                     # a broken engine
        return out

    runners = {g: (lambda f, g=g: run(g, f)) for g in GRAPHS}
    rep = check_engine_parity(tiny_bundle, runners, resolve_axes({"B": (1, 2, 4), "Ni": (1, 2, 4)}), dims, vocab, "fp32")
    assert not rep["passed"] and all("scorer" in f and "s_ll" in f for f in rep["failures"])


# ---- real engines (TensorRT + GPU only) ----------------------------------------------------------
def _need_gpu() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT engine tests need the tensorrt package (pip install tensorrt)")
    from mssan_infer.backends.tensorrt import gpu_info

    try:
        gpu_info(0)
    except BackendUnavailableError as e:
        pytest.skip(f"TensorRT engine tests need a CUDA GPU: {e}")


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_gpu()
    import json

    from export.manifest import hash_files, write_manifest
    from export.tensorrt import TensorRTSettings, build_engines

    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(build_engines(root, TensorRTSettings(profiles={"B": (1, 8, 32), "Ni": (1, 50, 128)})))
    manifest["files"] = hash_files(root)
    write_manifest(root, manifest)
    return root


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_are_built_recorded_and_pass_parity(trt_bundle: Path) -> None:
    import json

    rec = json.loads((trt_bundle / "manifest.json").read_text())["tensorrt"]
    assert set(rec["engines"]) == {"fp32", "fp16"}
    assert all(r["passed"] for r in rec["parity"].values())
    assert rec["gpu"]["compute_capability"]


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_retriever_matches_onnxruntime(trt_bundle: Path, precision: str) -> None:
    from mssan_infer import Retriever

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((60, 36, 24))).astype(np.float32)
    caps = ["a red dog on the beach", "a blue ball near a tree", "man sits in a boat"] * 4
    tol = TOLERANCES[precision].atol
    with Retriever.load(trt_bundle) as ref, Retriever.load(trt_bundle, backend="tensorrt", precision=precision) as r:
        for x in (ref, r):
            x.add_images(feats)
            x.add_texts(caps)
        for q in ("a red dog on the beach", "the cat runs"):
            a, b = ref.search(text=q, k=10, rerank=60), r.search(text=q, k=10, rerank=60)
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=tol)
        a, b = ref.search(image=feats[0], k=5, rerank=12), r.search(image=feats[0], k=5, rerank=12)
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=tol)
