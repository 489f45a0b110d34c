"""Triton: generated repository and validated configs, client errors, and a real server on loopback.

The ``triton``-marked tests start the tritonserver bundled with nvidia-pytriton
(Python backend only, so they serve the ``python`` flavour of the repository) on
127.0.0.1 and always stop it. The dev extra installs it; without it they fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tritonclient.grpc  # noqa: E402,F401  (dev extra: needed, never skipped)

from mssan_infer import OnnxRuntimeOptions, TritonOptions
from mssan_infer.errors import BackendUnavailableError
from mssan_infer.spec import GRAPHS

CAPTIONS = [
    "a red dog on the beach",
    "a blue ball near a tree",
    "man sits in a boat",
    "the cat runs in the field",
    "a small bird on the car",
    "a woman near the house",
]


# ---- repository and configs (no server) ----------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "python", "tensorrt"])
def test_every_config_parses_and_matches_its_graph(tiny_bundle: Path, tmp_path: Path, backend: str) -> None:
    from export.triton import TritonSettings, validate_config, write_repository
    from mssan_infer.names import plan_name

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    trt = None
    if backend == "tensorrt":  # stand-in plans: only the layout is checked here
        for g in GRAPHS:
            (root / plan_name(g, "fp32")).parent.mkdir(exist_ok=True)
            (root / plan_name(g, "fp32")).write_bytes(b"plan")
        trt = {"settings": {"num_profiles": 3}, "limits": {"B": 128, "R": 100, "L": 64, "Ni": 256, "Nt": 128}}
    rec = write_repository(root, TritonSettings(backend=backend, instances=2), tensorrt=trt)["triton"]
    repo = root / "triton"
    assert set(rec["models"]) == {*GRAPHS, "retriever"}
    for g, spec in GRAPHS.items():
        cfg = validate_config(repo / g / "config.pbtxt", root / spec.file)
        groups = [(grp.count, list(grp.profile)) for grp in cfg.instance_group]
        assert cfg.backend == backend and groups == ([(1, ["0"]), (1, ["1"])] if trt else [(2, [])])
        assert cfg.parameters["mssan_bundle_id"].string_value == rec["bundle_id"]
        model_file = "model.plan" if backend == "tensorrt" else "model.onnx"
        assert (repo / g / "1" / model_file).is_file()
        assert (repo / g / "1" / "model.py").is_file() == (backend == "python")
    enc = validate_config(repo / "image_encoder" / "config.pbtxt")
    assert enc.max_batch_size == 128 and enc.HasField("dynamic_batching")
    assert [list(i.dims) for i in enc.input] == [[-1, 24], [-1]]
    sc = validate_config(repo / "scorer" / "config.pbtxt")
    assert sc.max_batch_size == 0 and not sc.HasField("dynamic_batching")
    assert [list(i.dims) for i in sc.input][:3] == [[-1, -1, 32], [-1, -1], [-1, -1, -1]]
    assert list(sc.output[0].dims) == [-1, -1]
    ret = validate_config(repo / "retriever" / "config.pbtxt")
    assert ret.backend == "python" and all(i.optional for i in ret.input)
    assert json.loads(ret.parameters["scorer_limits"].string_value) == (
        {"Ni": 256, "Nt": 128, "R": 100, "L": 64} if trt else {}
    )
    tk = json.loads((repo / "retriever" / "1" / "tokenizer.json").read_text())
    assert tk["max_len"] == 32 and tk["vocab"]["<unk>"] == 3


def test_the_retriever_model_imports_the_runtime_copied_beside_it_when_mssan_infer_is_not_installed(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import mssan_infer
    from export.triton import write_repository

    write_repository(tiny_bundle, out=tmp_path / "repo")
    here = tmp_path / "repo" / "retriever" / "1"
    src = Path(mssan_infer.__file__).parent
    copied = sorted(p.relative_to(here / "mssan_infer") for p in (here / "mssan_infer").rglob("*.py"))
    assert copied == sorted(p.relative_to(src) for p in src.rglob("*.py"))
    for name in copied:
        assert (here / "mssan_infer" / name).read_bytes() == (src / name).read_bytes()
    # as in NVIDIA's container: mssan_infer is not installed and torch is unimportable; Triton's Python
    # backend appends the model's version folder to sys.path, so model.py imports the copy as a package
    probe = (
        "import sys; sys.modules['torch'] = None\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(src.parent)!r})] + [{str(here)!r}]\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('model', {str(here / 'model.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(sys.modules['mssan_infer'].__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert out.strip() == str(here / "mssan_infer" / "__init__.py")


@pytest.mark.parametrize(
    "edit, problem",
    [
        ("dims: [ -1, 24 ]", "dim 1 is 25"),  # regions' feature size
        ("TYPE_INT64", "data_type TYPE_INT32"),  # tokens' dtype
        ('name: "img_gram"', "missing from the config"),  # an output renamed
    ],
)
def test_a_config_that_disagrees_with_its_graph_is_refused(
    tiny_bundle: Path, tmp_path: Path, edit: str, problem: str
) -> None:
    from export.errors import ExportError
    from export.triton import validate_config, write_repository

    write_repository(tiny_bundle, out=tmp_path / "repo")
    graph = "text_encoder" if "INT64" in edit else "image_encoder"
    path = tmp_path / "repo" / graph / "config.pbtxt"
    text = path.read_text()
    replacement = {
        "dims: [ -1, 24 ]": "dims: [ -1, 25 ]",
        "TYPE_INT64": "TYPE_INT32",
        'name: "img_gram"': 'name: "img_gramm"',
    }[edit]
    assert edit in text
    path.write_text(text.replace(edit, replacement, 1))
    with pytest.raises(ExportError, match=problem):
        validate_config(path, tiny_bundle / GRAPHS[graph].file)


def test_a_dynamic_axis_fixed_in_a_config_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from export.errors import ExportError
    from export.triton import validate_config, write_repository

    write_repository(tiny_bundle, out=tmp_path / "repo")
    path = tmp_path / "repo" / "scorer" / "config.pbtxt"
    path.write_text(path.read_text().replace("dims: [ -1, -1, 32 ]", "dims: [ -1, 36, 32 ]", 1))
    with pytest.raises(ExportError, match="axis R is dynamic"):
        validate_config(path, tiny_bundle / "scorer.onnx")
    with pytest.raises(ExportError, match="not a valid Triton ModelConfig"):
        bad = tmp_path / "bad.pbtxt"
        bad.write_text('name: "x"\nmax_batch_size: lots\n')
        validate_config(bad)


def test_tensorrt_flavour_without_engines_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from export.errors import ExportError
    from export.triton import TritonSettings, write_repository

    with pytest.raises(ExportError, match="--tensorrt"):
        write_repository(tiny_bundle, TritonSettings(backend="tensorrt"), out=tmp_path / "repo")
    record = {"settings": {"num_profiles": 2}, "limits": {"B": 16, "R": 100, "L": 64, "Ni": 256, "Nt": 128}}
    with pytest.raises(ExportError, match="--triton-max-batch 32 is above the engines' B maximum 16"):
        write_repository(
            tiny_bundle,
            TritonSettings(backend="tensorrt", max_batch_size=32),
            out=tmp_path / "repo",
            tensorrt=record,
        )
    with pytest.raises(
        ExportError, match="--triton-instances 3 is above the engines' 2 optimisation profile"
    ):
        write_repository(
            tiny_bundle,
            TritonSettings(backend="tensorrt", instances=3),
            out=tmp_path / "repo",
            tensorrt=record,
        )
    assert not (tmp_path / "repo").exists()


def test_triton_backend_with_no_server_gives_a_clear_error(tiny_bundle: Path) -> None:
    from mssan_infer import Retriever
    from mssan_infer.backends.triton import TritonUnavailableError
    from mssan_infer.triton.server import free_port

    port = free_port()
    for protocol in ("http", "grpc"):
        with pytest.raises(
            TritonUnavailableError, match=f"127.0.0.1:{port}.*tritonserver --model-repository"
        ):
            Retriever.load(
                tiny_bundle, TritonOptions(url=f"127.0.0.1:{port}", protocol=protocol, connect_timeout_s=1.0)
            )
    assert issubclass(TritonUnavailableError, BackendUnavailableError)


# ---- a real server ----------------------------------------------------------------------------
def _binary() -> Any:
    from mssan_infer.errors import MssanError
    from mssan_infer.triton.server import find_tritonserver

    try:
        return find_tritonserver()
    except MssanError as e:
        pytest.fail(f"no tritonserver binary (install the dev extra, which brings nvidia-pytriton): {e}")


def _add_bls_retriever(repo: Path) -> None:
    """``retriever_bls``: the generated retriever with ``graphs: bls`` (the generated one runs ``local``
    on CPU)."""
    shutil.copytree(repo / "retriever", repo / "retriever_bls")
    cfg = (repo / "retriever_bls" / "config.pbtxt").read_text()
    assert 'key: "graphs"\n  value: { string_value: "auto" }' in cfg
    cfg = cfg.replace('name: "retriever"', 'name: "retriever_bls"', 1).replace(
        'key: "graphs"\n  value: { string_value: "auto" }', 'key: "graphs"\n  value: { string_value: "bls" }'
    )
    (repo / "retriever_bls" / "config.pbtxt").write_text(cfg)


@pytest.fixture(scope="module")
def gallery(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A local Retriever with images and captions, its saved index, and a python-flavour repository
    holding it."""
    from export.triton import TritonSettings, install_index, write_repository
    from mssan_infer import Retriever

    work = tmp_path_factory.mktemp("triton")
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((40, 12, 24))).astype(np.float32)
    mask = (np.arange(12)[None] < rng.integers(3, 13, (40, 1))).astype(np.float32)
    local = Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1))
    local.add_images(feats, mask=mask, ids=[f"img{i}" for i in range(40)])
    local.add_texts(CAPTIONS * 3)
    local.save(work / "index")
    # max_batch_size 8 < the Retriever's encoder batch: the client must split batches
    write_repository(
        tiny_bundle, TritonSettings(backend="python", max_batch_size=8, threads=1), out=work / "repo"
    )
    install_index(work / "repo", work / "index")
    _add_bls_retriever(work / "repo")
    yield {"local": local, "feats": feats, "mask": mask, "index": work / "index", "repo": work / "repo"}
    local.close()


