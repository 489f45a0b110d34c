"""Security: no pickle-capable loads in the code, bundle/index paths confined to their folder,
Triton client calls with timeouts."""

from __future__ import annotations

import ast
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer import OnnxRuntimeOptions
from mssan_infer.bundle import load_bundle
from mssan_infer.errors import BundleError, IndexFileError
from mssan_infer.files import safe_member

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {
    "tests",
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "__pycache__",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".hypothesis",
}
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_hazards(source: str, filename: str = "<src>") -> list[str]:
    """Every pickle-capable load in ``source``: ``file:line what``."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if _is_const(_kw(node, "allow_pickle"), True):
                found.append(f"{where} {name}(allow_pickle=True)")
            if name in ("np.load", "numpy.load"):
                if not _is_const(_kw(node, "allow_pickle"), False):
                    found.append(f"{where} {name} without allow_pickle=False")
            if name in ("torch.load",) and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where} torch.load without weights_only=True")
            if last in ("read_pickle", "to_pickle", "Unpickler") or name.startswith(
                tuple(f"{m}." for m in BANNED_MODULES)
            ):
                found.append(f"{where} {name}")
            if (
                last == "__import__"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in BANNED_MODULES
            ):
                found.append(f"{where} __import__({node.args[0].value!r})")
    return found


def _sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts[:-1])]


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load('x.npy')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import numpy\nnumpy.load(f, mmap_mode='r')",
        "import numpy as np\nnp.lib.format.read_array(f, allow_pickle=True)",
        "import pickle\npickle.loads(b'')",
        "from pickle import load",
        "import torch\ntorch.load('w.pt')",
        "import torch\ntorch.load('w.pt', weights_only=False)",
        "import joblib",
        "import dill as d",
        "import pandas as pd\npd.read_pickle('x')",
        "import shelve",
        "__import__('pickle')",
    ],
)
def test_the_scanner_finds_each_kind_of_pickle_load(snippet: str) -> None:
    assert pickle_hazards(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
        "import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=False)",
        "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
        "from safetensors.torch import load_file\nload_file('w.safetensors')",
        "import json\njson.load(f)",
    ],
)
def test_the_scanner_accepts_safe_loads(snippet: str) -> None:
    assert pickle_hazards(snippet) == []


def test_no_pickle_capable_load_anywhere_in_the_code() -> None:
    files = _sources()
    assert len(files) > 20 and any(p.name == "folder.py" for p in files)
    found = [
        h for p in files for h in pickle_hazards(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert found == [], "pickle-capable loads:\n" + "\n".join(found)


def test_saved_index_arrays_are_plain_npy_without_object_dtype(tiny_bundle: Path, tmp_path: Path) -> None:
    from mssan_infer import Retriever

    r = Retriever.load(tiny_bundle)
    r.add_texts(["a red dog"], ids=["x"])
    out = r.save(tmp_path / "idx")
    for f in out.glob("*.npy"):
        assert np.load(f, allow_pickle=False).dtype != object


# ---- paths confined to the bundle / index folder ---------------------------------------------------
@pytest.mark.parametrize(
    "name, match",
    [
        ("/etc/passwd", "relative paths"),
        ("\\evil.onnx", "relative paths"),
        ("../evil.onnx", "'..'"),
        ("a/../../evil.onnx", "'..'"),
        ("a/./../b", "'..'"),
        ("", "relative paths"),
        ("C:evil.onnx", "drive"),
    ],
)
def test_safe_member_refuses_names_that_leave_the_folder(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        safe_member(tmp_path, name)


def test_safe_member_refuses_symlinked_files_and_folders(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "f.onnx").write_text("x")
    (root / "file.onnx").symlink_to(outside / "f.onnx")
    (root / "dir").symlink_to(outside, target_is_directory=True)
    (root / "inner.onnx").write_text("x")
    (root / "inner_link.onnx").symlink_to(root / "inner.onnx")  # even one that stays inside
    for name in ("file.onnx", "dir/f.onnx", "inner_link.onnx"):
        with pytest.raises(BundleError, match="symlink"):
            safe_member(root, name)
    assert safe_member(root, "inner.onnx") == root / "inner.onnx"


def _bundle_copy(tiny_bundle: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    return root, json.loads((root / "manifest.json").read_text())


@pytest.mark.parametrize("table", ["graphs", "fp16_graphs"])
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_graph_entries_that_leave_the_bundle_are_refused(
    tiny_bundle: Path, tmp_path: Path, table: str, kind: str
) -> None:
    from mssan_infer import Retriever

    root, m = _bundle_copy(tiny_bundle, tmp_path)
    outside = tmp_path / "evil.onnx"
    shutil.copy(root / "scorer.onnx", outside)
    name = {"absolute": str(outside), "dotdot": "../evil.onnx", "symlink": "evil.onnx"}[kind]
    if kind == "symlink":
        (root / name).symlink_to(outside)
    m[table]["scorer"]["file"] = name
    m["files"][name] = m["files"]["scorer.onnx"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="relative paths|'..'|symlink"):
        Retriever.load(root, OnnxRuntimeOptions(precision="fp32" if table == "graphs" else "fp16"))


def test_graph_path_is_checked_again_when_the_graph_is_opened(tiny_bundle: Path, tmp_path: Path) -> None:
    """A manifest edited after verification (load_bundle then graph_path) still cannot leave the folder."""
    root, _ = _bundle_copy(tiny_bundle, tmp_path)
    b = load_bundle(root)
    b.manifest.graphs["fp32"]["scorer"] = "../../etc/passwd"
    with pytest.raises(BundleError, match="'..'"):
        b.graph_path("scorer")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.npy", "link.npy"])
def test_index_files_that_leave_the_index_folder_are_refused(tmp_path: Path, name: str) -> None:
    from mssan_infer.gallery.folder import load_index, save_index
    from mssan_infer.gallery.memory import MemoryGallery

    g = MemoryGallery(8, 4)
    g.add(
        np.ones((1, 8), np.float32),
        np.ones((1, 2, 4), np.float32),
        np.ones((1, 2), np.float32),
        np.ones((1, 2, 2), np.float32),
        ids=["a"],
    )
    path = save_index(tmp_path / "idx", {"images": g}, bundle_id="b")
    shutil.copy(path / "images_stage1.npy", tmp_path / "outside.npy")
    if name == "link.npy":
        (path / name).symlink_to(tmp_path / "outside.npy")
    m = json.loads((path / "index.json").read_text())
    m["files"][name] = m["files"].pop("images_stage1.npy")
    m["galleries"]["images"]["files"]["stage1"] = name
    (path / "index.json").write_text(json.dumps(m))
    with pytest.raises(IndexFileError, match="unsafe"):
        load_index(path)


# ---- Triton client timeouts ------------------------------------------------------------------------
class _Recorder:
    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.calls.append(("__init__", kwargs))

    def _record(self, name: str, kwargs: dict[str, Any], result: Any) -> Any:
        self.calls.append((name, kwargs))
        return result

    def is_server_live(self, **kw: Any) -> bool:
        return self._record("is_server_live", kw, True)  # type: ignore[no-any-return]

    def is_model_ready(self, model: str, version: str = "", **kw: Any) -> bool:
        return self._record("is_model_ready", kw, True)  # type: ignore[no-any-return]

    def get_model_config(self, model: str, version: str = "", **kw: Any) -> dict[str, Any]:
        return self._record("get_model_config", kw, {"config": {"max_batch_size": 8}})  # type: ignore[no-any-return]

    def infer(self, model: str, inputs: Any, **kw: Any) -> Any:
        raise OSError("connection refused")

    def close(self) -> None:
        pass


class _Input:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def set_data_from_numpy(self, *a: Any, **k: Any) -> None:
        pass


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_triton_client_call_has_a_timeout(monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    from mssan_infer.backends import triton as tb

    fake = types.SimpleNamespace(
        InferenceServerClient=_Recorder, InferInput=_Input, InferRequestedOutput=_Input
    )
    monkeypatch.setattr(tb, "_import_client", lambda p: fake)
    _Recorder.calls = []
    be = tb.TritonBackend("127.0.0.1:1", protocol=protocol, timeout_s=7.0, connect_timeout_s=2.0)
    with pytest.raises(tb.TritonUnavailableError):
        spec = tb.GRAPHS["scorer"]
        dims = {axis: 1 for t in spec.inputs for axis in t.axes}
        be.run("scorer", {t.name: np.zeros(t.shape(dims), t.dtype) for t in spec.inputs})
    assert _Recorder.calls
    for name, kwargs in _Recorder.calls:
        if protocol == "http":
            if name == "__init__":
                assert kwargs.get("connection_timeout") == 2.0 and kwargs.get("network_timeout") == 7.0
        elif name != "__init__":
            assert kwargs.get("client_timeout") in (2.0, 7.0), (name, kwargs)
    assert ("__init__" in [c[0] for c in _Recorder.calls]) and sys.modules.get(
        "tritonclient.grpc"
    ) is not fake
