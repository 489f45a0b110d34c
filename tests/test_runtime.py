"""Runtime packaging: no torch on import, backend registry, provider selection, lazy optional packages."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np
import pytest

import mssan_infer
from mssan_infer import OnnxRuntimeOptions
from mssan_infer.backends import create_backend, register_backend
from mssan_infer.backends.base import Backend
from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend, select_providers
from mssan_infer.errors import BackendUnavailableError, InputError
from mssan_infer.options import BackendOptions, Device, parse_device
from mssan_infer.spec import QUERY_SCORERS

ROOT = Path(__file__).resolve().parents[1]


def test_import_mssan_infer_does_not_import_torch_or_optional_packages() -> None:
    code = (
        "import json, sys; import mssan_infer, mssan_infer.__main__; "
        "from mssan_infer import Retriever, MemoryGallery; "
        "print(json.dumps(sorted(m for m in ('torch', 'training', 'export', 'faiss', 'tensorrt', "
        "'tritonclient', "
        "'onnxruntime') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_runtime_module_imports_in_a_clean_interpreter_without_torch() -> None:
    root = ROOT / "mssan_infer"
    mods = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )
    code = (
        "import importlib, sys; [importlib.import_module(m) for m in %r]; print('torch' in sys.modules)"
        % mods
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_is_exported_and_typed() -> None:
    for name in (
        "Retriever",
        "Hit",
        "Encoded",
        "MemoryGallery",
        "load_bundle",
        "MssanError",
        "register_backend",
    ):
        assert name in mssan_infer.__all__ and hasattr(mssan_infer, name)
    assert (ROOT / "mssan_infer" / "py.typed").is_file()


def test_hit_is_a_small_frozen_dataclass() -> None:
    h = mssan_infer.Hit("a", 1.5, 1.0)
    with pytest.raises(AttributeError):
        h.score = 2.0  # type: ignore[misc]
    assert h == mssan_infer.Hit("a", 1.5, 1.0)


def test_unknown_backend_name_is_a_clear_input_error() -> None:
    with pytest.raises(InputError, match="unknown backend 'onnx'.*onnxruntime"):
        create_backend("onnx", None)  # type: ignore[arg-type]


def test_backend_whose_package_is_missing_says_what_to_install() -> None:
    register_backend("needs-missing-pkg", "mssan_infer_no_such_pkg.runner:Runner", replace=True)
    with pytest.raises(BackendUnavailableError, match="not available|install"):
        create_backend("needs-missing-pkg", None)  # type: ignore[arg-type]


def test_backend_module_that_imports_a_missing_package_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mssan_fake_backend.py").write_text("import mssan_fake_gpu_runtime\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_backend("fake", "mssan_fake_backend:Backend.from_bundle", replace=True)
    with pytest.raises(BackendUnavailableError, match="pip install mssan_fake_gpu_runtime"):
        create_backend("fake", None)  # type: ignore[arg-type]


def test_tensorrt_and_triton_are_registered_names() -> None:
    assert {"onnxruntime", "tensorrt", "triton"} <= set(mssan_infer.available_backends())


def test_tensorrt_without_its_package_is_a_typed_error(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(mssan_infer.MssanError):
        mssan_infer.Retriever.load(_bundle(tiny_checkpoint, tmp_path_factory), backend="tensorrt")


def test_register_backend_refuses_to_shadow_a_name() -> None:
    with pytest.raises(InputError, match="already registered"):
        register_backend("onnxruntime", lambda *a, **k: None)  # type: ignore[arg-type, return-value]


class Recorder(Backend):
    """A backend that records what reaches ``_run`` and delegates to ONNX Runtime."""

    name = "recorder"

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        super().__init__("cpu")
        self.inner = inner
        self.seen: list[tuple[str, list[str]]] = []
        for g in inner.graphs:
            self._add_graph(g, inner.fixed_dims(g))

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append((graph, sorted(feeds)))
        return self.inner.run(graph, feeds)

    def _close(self) -> None:
        self.inner.close()


def test_custom_backend_plugs_into_retriever_load(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A backend registered by name is what Retriever.load uses (the tensorrt/triton path)."""
    from mssan_infer.bundle import Bundle

    made: dict[str, object] = {}

    @dataclasses.dataclass(frozen=True)
    class Threaded(BackendOptions):
        backend: ClassVar[str] = "recorder"

    def factory(bundle: Bundle, options: BackendOptions) -> Recorder:
        made["kw"] = dataclasses.asdict(options)
        made["backend"] = be = Recorder(OnnxRuntimeBackend.from_bundle(bundle))
        return be

    register_backend("recorder", factory, replace=True)
    try:
        bundle = _bundle(tiny_checkpoint, tmp_path_factory)
        r = mssan_infer.Retriever.load(bundle, Threaded(threads=1))
        r.add_images(np.ones((2, 3, 24), np.float32))
        r.search(
            text="a dog", k=1, rerank=1
        )  # one of two reranked: the query scorer (all: the all-pairs one)
        r.search(text="a dog", k=1, rerank=2)
    finally:
        from mssan_infer.backends import _REGISTRY

        _REGISTRY.pop("recorder", None)
    assert made["kw"] == {"device": "cpu", "precision": "fp32", "threads": 1}
    seen = [g for g, _ in made["backend"].seen]  # type: ignore[attr-defined]
    assert set(seen) >= {"image_encoder", "text_encoder", "scorer_t2i", "scorer"}
    assert seen.index("scorer_t2i") < seen.index("scorer")