@pytest.fixture(scope="module")
def server(gallery: dict[str, Any]) -> Iterator[Any]:
    from mssan_infer.triton.server import local_tritonserver

    binary = _binary()
    with local_tritonserver(gallery["repo"], binary=binary, startup_timeout_s=60) as s:
        yield s


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_retriever_returns_the_hits_of_onnxruntime(
    tiny_bundle: Path, gallery: dict[str, Any], server: Any, protocol: str
) -> None:
    from mssan_infer import Retriever

    url = server.http_url if protocol == "http" else server.grpc_url
    local = gallery["local"]
    with Retriever.load(
        tiny_bundle, TritonOptions(url=url, protocol=protocol), index=gallery["index"]
    ) as remote:
        for q in ("a red dog on the beach", "a bird near the tree"):
            for rerank in (0, 15, 40):
                a, b = local.search(text=q, k=7, rerank=rerank), remote.search(text=q, k=7, rerank=rerank)
                _same_hits([h.id for h in b], [h.score for h in b], a)
        for i in (0, 5):
            w = int(gallery["mask"][i].sum())
            a = local.search(image=gallery["feats"][i, :w], k=5, rerank=10)
            b = remote.search(image=gallery["feats"][i, :w], k=5, rerank=10)
            _same_hits([h.id for h in b], [h.score for h in b], a)
        # encoding through the server (batches of 32 split to the model's max_batch_size 8)
        enc_l = local.encode_images(gallery["feats"][:20], gallery["mask"][:20])
        enc_r = remote.encode_images(gallery["feats"][:20], gallery["mask"][:20])
        np.testing.assert_allclose(enc_r.stage1, enc_l.stage1, atol=1e-5)