def test_a_factory_that_returns_no_backend_is_refused(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    register_backend("duck", lambda bundle, options: object(), replace=True)  # type: ignore[arg-type, return-value]
    try:
        with pytest.raises(mssan_infer.MssanError, match="not a mssan_infer.Backend"):
            mssan_infer.Retriever.load(_bundle(tiny_checkpoint, tmp_path_factory), backend="duck")
    finally:
        from mssan_infer.backends import _REGISTRY

        _REGISTRY.pop("duck", None)


@pytest.mark.parametrize(
    "graph, feeds, match",
    [
        (
            "image_encoder",
            {"regions": np.ones((3, 24), np.float32), "region_mask": np.ones((1, 3), np.float32)},
            r"regions must be \[B, R, Dv\] \(rank 3\)",
        ),
        (
            "image_encoder",
            {"regions": np.ones((1, 3, 25), np.float32), "region_mask": np.ones((1, 3), np.float32)},
            "axis Dv must be 24",
        ),
        (
            "image_encoder",
            {"regions": np.ones((1, 3, 24), np.float32), "region_mask": np.ones((1, 4), np.float32)},
            "axis R is 3 in regions and 4 in region_mask",
        ),
        (
            "text_encoder",
            {"tokens": np.ones((1, 3), np.float32), "token_mask": np.ones((1, 3), np.float32)},
            "integer token ids",
        ),
        (
            "text_encoder",
            {"tokens": np.array([["a", "b"]]), "token_mask": np.ones((1, 2), np.float32)},
            "integer token ids",
        ),
        ("scorer", {"img_local": np.zeros((1, 1, 32), np.float32)}, "takes inputs"),
        ("decoder", {}, "unknown graph"),
    ],
)
def test_feeds_are_checked_once_against_the_spec_before_any_backend_runs(
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
    graph: str,
    feeds: dict[str, np.ndarray],
    match: str,
) -> None:
    from mssan_infer.bundle import load_bundle

    be = Recorder(
        OnnxRuntimeBackend.from_bundle(
            load_bundle(_bundle(tiny_checkpoint, tmp_path_factory)), OnnxRuntimeOptions(threads=1)
        )
    )
    with be:
        with pytest.raises(InputError, match=match):
            be.run(graph, feeds)
        assert be.seen == []  # nothing reached the runtime
        ok = be.run("image_encoder", {"regions": np.ones((2, 3, 24)), "region_mask": np.ones((2, 3), bool)})
        assert ok["img_local"].dtype == np.float32 and ok["img_local"].shape == (2, 3, 32)  # cast, then run
    with pytest.raises(mssan_infer.MssanError, match="closed"):
        be.run("image_encoder", {"regions": np.ones((1, 3, 24)), "region_mask": np.ones((1, 3))})


def test_a_backend_that_breaks_the_output_contract_is_caught(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from mssan_infer.bundle import load_bundle

    class Half(Recorder):
        def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v.astype(np.float16) for k, v in super()._run(graph, feeds).items()}

    class Short(Recorder):
        def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v[:1] for k, v in super()._run(graph, feeds).items()}

    b = load_bundle(_bundle(tiny_checkpoint, tmp_path_factory))
    feeds = {"regions": np.ones((2, 3, 24), np.float32), "region_mask": np.ones((2, 3), np.float32)}
    with (
        Half(OnnxRuntimeBackend.from_bundle(b)) as be,
        pytest.raises(mssan_infer.MssanError, match="float16, not float32"),
    ):
        be.run("image_encoder", feeds)
    with (
        Short(OnnxRuntimeBackend.from_bundle(b)) as be,
        pytest.raises(mssan_infer.MssanError, match=r"shape \(1,"),
    ):
        be.run("image_encoder", feeds)


def test_the_runtimes_own_calls_skip_the_feed_checks_on_onnx_runtime_only(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search checks its query once where it comes in: the encoder and scorer runs it makes on feeds it
    built go through ``run_prepared``, which ONNX Runtime runs straight (same outputs as ``run``), and any
    other backend runs as ``run``, checks included."""
    import mssan_infer.backends.base as base
    from mssan_infer.bundle import load_bundle

    b = load_bundle(tiny_bundle)
    feeds = {"regions": np.ones((2, 3, 24), np.float32), "region_mask": np.ones((2, 3), np.float32)}
    with OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(threads=1)) as ort_be:
        checked, prepared = ort_be.run("image_encoder", feeds), ort_be.run_prepared("image_encoder", feeds)
        assert checked.keys() == prepared.keys()
        for name in checked:
            np.testing.assert_array_equal(checked[name], prepared[name])
    with pytest.raises(mssan_infer.MssanError, match="closed"):
        ort_be.run_prepared("image_encoder", feeds)
    with Recorder(OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(threads=1))) as rec:
        with pytest.raises(InputError, match="axis R is 3 in regions and 4 in region_mask"):
            rec.run_prepared("image_encoder", {**feeds, "region_mask": np.ones((2, 4), np.float32)})
        assert rec.seen == []  # the base class checks, as run does

    calls = []
    real = base.check_feeds

    def counted(*a: object, **kw: object) -> object:
        calls.append(a[0])
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(base, "check_feeds", counted)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((5, 24))
    with mssan_infer.Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1)) as r:
        r.add_images(rng.standard_normal((6, 5, 24)).astype(np.float32))
        r.add_texts(["a dog", "a cat", "a dog and a cat"])
        calls.clear()
        got = [r.search(text="a dog", k=3), r.search(image=image, k=2)]
        assert calls == []  # no per-run feed checks on the query path
        rec = Recorder(OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(threads=1)))
        with mssan_infer.Retriever(r.bundle, rec, r.tokenizer, r.images, r.texts) as checked:
            want = [checked.search(text="a dog", k=3), checked.search(image=image, k=2)]
        assert calls and {g for g, _ in rec.seen} >= {"text_encoder", "image_encoder"}
    for g, w in zip(got, want):  # the same hits and scores as with every run checked
        assert [h.id for h in g] == [h.id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=1e-6, atol=1e-6)


def test_an_onnx_runtime_graph_whose_output_is_not_a_float_is_refused_at_load(tmp_path: Path) -> None:
    """``run_prepared`` hands ONNX Runtime's outputs back unchecked: their types are checked at load."""
    from onnx import TensorProto, helper, save

    from mssan_infer.errors import BundleError

    nodes = [
        helper.make_node("Cast", ["token_mask"], ["txt_stage1"], to=TensorProto.INT64),
        helper.make_node("Identity", ["token_mask"], ["txt_local"]),
        helper.make_node("Identity", ["token_mask"], ["txt_gram"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "L"]),
            helper.make_tensor_value_info("token_mask", TensorProto.FLOAT, ["B", "L"]),
        ],
        [
            helper.make_tensor_value_info("txt_stage1", TensorProto.INT64, None),
            helper.make_tensor_value_info("txt_local", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("txt_gram", TensorProto.FLOAT, None),
        ],
    )
    path = tmp_path / "text_encoder.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(BundleError, match=r"output txt_stage1 is tensor\(int64\), the spec says float32"):
        OnnxRuntimeBackend({"text_encoder": path}, OnnxRuntimeOptions(threads=1))


def test_one_device_parser_for_every_backend() -> None:
    import pickle

    assert parse_device("cpu") == Device("cpu") == "cpu" and parse_device("CUDA") == "cuda:0"
    cuda3 = parse_device(" cuda:3")
    assert (
        cuda3 == Device("cuda", 3)
        and (cuda3.kind, cuda3.ordinal) == ("cuda", 3)
        and parse_device(cuda3) is cuda3
    )
    assert pickle.loads(pickle.dumps(cuda3)) == cuda3 and isinstance(
        pickle.loads(pickle.dumps(cuda3)), Device
    )
    for bad in ("gpu", "cuda:", "cuda:-1", "cpu:0", "", 0):
        with pytest.raises(InputError, match="device"):
            parse_device(bad)  # type: ignore[arg-type]
    for kind, ordinal in (("tpu", 0), ("cpu", 1), ("cuda", -1)):
        with pytest.raises(InputError, match="device"):
            Device(kind, ordinal)


_BUNDLE: list[Path] = []


def _bundle(ckpt: Path, factory: pytest.TempPathFactory) -> Path:
    if not _BUNDLE:
        from export.api import export_bundle

        _BUNDLE.append(export_bundle(ckpt, factory.mktemp("rt-backend") / "bundle"))
    return _BUNDLE[0]


def test_cpu_device_uses_only_the_cpu_provider() -> None:
    assert select_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]