def _same_hits(ids: list[Any], scores: Any, want: list[Any], atol: float = 1e-5) -> None:
    """The server's hits are the local Retriever's up to float rounding: the same scores in order, the same
    ids except where two near-tied items (scores within ``atol``) swap places. The local Retriever scores
    with the query scorers, the server with the all-pairs ``scorer``: two summation orders."""
    want_ids, want_scores = [str(h.id) for h in want], np.float32([h.score for h in want])
    np.testing.assert_allclose(scores, want_scores, atol=atol)
    for i, (got, w) in enumerate(zip([str(x) for x in ids], want_ids)):
        if got != w:
            j = want_ids.index(got) if got in want_ids else len(want_ids) - 1
            assert abs(float(want_scores[j]) - float(want_scores[i])) <= 2 * atol, (ids, want_ids)


def _retriever_query(url: str, model: str = "retriever", **inputs: Any) -> Any:
    import tritonclient.http as hc

    tensors = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        dtype = {"text": "BYTES", "k": "INT32", "rerank": "INT32"}.get(name, "FP32")
        arr = arr.astype(object if dtype == "BYTES" else np.int32 if dtype == "INT32" else np.float32)
        t = hc.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    client = hc.InferenceServerClient(url)
    try:
        return client.infer(model, tensors)
    finally:
        client.close()


@pytest.mark.triton
@pytest.mark.parametrize("model", ["retriever", "retriever_bls"])
def test_bls_retriever_model_returns_the_same_top_k(gallery: dict[str, Any], server: Any, model: str) -> None:
    local = gallery["local"]
    log = server.log_path.read_text()
    want_mode = "through BLS (graphs: bls)" if model == "retriever_bls" else "here (ONNX Runtime)"
    assert f"mssan retriever: graphs run {want_mode}" in log
    for q in ("a red dog on the beach", "the small cat"):
        res = _retriever_query(server.http_url, model, text=[q], k=[6], rerank=[25])
        want = local.search(text=q, k=6, rerank=25)
        _same_hits([x.decode() for x in res.as_numpy("ids")], res.as_numpy("scores"), want)
        by_id = {str(h.id): h.stage1 for h in want}
        for i, s1 in zip(res.as_numpy("ids"), res.as_numpy("stage1")):
            if i.decode() in by_id:
                assert abs(float(s1) - by_id[i.decode()]) <= 1e-5
    w = int(gallery["mask"][2].sum())
    res = _retriever_query(server.http_url, model, regions=gallery["feats"][2, :w], k=[4])
    want = local.search(image=gallery["feats"][2, :w], k=4, rerank=100)
    # the caption gallery holds every caption 3 times: tied scores, broken by gallery row on both sides
    # up to float rounding (the two sides' scorers sum in other orders)
    _same_hits([x.decode() for x in res.as_numpy("ids")], res.as_numpy("scores"), want)
    assert len(set(np.round([h.score for h in want], 5))) < len(want)  # the ties are really there
    w5 = int(gallery["mask"][5].sum())
    for rerank in (0, 7, 40):
        res = _retriever_query(
            server.http_url, model, regions=gallery["feats"][5, :w5], k=[9], rerank=[rerank]
        )
        want = local.search(image=gallery["feats"][5, :w5], k=9, rerank=rerank)
        _same_hits([x.decode() for x in res.as_numpy("ids")], res.as_numpy("scores"), want)
        if rerank == 0:  # stage 1 alone: the same code on both sides
            assert [x.decode() for x in res.as_numpy("ids")] == [str(h.id) for h in want]


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A plain KServe v2 JSON request (what curl sends): ``(HTTP status, JSON reply)``."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://{url}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