def test_cuda_device_takes_cuda_when_available() -> None:
    got = select_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert got == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_cuda_asked_but_not_available_warns_and_falls_back_to_cpu() -> None:
    with pytest.warns(RuntimeWarning, match="CUDA"):
        assert select_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "", 0])
def test_unknown_device_is_an_input_error(device: object) -> None:
    with pytest.raises(InputError, match="device"):
        select_providers(device, ["CPUExecutionProvider"])  # type: ignore[arg-type]


def test_onnxruntime_options_are_checked(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from mssan_infer.bundle import load_bundle

    b = load_bundle(_bundle(tiny_checkpoint, tmp_path_factory))
    with pytest.raises(InputError, match="threads"):
        OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(threads=0))
    with pytest.raises(InputError, match="graph_optimization"):
        OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(graph_optimization="max"))
    with pytest.raises(TypeError, match="turbo"):
        OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(turbo=True))  # type: ignore[call-arg]
    be = OnnxRuntimeBackend.from_bundle(
        b, OnnxRuntimeOptions(threads=1, inter_op_threads=1, graph_optimization="basic")
    )

    def entry(sess: object, key: str) -> str:
        try:
            return str(sess.get_session_options().get_session_config_entry(key))  # type: ignore[attr-defined]
        except RuntimeError:  # not set: ORT's own default
            return "unset"

    # by default workers spin inside a run and stop at its end (they yield their core between sessions)
    assert {entry(s, "session.force_spinning_stop") for s in be._sessions.values()} == {"1"}
    assert {entry(s, "session.intra_op.allow_spinning") for s in be._sessions.values()} == {"unset"}
    spinning = OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(threads=1, allow_spinning=True))
    assert {entry(s, "session.force_spinning_stop") for s in spinning._sessions.values()} == {"unset"}
    never = OnnxRuntimeBackend.from_bundle(
        b, OnnxRuntimeOptions(threads=1, session_config={"session.intra_op.allow_spinning": "0"})
    )
    assert {entry(s, "session.intra_op.allow_spinning") for s in never._sessions.values()} == {"0"}
    assert be.graphs == sorted(["image_encoder", "scorer", "text_encoder", *QUERY_SCORERS])
    assert be.active_providers() == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            OnnxRuntimeBackend.from_bundle(b, OnnxRuntimeOptions(device="cuda"))
        assert any("CUDA" in str(x.message) for x in w)


def test_an_index_of_another_bundle_is_refused_naming_the_files_that_differ(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from mssan_infer import Retriever
    from mssan_infer.errors import IndexFileError

    r = Retriever.load(tiny_bundle)
    r.add_texts(["a red dog", "a blue ball"])
    r.save(tmp_path / "index")
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["text_encoder.onnx"] = "0" * 64  # as if re-exported from other weights
    manifest["files"]["fp16/text_encoder.onnx"] = "1" * 64  # fp16 graphs do not count towards the id
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=r"these files differ: text_encoder\.onnx\)"):
        Retriever.load(other, index=tmp_path / "index", verify=False)
    del manifest["fp16_graphs"]  # the same bundle without its --fp16 extras
    manifest["files"] = {
        k: v
        for k, v in json.loads((tiny_bundle / "manifest.json").read_text())["files"].items()
        if not k.startswith("fp16/")
    }
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert Retriever.load(other, index=tmp_path / "index", verify=False).n_texts == 2


def test_ids_that_read_the_same_as_other_ids_are_refused(tiny_bundle: Path) -> None:
    from mssan_infer import Retriever

    r = Retriever.load(tiny_bundle)
    r.add_texts(["a red dog", "a blue ball"])  # ids 0 and 1
    with pytest.raises(InputError, match="read the same as other ids"):
        r.add_texts(["the cat"], ids=["1"])
    with pytest.raises(InputError, match="read the same as other ids"):
        r.add_texts(["the cat", "a tree"], ids=[7, "7"])
    assert r.add_texts(["the cat", "a tree"], ids=["01", "x"]) == ["01", "x"]  # '01' is not how 1 reads
    assert r.n_texts == 4


def test_load_takes_typed_options_not_a_long_keyword_list() -> None:
    import inspect

    params = inspect.signature(mssan_infer.Retriever.load).parameters
    assert len(params) <= 8 and not any(p.kind is p.VAR_KEYWORD for p in params.values()), list(params)
    for cls in (
        mssan_infer.GalleryOptions,
        mssan_infer.Stage1Options,
        mssan_infer.SearchOptions,
        mssan_infer.OnnxRuntimeOptions,
        mssan_infer.TensorRTOptions,
        mssan_infer.TritonOptions,
    ):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