@pytest.mark.triton
@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"inputs": [{"name": "k", "shape": [1], "datatype": "INT32", "data": [3]}]},
            400,
            "exactly one of the inputs",
        ),
        (
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["zebra xylophone"]}]},
            400,
            "vocabulary",
        ),
        (
            {
                "inputs": [
                    {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a dog"]},
                    {"name": "k", "shape": [1], "datatype": "INT32", "data": [0]},
                ]
            },
            400,
            "k must be a positive int",
        ),
        (
            {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a dog", "a cat"]}]},
            400,
            "unexpected shape for input 'text'",
        ),  # Triton's own check of the config's dims
        (
            {
                "inputs": [
                    {"name": "regions", "shape": [2, 24], "datatype": "FP32", "data": [0.5] * 48},
                    {"name": "region_mask", "shape": [2], "datatype": "FP32", "data": [0, 0]},
                ]
            },
            400,
            "have no regions",
        ),
    ],
    ids=["no-query", "unknown-words", "k-zero", "two-captions", "image-without-regions"],
)
def test_bls_retriever_model_answers_bad_requests_with_http_400_and_a_message(
    server: Any, body: dict[str, Any], status: int, message: str
) -> None:
    code, reply = _post(server.http_url, "/v2/models/retriever/infer", body)
    assert code == status and message in reply["error"]


@pytest.mark.triton
def test_the_retriever_answers_a_plain_json_request_with_ids_as_text(
    gallery: dict[str, Any], server: Any
) -> None:
    code, reply = _post(
        server.http_url,
        "/v2/models/retriever/infer",
        {
            "inputs": [
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a red dog on the beach"]},
                {"name": "k", "shape": [1], "datatype": "INT32", "data": [3]},
            ]
        },
    )
    assert code == 200
    out = {o["name"]: o for o in reply["outputs"]}
    want = gallery["local"].search(text="a red dog on the beach", k=3)
    assert out["ids"]["datatype"] == "BYTES" and out["ids"]["data"] == [str(h.id) for h in want]
    np.testing.assert_allclose(out["scores"]["data"], [h.score for h in want], atol=1e-5)
    # image -> text over captions added without ids: int ids come back as their text, str(id)
    code, reply = _post(
        server.http_url,
        "/v2/models/retriever/infer",
        {
            "inputs": [
                {
                    "name": "regions",
                    "shape": [12, 24],
                    "datatype": "FP32",
                    "data": gallery["feats"][0].ravel().tolist(),
                },
                {"name": "k", "shape": [1], "datatype": "INT32", "data": [2]},
            ]
        },
    )
    want = gallery["local"].search(image=gallery["feats"][0], k=2)
    assert code == 200 and {o["name"]: o for o in reply["outputs"]}["ids"]["data"] == [
        str(h.id) for h in want
    ]


def test_retriever_graph_mode_is_local_only_on_a_cpu_server_with_the_onnx_files(tmp_path: Path) -> None:
    from mssan_infer.errors import InputError
    from mssan_infer.triton.retriever_model import choose_graphs

    files = {g: str(tmp_path / f"{g}.onnx") for g in GRAPHS}
    for f in files.values():
        Path(f).write_bytes(b"onnx")
    assert choose_graphs("auto", files, gpu_visible=False)[0] == "local"
    assert choose_graphs("auto", files, gpu_visible=True) == (
        "bls",
        "an NVIDIA GPU is visible (the models may run on it)",
    )
    assert choose_graphs("bls", files, gpu_visible=False)[0] == "bls"
    assert choose_graphs("local", files, gpu_visible=True)[0] == "local"
    Path(files["scorer"]).unlink()  # the tensorrt flavour has plans, not ONNX
    assert choose_graphs("auto", files, gpu_visible=False)[0] == "bls"
    with pytest.raises(InputError, match="graphs: local needs"):
        choose_graphs("local", files, gpu_visible=False)
    with pytest.raises(InputError, match="must be one of"):
        choose_graphs("fast", files, gpu_visible=False)


def test_serve_refuses_a_repository_whose_backend_the_server_lacks(tiny_bundle: Path, tmp_path: Path) -> None:
    from export.triton import TritonSettings, write_repository
    from mssan_infer.names import plan_name
    from mssan_infer.triton.server import local_tritonserver

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    for g in GRAPHS:
        (root / plan_name(g, "fp32")).parent.mkdir(exist_ok=True)
        (root / plan_name(g, "fp32")).write_bytes(b"plan")
    trt = {"settings": {"num_profiles": 1}, "limits": {"B": 128, "R": 100, "L": 64, "Ni": 256, "Nt": 128}}
    write_repository(root, TritonSettings(backend="tensorrt"), out=tmp_path / "repo", tensorrt=trt)
    binary = _binary()
    if binary.stub is None:
        pytest.fail("this test expects nvidia-pytriton's tritonserver (Python backend only)")
    with pytest.raises(
        BackendUnavailableError, match=r"no backend for image_encoder \(tensorrt\).*NVIDIA's container"
    ):
        with local_tritonserver(tmp_path / "repo", binary=binary):
            pass


def test_serve_refuses_an_index_of_another_bundle_before_starting(
    gallery: dict[str, Any], tmp_path: Path
) -> None:
    from mssan_infer.errors import InputError
    from mssan_infer.triton.server import serve

    index = tmp_path / "index"
    shutil.copytree(gallery["index"], index)
    manifest = json.loads((index / "index.json").read_text())
    manifest["bundle_id"] = "deadbeef"
    (index / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="built with bundle deadbeef, but .* serves bundle"):
        serve(gallery["repo"], index=index)


@pytest.mark.triton
def test_a_stopped_server_gives_a_clear_error(tiny_bundle: Path, gallery: dict[str, Any]) -> None:
    from mssan_infer import Retriever
    from mssan_infer.backends.triton import TritonUnavailableError
    from mssan_infer.triton.server import local_tritonserver

    with local_tritonserver(gallery["repo"], binary=_binary()) as s:
        url = s.http_url
        remote = Retriever.load(
            tiny_bundle, TritonOptions(url=url, connect_timeout_s=2), index=gallery["index"]
        )
        assert remote.search(text="a red dog", k=3)
    with pytest.raises(TritonUnavailableError, match="failed during text_encoder inference"):
        remote.search(text="a red dog", k=3)
    remote.close()
    with pytest.raises(TritonUnavailableError, match="cannot be reached"):
        Retriever.load(tiny_bundle, TritonOptions(url=url, connect_timeout_s=1))


@pytest.mark.triton
def test_a_server_holding_another_bundle_is_refused(
    tiny_bundle: Path, gallery: dict[str, Any], server: Any, tmp_path: Path
) -> None:
    from mssan_infer import Retriever
    from mssan_infer.backends.triton import TritonUnavailableError

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["vocab.json"] = "0" * 64  # another bundle id (loaded without verify)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TritonUnavailableError, match="serves bundle"):
        Retriever.load(other, TritonOptions(url=server.http_url), verify=False)
    Retriever.load(other, TritonOptions(url=server.http_url, check_bundle=False), verify=False).close()


def test_install_index_refuses_an_index_of_another_bundle(gallery: dict[str, Any], tmp_path: Path) -> None:
    from export.errors import ExportError
    from export.triton import install_index

    index = tmp_path / "index"
    shutil.copytree(gallery["index"], index)
    manifest = json.loads((index / "index.json").read_text())
    manifest["bundle_id"] = "deadbeef"
    (index / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="built with bundle deadbeef"):
        install_index(gallery["repo"], index)


def test_export_with_triton_writes_a_verified_repository_into_the_bundle(
    tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from export import export_bundle
    from export.__main__ import main
    from export.triton import TritonSettings, validate_config
    from mssan_infer import load_bundle

    out = export_bundle(tiny_checkpoint, tmp_path / "b", triton=TritonSettings(backend="python", instances=2))
    b = load_bundle(out)
    rec = b.manifest.raw["triton"]
    assert rec["bundle_id"] == b.bundle_id and rec["settings"]["backend"] == "python"
    assert (
        "triton/scorer/config.pbtxt" in b.manifest.raw["files"]
        and "triton/retriever/1/model.py" in b.manifest.raw["files"]
    )
    assert (
        validate_config(out / "triton" / "scorer" / "config.pbtxt", out / "scorer.onnx")
        .instance_group[0]
        .count
        == 2
    )
    tk = json.loads((out / "triton" / "retriever" / "1" / "tokenizer.json").read_text())
    assert tk["max_len"] == b.manifest.raw["tokenizer"]["max_len"]
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "c"), "--triton", "-q"]) == 0
    assert load_bundle(tmp_path / "c").manifest.raw["triton"]["settings"]["backend"] == "onnxruntime"
    # the bundle id covers what index vectors depend on (fp32 graphs, vocabulary), not the extras:
    # tiny_bundle is the same checkpoint exported with --fp16 and without --triton
    assert "fp16" in load_bundle(tiny_bundle).manifest.graphs and "fp16" not in b.manifest.graphs
    assert b.bundle_id == load_bundle(tiny_bundle).bundle_id == load_bundle(tmp_path / "c").bundle_id


def test_serve_refuses_a_port_that_something_listens_on(gallery: dict[str, Any]) -> None:
    import socket

    from mssan_infer.errors import InputError
    from mssan_infer.triton.server import local_tritonserver

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"the grpc port 127.0.0.1:{port} is not free.*--grpc-port"):
            with local_tritonserver(gallery["repo"], grpc_port=port, binary=_binary()):
                pass


@pytest.mark.triton
def test_the_retriever_model_serves_galleries_kept_in_qdrant(
    tiny_bundle: Path, gallery: dict[str, Any], tmp_path: Path
) -> None:
    """MSSAN_RETRIEVER_GALLERY points the Triton retriever at Qdrant galleries (here an Edge shard the
    server process opens; a Qdrant server collection is the same code through qdrant-client)."""
    from export.triton import TritonSettings, write_repository
    from mssan_infer import Retriever
    from mssan_infer.triton.server import local_tritonserver

    spec = f"qdrant-edge:{tmp_path / 'galleries'}"
    filler = Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1), gallery=spec)
    filler.add_images(gallery["feats"], mask=gallery["mask"], ids=[f"img{i}" for i in range(40)])
    filler.add_texts(CAPTIONS * 3)
    filler.close()  # an Edge shard belongs to one process: hand it over
    write_repository(tiny_bundle, TritonSettings(backend="python", threads=1), out=tmp_path / "repo")
    local = gallery["local"]  # the same items in an in-memory gallery
    with local_tritonserver(tmp_path / "repo", binary=_binary(), env={"MSSAN_RETRIEVER_GALLERY": spec}) as s:
        for q in ("a red dog on the beach", "the small cat"):
            res = _retriever_query(s.http_url, text=[q], k=[6], rerank=[25])
            want = local.search(text=q, k=6, rerank=25)
            assert [x.decode() for x in res.as_numpy("ids")] == [str(h.id) for h in want]
            np.testing.assert_allclose(res.as_numpy("scores"), [h.score for h in want], atol=1e-5)


# ---- image files in, readable hits out ---------------------------------------------------------------
class _FakeTensor:
    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, value

    def as_numpy(self) -> Any:
        return self.value


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: Any = None) -> None:
        self.outputs = {t.name: t.value for t in output_tensors}
        self.error = error


class _FakeError:
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class _FakeLogger:
    @staticmethod
    def log_info(msg: str) -> None:
        pass

    log_warn = log_info


class _FakePbUtils:
    """What the retriever model uses of ``triton_python_backend_utils``, to run it outside Triton."""

    Tensor = _FakeTensor
    InferenceResponse = _FakeResponse
    TritonError = _FakeError
    Logger = _FakeLogger

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, Any], name: str) -> _FakeTensor | None:
        return _FakeTensor(name, request[name]) if name in request else None


def _model_outside_triton(repo: Path, monkeypatch: pytest.MonkeyPatch, index: Path | None = None) -> Any:
    """The repository's ``retriever`` model (``graphs: local``) run in this process with a stand-in
    ``pb_utils``."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from mssan_infer.triton import retriever_model

    monkeypatch.setattr(retriever_model, "pb_utils", _FakePbUtils)
    if index is not None:
        monkeypatch.setenv("MSSAN_RETRIEVER_INDEX", str(index))
    cfg = text_format.Parse((repo / "retriever" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    model = retriever_model.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_repository": str(repo / "retriever"),
            "model_version": "1",
        }
    )
    return model


def _run(model: Any, **inputs: Any) -> _FakeResponse:
    request = {k: np.asarray(v, dtype=object if k in ("text", "image") else None) for k, v in inputs.items()}
    (response,) = model.execute([request])
    return response  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bundle with the pixel graph (untrained tiny model on ``resnet-tiny`` at 64 px) and its python-flavour
    repository (written by the export, as ``--pixels --triton`` does), a few image files, an index of their
    paths and captions, and a copy of the repository holding it (retriever: ``graphs: local``, plus
    ``retriever_bls``)."""
    import torch

    from export import export_bundle
    from export.triton import TritonSettings, install_index
    from mssan_infer import Retriever
    from mssan_infer.text.words import Tokenizer, build_vocab
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import MSSAN

    from .conftest import WORDS
    from .test_images import make_images, tiny_weights

    work = tmp_path_factory.mktemp("pixels-triton")
    torch.manual_seed(0)
    tok = Tokenizer(build_vocab([" ".join(WORDS)] * 4, threshold=4), max_len=32)
    cfg = ModelConfig(vocab_size=len(tok), word_dim=16, embed_size=32, img_dim=256, max_len=32)
    ckpt = save_checkpoint(work / "ckpt", MSSAN(cfg), tok, state={"epoch": 0})
    bundle = export_bundle(
        ckpt,
        work / "bundle",
        pixels=True,
        backbone="resnet-tiny",
        backbone_weights=tiny_weights(work / "bb.safetensors", seed=3),
        image_size=64,
        triton=TritonSettings(backend="python", threads=1),
    )
    photos = [work / "photos" / n for n in make_images(work / "photos", 6, seed=2)]
    local = Retriever.load(bundle, OnnxRuntimeOptions(threads=1))
    local.add_images(photos, ids=[p.stem for p in photos], metadata=[{"n": i} for i in range(6)])
    local.add_texts(CAPTIONS, metadata=[{"lang": "en"} if i % 2 else None for i in range(len(CAPTIONS))])
    local.save(work / "index")
    shutil.copytree(bundle / "triton", work / "repo")
    install_index(work / "repo", work / "index")
    _add_bls_retriever(work / "repo")
    yield {"bundle": bundle, "photos": photos, "local": local, "index": work / "index", "repo": work / "repo"}
    local.close()


def test_a_bundle_with_the_pixel_graph_gives_the_repository_a_pixel_model_and_the_retriever_its_preprocessing(
    pixels: dict[str, Any],
) -> None:
    from export.triton import validate_config
    from mssan_infer import load_bundle

    repo, bundle = pixels["repo"], pixels["bundle"]
    cfg = validate_config(
        repo / "image_encoder_pixels" / "config.pbtxt", bundle / "image_encoder_pixels.onnx"
    )
    assert cfg.max_batch_size == 128 and [list(i.dims) for i in cfg.input] == [[3, -1, -1]]
    ret = validate_config(repo / "retriever" / "config.pbtxt")
    assert [(i.name, i.optional) for i in ret.input if i.name == "image"] == [("image", True)]
    assert [o.name for o in ret.output] == ["ids", "scores", "stage1", "texts", "sources", "metadata"]
    prep = json.loads(ret.parameters["image_preprocessing"].string_value)
    b = load_bundle(bundle)  # verifies the sha256 of every file, the repository's included
    assert prep == b.manifest.preprocessing["image"]
    assert "triton/image_encoder_pixels/1/model.onnx" in b.manifest.raw["files"]
    assert "image_encoder_pixels" in b.manifest.raw["triton"]["models"]


def test_the_tensorrt_flavour_serves_the_pixel_graph_on_onnxruntime(
    pixels: dict[str, Any], tmp_path: Path
) -> None:
    from export.triton import TritonSettings, validate_config, write_repository
    from mssan_infer.names import plan_name

    root = tmp_path / "bundle"
    shutil.copytree(pixels["bundle"], root)
    for g in GRAPHS:  # stand-in plans: only the layout is checked here
        (root / plan_name(g, "fp32")).parent.mkdir(exist_ok=True)
        (root / plan_name(g, "fp32")).write_bytes(b"plan")
    trt = {"settings": {"num_profiles": 2}, "limits": {"B": 16, "R": 100, "L": 64, "Ni": 256, "Nt": 128}}
    write_repository(root, TritonSettings(backend="tensorrt"), out=tmp_path / "repo", tensorrt=trt)
    cfg = validate_config(
        tmp_path / "repo" / "image_encoder_pixels" / "config.pbtxt", root / "image_encoder_pixels.onnx"
    )
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 16
    assert cfg.parameters["mssan_precision"].string_value == "fp32"
    assert (tmp_path / "repo" / "image_encoder_pixels" / "1" / "model.onnx").is_file()


def test_image_bytes_takes_raw_bytes_base64_with_line_breaks_and_data_urls(pixels: dict[str, Any]) -> None:
    import base64

    from mssan_infer.triton.retriever_model import image_bytes

    raw = pixels["photos"][0].read_bytes()
    assert image_bytes(raw) is raw
    assert image_bytes(base64.encodebytes(raw)) == raw  # `base64 photo.jpg` wraps lines at 76
    assert image_bytes(b"data:image/jpeg;base64," + base64.b64encode(raw)) == raw


def test_the_retriever_model_decodes_image_bytes_and_returns_texts_sources_and_metadata(
    pixels: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    model = _model_outside_triton(pixels["repo"], monkeypatch)
    local, photo = pixels["local"], pixels["photos"][1]
    want = local.search(image=photo, k=4)
    raw = photo.read_bytes()
    for sent in (raw, base64.b64encode(raw), b"data:image/png;base64," + base64.b64encode(raw)):
        res = _run(model, image=[sent], k=[4])
        assert res.error is None
        out = res.outputs
        assert [x.decode() for x in out["ids"]] == [str(h.id) for h in want]
        np.testing.assert_allclose(out["scores"], [h.score for h in want], atol=1e-5)
        assert [x.decode() for x in out["texts"]] == [h.text for h in want]
        assert [x.decode() for x in out["sources"]] == [""] * 4
        assert [json.loads(x) for x in out["metadata"]] == [h.metadata or {} for h in want]
    want = local.search(text="a red dog", k=3)
    out = _run(model, text=["a red dog"], k=[3]).outputs
    assert (
        [x.decode() for x in out["sources"]]
        == [h.source for h in want]
        == [str(pixels["photos"][int(str(h.id)[3:])]) for h in want]
    )
    assert [json.loads(x) for x in out["metadata"]] == [h.metadata for h in want]
    assert [x.decode() for x in out["texts"]] == [""] * 3


@pytest.mark.parametrize(
    "sent, message",
    [
        (b"\x89PNG\r\n\x1a\n broken", "not an image file pillow can read"),
        (b"", "'image' is empty"),
        (b"data:image/png;base64,@@@", "not 'data:<type>;base64,<base64>'"),
    ],
    ids=["not-an-image", "empty", "bad-data-url"],
)
def test_an_image_that_does_not_decode_is_an_invalid_argument(
    pixels: dict[str, Any], monkeypatch: pytest.MonkeyPatch, sent: bytes, message: str
) -> None:
    model = _model_outside_triton(pixels["repo"], monkeypatch)
    res = _run(model, image=[sent])
    assert res.error is not None and res.error.code == "INVALID_ARG" and message in res.error.message


def test_a_cut_image_file_is_an_invalid_argument(
    pixels: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model_outside_triton(pixels["repo"], monkeypatch)
    jpg = next(p for p in pixels["photos"] if p.suffix == ".jpg").read_bytes()
    res = _run(model, image=[jpg[: len(jpg) // 2]])
    assert (
        res.error is not None
        and res.error.code == "INVALID_ARG"
        and "truncated or damaged" in res.error.message
    )


def test_without_the_pixel_graph_an_image_request_says_how_to_get_one(
    gallery: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model_outside_triton(gallery["repo"], monkeypatch)
    res = _run(model, image=[b"\x89PNG..."])
    assert res.error is not None and res.error.code == "INVALID_ARG"
    assert "without the pixel graph" in res.error.message and "--pixels" in res.error.message
    res = _run(model, text=["a dog"], image=[b"x"])
    assert res.error is not None and "exactly one of the inputs" in res.error.message


@pytest.mark.triton
def test_a_real_server_takes_image_bytes_and_answers_with_caption_texts(pixels: dict[str, Any]) -> None:
    import base64

    import tritonclient.http as hc

    from mssan_infer.triton.server import local_tritonserver

    local, photo = pixels["local"], pixels["photos"][2]
    want = local.search(image=photo, k=5)
    with local_tritonserver(pixels["repo"], binary=_binary(), startup_timeout_s=60) as s:
        # plain KServe v2 JSON, as curl sends it: the file as base64 text
        body = {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(photo.read_bytes()).decode()],
                },
                {"name": "k", "shape": [1], "datatype": "INT32", "data": [5]},
            ]
        }
        code, reply = _post(s.http_url, "/v2/models/retriever/infer", body)
        assert code == 200, reply
        out = {o["name"]: o["data"] for o in reply["outputs"]}
        assert out["ids"] == [str(h.id) for h in want] and out["texts"] == [h.text for h in want]
        np.testing.assert_allclose(out["scores"], [h.score for h in want], atol=1e-5)
        assert [json.loads(m) for m in out["metadata"]] == [h.metadata or {} for h in want]
        # the raw bytes (tritonclient's binary tensor data), through BLS to the image_encoder_pixels model
        image = hc.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo.read_bytes()], dtype=object))
        client = hc.InferenceServerClient(s.http_url)
        try:
            res = client.infer("retriever_bls", [image])
        finally:
            client.close()
        want10 = local.search(image=photo, k=10)
        assert [x.decode() for x in res.as_numpy("texts")] == [h.text for h in want10]
        np.testing.assert_allclose(res.as_numpy("scores"), [h.score for h in want10], atol=1e-5)
        code, reply = _post(
            s.http_url,
            "/v2/models/retriever/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]},
        )
        assert code == 400 and "not an image file pillow can read" in reply["error"]


def test_a_query_takes_one_gallery_snapshot_and_the_scorer_limits_are_worked_out_once(
    gallery: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path asks a gallery for its size once per query (its view's ``n``: one count request to a
    Qdrant server), and the scorer's limits per direction are computed when the model loads."""
    from mssan_infer.gallery.memory import MemoryGallery
    from mssan_infer.search import ScorerLimits

    directions: list[bool] = []
    real = ScorerLimits.from_axes

    def from_axes(cls: type, axes: Any, *, query_is_text: bool) -> ScorerLimits:
        directions.append(query_is_text)
        return real(axes, query_is_text=query_is_text)

    monkeypatch.setattr(ScorerLimits, "from_axes", classmethod(from_axes))
    model = _model_outside_triton(gallery["repo"], monkeypatch)
    assert sorted(directions) == [False, True]  # both directions, at initialize
    assert model.limits[True] == real({}, query_is_text=True)

    class Counted:
        def __init__(self, g: Any) -> None:
            self.g, self.sizes = g, 0

        def __len__(self) -> int:
            self.sizes += 1
            return len(self.g)

        def view(self) -> Any:
            return self.g.view()

    local, feats, mask = gallery["local"], gallery["feats"], gallery["mask"]
    w = int(mask[3].sum())
    by_text = [str(h.id) for h in local.search(text="a red dog on the beach", k=5, rerank=20)]
    by_image = [str(h.id) for h in local.search(image=feats[3, :w], k=4)]
    model.galleries = {name: Counted(g) for name, g in model.galleries.items()}
    directions.clear()
    for _ in range(2):
        res = _run(model, text=["a red dog on the beach"], k=[5], rerank=[20])
        assert [x.decode() for x in res.outputs["ids"]] == by_text
        res = _run(model, regions=feats[3, :w], k=[4])
        assert [x.decode() for x in res.outputs["ids"]] == by_image
    assert directions == [] and [g.sizes for g in model.galleries.values()] == [0, 0]
    model.galleries["images"] = MemoryGallery(64, 32)  # an empty gallery is still refused
    res = _run(model, text=["a red dog"])
    assert res.error is not None and res.error.code == "INVALID_ARG"
    assert "the index has no image" in res.error.message
