"""The bad-input table: every entry point, one parametrised test each, one row per bad input.

Each row names the bad input, the typed :class:`MssanError` subclass expected and a piece of
the message (what was wrong / what was expected / what to do). No row may end in a bare
numpy, onnxruntime, json or OS exception. Policy decisions the rows pin down:

- ``k`` above the gallery size returns every item (not an error); ``0 < rerank < k`` is
  raised to ``k``; ``rerank`` above the gallery size reranks the whole gallery.
- An empty batch given to ``add_images`` / ``add_texts`` / ``search_batch`` is an InputError
  (almost always a caller's bug: an exhausted iterator, an empty file).
- Captions longer than the bundle's ``max_len`` are truncated exactly as in training (the same
  ``Tokenizer.encode``), with a logged warning; ``bytes`` captions are refused (decode them first).
- ``remove`` with an id twice removes it once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from mssan_infer import (
    BackendOptions,
    GalleryOptions,
    Layout,
    OnnxRuntimeOptions,
    Retriever,
    SearchOptions,
    Stage1Options,
)
from mssan_infer.errors import BundleError, IndexFileError, InputError, MssanError
from mssan_infer.names import INDEX_FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[1]
DV = 24  # the tiny model's region feature size (conftest)
MAX_LEN = 32  # the tiny model's tokenizer max_len (conftest)


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retriever(tiny_bundle: Path) -> Retriever:
    r = Retriever.load(tiny_bundle)
    rng = np.random.default_rng(0)
    r.add_images(rng.normal(size=(6, 5, DV)).astype(np.float32), ids=[f"img{i}" for i in range(6)])
    r.add_texts(
        ["a red dog on the beach", "a blue ball near a tree", "a man in the street"], ids=["c0", "c1", "c2"]
    )
    r.add_texts(["a cat"], ids=["img0"])  # an id present in both galleries
    return r


@pytest.fixture(scope="module")
def saved_index(retriever: Retriever, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return retriever.save(tmp_path_factory.mktemp("bad-index") / "index")


def _state(r: Retriever) -> tuple[list[Any], list[Any]]:
    return r.images.ids, r.texts.ids


def _expect(call: Callable[[], Any], error: type[MssanError], match: str) -> MssanError:
    """``call`` must raise ``error`` (an MssanError) whose message contains ``match``."""
    with pytest.raises(MssanError) as info:
        call()
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert match.lower() in str(info.value).lower(), str(info.value)
    return info.value


def _feats(n: int = 2, r: int = 4, dv: int = DV, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, r, dv)).astype(dtype)


def _with(value: float) -> np.ndarray:
    x = _feats()
    x[1, 2, 3] = value
    return x


# ---- Retriever.add_images ------------------------------------------------------------------
ADD_IMAGES: list[Any] = [
    pytest.param(dict(feats=_feats()[0]), "[N, R, 24]", id="ndim-2"),
    pytest.param(dict(feats=_feats()[None]), "[N, R, 24]", id="ndim-4"),
    pytest.param(dict(feats=np.float32(3.0)), "[N, R, 24]", id="scalar"),
    pytest.param(dict(feats=_feats(dv=25)), "[N, R, 24]", id="feature-size"),
    pytest.param(dict(feats=[_feats()[0], _feats(dv=23)[0]]), "image 1", id="list-item-feature-size"),
    pytest.param(dict(feats=[_feats()[0], _feats()]), "image 1", id="list-item-ndim"),
    pytest.param(dict(feats=_feats().astype(str)), "real numbers", id="dtype-str"),
    pytest.param(dict(feats=_feats().astype(np.complex64)), "real numbers", id="dtype-complex"),
    pytest.param(dict(feats=_feats().astype(object)), "real numbers", id="dtype-object"),
    pytest.param(dict(feats=_feats() > 0), "real numbers", id="dtype-bool"),
    pytest.param(dict(feats=_with(np.nan)), "NaN", id="nan"),
    pytest.param(dict(feats=_with(np.inf)), "NaN or inf", id="inf"),
    pytest.param(dict(feats=_with(-np.inf)), "NaN or inf", id="minus-inf"),
    pytest.param(dict(feats=_feats().astype(np.float64) * 1e300), "NaN or inf", id="overflows-float32"),
    pytest.param(dict(feats=_feats(n=0)), "empty", id="empty-batch"),
    pytest.param(dict(feats=[]), "empty", id="empty-list"),
    pytest.param(dict(feats=_feats(r=0)), "no regions", id="zero-regions"),
    pytest.param(dict(feats=_feats(), mask=np.ones((2, 3), np.float32)), "mask must be", id="mask-shape"),
    pytest.param(dict(feats=_feats(), mask=np.zeros((2, 4), np.float32)), "no regions", id="mask-all-zero"),
    pytest.param(dict(feats=_feats(), mask=np.full((2, 4), np.nan, np.float32)), "mask", id="mask-nan"),
    pytest.param(dict(feats=_feats(), mask=np.full((2, 4), 0.5, np.float32)), "mask", id="mask-not-0-1"),
    pytest.param(
        dict(feats=[_feats()[0]], mask=np.ones((1, 4))), "mask is only accepted", id="mask-with-list"
    ),
    pytest.param(dict(feats=_feats(), ids=["a", "a"]), "duplicate", id="duplicate-ids"),
    pytest.param(
        dict(feats=_feats(), ids=["img0", "new"]), "already in the gallery", id="id-already-present"
    ),
    pytest.param(dict(feats=_feats(), ids=["a"]), "1 ids for 2 items", id="too-few-ids"),
    pytest.param(dict(feats=_feats(), ids=["a", "b", "c"]), "3 ids for 2 items", id="too-many-ids"),
    pytest.param(dict(feats=_feats(), ids="ab"), "not a single string", id="ids-a-string"),
    pytest.param(dict(feats=_feats(), ids=[1.5, 2.5]), "str or int", id="ids-float"),
    pytest.param(dict(feats=_feats(), ids=[None, "b"]), "str or int", id="ids-none"),
    pytest.param(dict(feats=_feats(), ids=[["x"], "b"]), "str or int", id="ids-unhashable"),
    pytest.param(dict(feats=_feats(), ids=[True, False]), "str or int", id="ids-bool"),
    pytest.param(dict(feats=None), "image features", id="none"),
]


@pytest.mark.parametrize("kwargs, match", ADD_IMAGES)
def test_add_images_refuses_bad_input_with_a_typed_error_and_adds_nothing(
    retriever: Retriever, kwargs: dict[str, Any], match: str
) -> None:
    before = _state(retriever)
    _expect(lambda: retriever.add_images(**kwargs), InputError, match)
    assert _state(retriever) == before


# ---- Retriever.add_texts ----------------------------------------------------------------------
ADD_TEXTS: list[Any] = [
    pytest.param(dict(texts=[""]), "no words", id="empty-caption"),
    pytest.param(dict(texts=["a dog", "   \t\n "]), "caption 1", id="whitespace-only"),
    pytest.param(dict(texts=["?!... --- ;;"]), "no words", id="punctuation-only"),
    pytest.param(dict(texts=["zebra xylophone quokka"]), "vocabulary", id="all-unknown-words"),
    pytest.param(dict(texts=[b"a dog"]), "decode", id="bytes-caption"),
    pytest.param(dict(texts=[b"\xff\xfe dog"]), "decode", id="non-utf8-bytes"),
    pytest.param(dict(texts=b"a dog"), "decode", id="bytes-instead-of-list"),
    pytest.param(dict(texts=[None]), "must be str", id="none-caption"),
    pytest.param(dict(texts=[3]), "must be str", id="int-caption"),
    pytest.param(dict(texts=None), "captions", id="none"),
    pytest.param(dict(texts=7), "captions", id="int"),
    pytest.param(dict(texts=[]), "empty", id="empty-batch"),
    pytest.param(dict(texts=["a dog", "a cat"], ids=["x", "x"]), "duplicate", id="duplicate-ids"),
    pytest.param(dict(texts=["a dog"], ids=["c0"]), "already in the gallery", id="id-already-present"),
    pytest.param(dict(texts=["a dog", "a cat"], ids=["x"]), "1 ids for 2 items", id="too-few-ids"),
    pytest.param(dict(texts=["a dog"], ids=[{"a": 1}]), "str or int", id="ids-unhashable"),
]


@pytest.mark.parametrize("kwargs, match", ADD_TEXTS)
def test_add_texts_refuses_bad_input_with_a_typed_error_and_adds_nothing(
    retriever: Retriever, kwargs: dict[str, Any], match: str
) -> None:
    before = _state(retriever)
    _expect(lambda: retriever.add_texts(**kwargs), InputError, match)
    assert _state(retriever) == before


def test_a_caption_longer_than_max_len_is_truncated_as_in_training_with_a_warning(
    retriever: Retriever, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.checkpoint import load_model

    _, train_tok = load_model(tiny_checkpoint)
    long = " ".join(["red dog"] * MAX_LEN + ["blue ball"] * 5)  # 2*MAX_LEN + 10 words
    with caplog.at_level(logging.WARNING):
        ids = retriever.tokenize([long])[0]
    assert any("truncated" in r.getMessage() and str(MAX_LEN) in r.getMessage() for r in caplog.records)
    assert ids == train_tok.encode(long) and len(ids) == MAX_LEN
    head = " ".join(long.split()[:MAX_LEN])
    a, b = retriever.encode_texts([long]), retriever.encode_texts([head])
    np.testing.assert_array_equal(a.stage1, b.stage1)


# ---- Retriever.search --------------------------------------------------------------------------
SEARCH: list[Any] = [
    pytest.param(dict(), "exactly one", id="no-query"),
    pytest.param(dict(text="a dog", image=np.zeros((3, DV))), "exactly one", id="two-queries"),
    pytest.param(dict(text=""), "no words", id="empty-caption"),
    pytest.param(dict(text="  \n\t "), "no words", id="whitespace-only"),
    pytest.param(dict(text="?!  ..."), "no words", id="punctuation-only"),
    pytest.param(dict(text="zebra quokka"), "vocabulary", id="all-unknown-words"),
    pytest.param(dict(text=b"\xff\xfe"), "str", id="non-utf8-bytes"),
    pytest.param(dict(text=["a dog"]), "search_batch", id="list-of-captions"),
    pytest.param(dict(text="a dog", k=0), "k must be", id="k-zero"),
    pytest.param(dict(text="a dog", k=-1), "k must be", id="k-negative"),
    pytest.param(dict(text="a dog", k=2.5), "k must be", id="k-float"),
    pytest.param(dict(text="a dog", k="3"), "k must be", id="k-str"),
    pytest.param(dict(text="a dog", k=True), "k must be", id="k-bool"),
    pytest.param(dict(text="a dog", k=None), "k must be", id="k-none"),
    pytest.param(dict(text="a dog", rerank=-1), "rerank", id="rerank-negative"),
    pytest.param(dict(text="a dog", rerank=1.5), "rerank", id="rerank-float"),
    pytest.param(dict(image=np.zeros((3, DV + 1), np.float32)), "24", id="image-feature-size"),
    pytest.param(dict(image=np.zeros((2, 3, DV), np.float32)), "one image", id="image-batch-of-two"),
    pytest.param(dict(image=np.zeros((DV,), np.float32)), "one image", id="image-ndim-1"),
    pytest.param(dict(image=np.zeros((0, DV), np.float32)), "no regions", id="image-no-regions"),
    pytest.param(dict(image=np.full((3, DV), np.nan, np.float32)), "NaN", id="image-nan"),
    pytest.param(dict(image=np.full((3, DV), np.inf, np.float32)), "inf", id="image-inf"),
    pytest.param(dict(image=np.zeros((3, DV), "U3")), "real numbers", id="image-dtype-str"),
]


@pytest.mark.parametrize("kwargs, match", SEARCH)
def test_search_refuses_bad_input_with_a_typed_error(
    retriever: Retriever, kwargs: dict[str, Any], match: str
) -> None:
    _expect(lambda: retriever.search(**kwargs), InputError, match)


def test_search_on_an_empty_gallery_says_what_to_add(tiny_bundle: Path) -> None:
    r = Retriever.load(tiny_bundle)
    _expect(lambda: r.search(text="a dog"), InputError, "add_images")
    _expect(lambda: r.search(image=np.ones((3, DV), np.float32)), InputError, "add_texts")


@pytest.mark.parametrize("k, rerank", [(100, 100), (100, 0), (100, 3), (2, 1000), (6, 6)])
def test_k_and_rerank_above_the_gallery_size_return_every_item(
    retriever: Retriever, k: int, rerank: int
) -> None:
    hits = retriever.search(text="a red dog", k=k, rerank=rerank)
    assert len(hits) == min(k, retriever.n_images)
    exhaustive = retriever.search(text="a red dog", k=retriever.n_images, rerank=retriever.n_images)
    if rerank >= retriever.n_images:
        assert [h.id for h in hits] == [h.id for h in exhaustive][: len(hits)]


# ---- Retriever.search_batch ----------------------------------------------------------------------
SEARCH_BATCH: list[Any] = [
    pytest.param(dict(), "exactly one", id="no-query"),
    pytest.param(dict(texts=["a dog"], images=_feats()), "exactly one", id="two-queries"),
    pytest.param(dict(texts="a dog"), "sequence of captions", id="texts-a-string"),
    pytest.param(dict(texts=[]), "empty", id="empty-texts"),
    pytest.param(dict(images=_feats(n=0)), "empty", id="empty-images"),
    pytest.param(dict(images=[]), "empty", id="empty-image-list"),
    pytest.param(dict(texts=7), "captions", id="texts-int"),
    pytest.param(dict(texts=["a dog", ""]), "caption 1", id="one-empty-caption"),
    pytest.param(dict(texts=["a dog", "quokka"]), "vocabulary", id="one-unknown-caption"),
    pytest.param(dict(texts=["a dog", b"\xff"]), "decode", id="one-bytes-caption"),
    pytest.param(dict(texts=["a dog"], k=0), "k must be", id="k-zero"),
    pytest.param(dict(texts=["a dog"], rerank=-5), "rerank", id="rerank-negative"),
    pytest.param(dict(images=_feats()[0]), "[N, R, 24]", id="images-ndim-2"),
    pytest.param(dict(images=_feats(dv=7)), "[N, R, 24]", id="images-feature-size"),
    pytest.param(dict(images=_with(np.nan)), "NaN", id="images-nan"),
    pytest.param(dict(images=_feats(), image_mask=np.ones((3, 4))), "mask must be", id="image-mask-shape"),
    pytest.param(dict(images=_feats(), image_mask=np.zeros((2, 4))), "no regions", id="image-mask-all-zero"),
]


@pytest.mark.parametrize("kwargs, match", SEARCH_BATCH)
def test_search_batch_refuses_bad_input_with_a_typed_error(
    retriever: Retriever, kwargs: dict[str, Any], match: str
) -> None:
    _expect(lambda: retriever.search_batch(**kwargs), InputError, match)


# ---- Retriever.remove --------------------------------------------------------------------------
REMOVE: list[Any] = [
    pytest.param(dict(ids=["nope"]), "unknown ids", id="unknown-id"),
    pytest.param(dict(ids=["img1", "nope"]), "nothing was removed", id="one-unknown-id"),
    pytest.param(dict(ids=["img0"]), "both galleries", id="id-in-both-galleries"),
    pytest.param(dict(ids=["nope"], gallery="images"), "unknown ids", id="unknown-id-in-gallery"),
    pytest.param(dict(ids=["img1"], gallery="texts"), "unknown ids", id="id-in-the-other-gallery"),
    pytest.param(dict(ids=["img1"], gallery="pictures"), "gallery must be", id="unknown-gallery"),
    pytest.param(dict(ids=[["img1"]]), "str or int", id="unhashable-id"),
    pytest.param(dict(ids=[1.5]), "str or int", id="float-id"),
    pytest.param(dict(ids="img1"), "not a single string", id="ids-a-string"),
    pytest.param(dict(ids=None), "sequence", id="ids-none"),
    pytest.param(dict(ids=5), "sequence", id="ids-int"),
]


@pytest.mark.parametrize("kwargs, match", REMOVE)
def test_remove_refuses_bad_input_with_a_typed_error_and_removes_nothing(
    retriever: Retriever, kwargs: dict[str, Any], match: str
) -> None:
    before = _state(retriever)
    _expect(lambda: retriever.remove(**kwargs), InputError, match)
    assert _state(retriever) == before


def test_remove_with_an_id_twice_removes_it_once(tiny_bundle: Path) -> None:
    r = Retriever.load(tiny_bundle)
    r.add_images(_feats(n=3), ids=["a", "b", "c"])
    r.remove(["b", "b"])
    assert r.images.ids == ["a", "c"]


# ---- Retriever.save ----------------------------------------------------------------------------
def _a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("not an index")
    return tmp / "file"


def _a_folder(tmp: Path) -> Path:
    (tmp / "dir").mkdir()
    (tmp / "dir" / "precious.txt").write_text("keep me")
    return tmp / "dir"


def _under_a_file(tmp: Path) -> Path:
    return _a_file(tmp) / "index"


def _bad_name(tmp: Path) -> Path:
    return tmp / "in\0dex"


SAVE: list[Any] = [
    pytest.param(_a_file, "not an mssan index", id="path-is-a-file"),
    pytest.param(_a_folder, "not an mssan index", id="path-is-a-non-index-folder"),
    pytest.param(_under_a_file, "cannot write", id="parent-is-a-file"),
    pytest.param(_bad_name, "cannot write", id="nul-in-path"),
]


@pytest.mark.parametrize("make_path, match", SAVE)
def test_save_refuses_bad_paths_with_a_typed_error_and_writes_nothing(
    retriever: Retriever, tmp_path: Path, make_path: Callable[[Path], Path], match: str
) -> None:
    path = make_path(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _expect(lambda: retriever.save(path), IndexFileError, match)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_save_refuses_a_read_only_parent_with_a_typed_error(
    retriever: Retriever, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ro").mkdir()
    if os.geteuid() != 0:
        (tmp_path / "ro").chmod(0o500)
    else:  # root ignores directory permissions: make the temp-folder creation fail as it would

        def denied(*args: Any, **kwargs: Any) -> str:
            raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

        monkeypatch.setattr("mssan_infer.gallery.folder.tempfile.mkdtemp", denied)
    try:
        _expect(lambda: retriever.save(tmp_path / "ro" / "index"), IndexFileError, "cannot write")
        assert not (tmp_path / "ro" / "index").exists()
    finally:
        (tmp_path / "ro").chmod(0o700)


# ---- Retriever.load (bundle and index) ---------------------------------------------------------
def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def _set_manifest(root: Path, m: dict[str, Any]) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        m = _manifest(root)
        fn(m)
        _set_manifest(root, m)

    return edit


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])

    return edit


def _flip_byte(name: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = bytearray((root / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / name).write_bytes(bytes(data))

    return edit


def _graph_file(m: dict[str, Any], graph: str, name: str) -> None:
    m["graphs"][graph]["file"] = name
    m["files"][name] = m["files"].get("scorer.onnx", "0" * 64)


def _outside_file(root: Path) -> Path:
    outside = root.parent / f"outside-{root.name}.onnx"
    shutil.copy(root / "scorer.onnx", outside)
    return outside


def _files_absolute(root: Path) -> None:
    outside = _outside_file(root)
    m = _manifest(root)
    m["files"][str(outside)] = m["files"]["scorer.onnx"]
    _set_manifest(root, m)


def _files_dotdot(root: Path) -> None:
    outside = _outside_file(root)
    m = _manifest(root)
    m["files"][f"../{outside.name}"] = m["files"]["scorer.onnx"]
    _set_manifest(root, m)


def _files_symlink(root: Path) -> None:
    outside = _outside_file(root)
    (root / "linked.onnx").symlink_to(outside)
    m = _manifest(root)
    m["files"]["linked.onnx"] = m["files"]["scorer.onnx"]
    _set_manifest(root, m)


def _symlinked_dir(root: Path) -> None:
    outside = root.parent / f"outside-dir-{root.name}"
    outside.mkdir()
    shutil.copy(root / "scorer.onnx", outside / "scorer.onnx")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    m = _manifest(root)
    m["files"]["sub/scorer.onnx"] = m["files"]["scorer.onnx"]
    _set_manifest(root, m)


def _graph_absolute(root: Path) -> None:
    outside = _outside_file(root)
    m = _manifest(root)
    _graph_file(m, "scorer", str(outside))
    _set_manifest(root, m)


def _graph_dotdot(root: Path) -> None:
    outside = _outside_file(root)
    m = _manifest(root)
    _graph_file(m, "scorer", f"../{outside.name}")
    _set_manifest(root, m)


def _graph_symlink(root: Path) -> None:
    outside = _outside_file(root)
    (root / "linked.onnx").symlink_to(outside)
    m = _manifest(root)
    _graph_file(m, "scorer", "linked.onnx")
    _set_manifest(root, m)


def _graph_symlink_unlisted(root: Path) -> None:
    """The graph's file name is a symlink that is NOT in ``files``: refused as unhashed."""
    outside = _outside_file(root)
    (root / "linked.onnx").symlink_to(outside)
    m = _manifest(root)
    m["graphs"]["scorer"]["file"] = "linked.onnx"
    _set_manifest(root, m)


def _vocab_dotdot(root: Path) -> None:
    shutil.copy(root / "vocab.json", root.parent / f"vocab-{root.name}.json")
    m = _manifest(root)
    m["tokenizer"]["vocab"] = f"../vocab-{root.name}.json"
    m["files"][f"../vocab-{root.name}.json"] = m["files"]["vocab.json"]
    _set_manifest(root, m)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def _newer(m: dict[str, Any]) -> None:
    m["format_version"] = 99


def _older(m: dict[str, Any]) -> None:
    m["format_version"] = 0


def _version_str(m: dict[str, Any]) -> None:
    m["format_version"] = "1"


def _graphs_list(m: dict[str, Any]) -> None:
    m["graphs"] = ["image_encoder", "text_encoder", "scorer"]


def _graph_entry_without_file(m: dict[str, Any]) -> None:
    m["graphs"]["scorer"] = {"inputs": []}


def _tokenizer_list(m: dict[str, Any]) -> None:
    m["tokenizer"] = ["vocab.json"]


def _config_without_embed_size(m: dict[str, Any]) -> None:
    del m["model_config"]["embed_size"]


def _files_list(m: dict[str, Any]) -> None:
    m["files"] = list(m["files"])


def _no_graphs(m: dict[str, Any]) -> None:
    del m["graphs"]


def _other_tokenizer(m: dict[str, Any]) -> None:
    m["tokenizer"]["word_pattern"] = r"\w+"


BUNDLES: list[Any] = [
    pytest.param(lambda root: shutil.rmtree(root), "does not exist", id="missing-folder"),
    pytest.param(_remove("manifest.json"), "manifest.json", id="missing-manifest"),
    pytest.param(
        lambda root: (root / "manifest.json").write_text("{not json"),
        "not valid JSON",
        id="manifest-not-json",
    ),
    pytest.param(_truncate("manifest.json"), "not valid JSON", id="manifest-truncated"),
    pytest.param(
        lambda root: (root / "manifest.json").write_bytes(b"\xff\xfe{}"), "manifest", id="manifest-not-utf8"
    ),
    pytest.param(
        lambda root: (root / "manifest.json").write_text("[1, 2]"), "JSON object", id="manifest-a-list"
    ),
    pytest.param(_remove("scorer.onnx"), "missing", id="missing-graph"),
    pytest.param(_remove("vocab.json"), "missing", id="missing-vocab"),
    pytest.param(_truncate("scorer.onnx"), "sha256", id="truncated-graph"),
    pytest.param(_truncate("text_encoder.onnx"), "sha256", id="truncated-text-encoder"),
    pytest.param(_flip_byte("image_encoder.onnx"), "sha256", id="tampered-graph"),
    pytest.param(_flip_byte("vocab.json"), "sha256", id="tampered-vocab"),
    pytest.param(_edit_manifest(_newer), "newer", id="newer-format"),
    pytest.param(_edit_manifest(_older), "older", id="older-format"),
    pytest.param(_edit_manifest(_version_str), "format_version", id="format-version-not-int"),
    pytest.param(_edit_manifest(_no_graphs), "graphs", id="no-graphs-key"),
    pytest.param(_edit_manifest(_graphs_list), "graphs", id="graphs-a-list"),
    pytest.param(_edit_manifest(_graph_entry_without_file), "scorer", id="graph-entry-without-file"),
    pytest.param(_edit_manifest(_tokenizer_list), "tokenizer", id="tokenizer-a-list"),
    pytest.param(_edit_manifest(_files_list), "files", id="files-a-list"),
    pytest.param(_edit_manifest(_config_without_embed_size), "embed_size", id="config-without-embed-size"),
    pytest.param(_edit_manifest(_other_tokenizer), "another tokenizer", id="exported-with-another-tokenizer"),
    pytest.param(_files_absolute, "relative paths", id="files-absolute-path"),
    pytest.param(_files_dotdot, "'..'", id="files-dotdot"),
    pytest.param(_files_symlink, "symlink", id="files-symlink"),
    pytest.param(_symlinked_dir, "symlink", id="files-symlinked-folder"),
    pytest.param(_graph_absolute, "relative paths", id="graph-absolute-path"),
    pytest.param(_graph_dotdot, "'..'", id="graph-dotdot"),
    pytest.param(_graph_symlink, "symlink", id="graph-symlink"),
    pytest.param(_graph_symlink_unlisted, "without a sha256", id="graph-symlink-not-hashed"),
    pytest.param(_vocab_dotdot, "'..'", id="vocab-dotdot"),
]


@pytest.mark.parametrize("damage, match", BUNDLES)
def test_load_refuses_a_bad_bundle_with_a_bundle_error(
    tiny_bundle: Path, tmp_path: Path, damage: Callable[[Path], None], match: str
) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    damage(root)
    _expect(lambda: Retriever.load(root), BundleError, match)


def test_fp16_precision_from_a_bundle_without_fp16_graphs_says_how_to_export_them(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    _edit_manifest(lambda m: m.pop("fp16_graphs"))(root)
    _expect(
        lambda: Retriever.load(root, OnnxRuntimeOptions(precision="fp16")),
        BundleError,
        "python -m export --fp16",
    )


def _index_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "index.json").read_text())


def _edit_index(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        m = _index_manifest(root)
        fn(m)
        (root / "index.json").write_text(json.dumps(m))

    return edit


def _index_file_outside(kind: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        m = _index_manifest(root)
        name = m["galleries"]["images"]["files"]["stage1"]
        outside = root.parent / f"outside-{name}"
        shutil.copy(root / name, outside)
        if kind == "absolute":
            new = str(outside)
        elif kind == "dotdot":
            new = f"../{outside.name}"
        else:
            new = "linked.npy"
            (root / new).symlink_to(outside)
        m["galleries"]["images"]["files"]["stage1"] = new
        m["files"][new] = m["files"].pop(name)
        (root / "index.json").write_text(json.dumps(m))

    return edit


def _other_bundle(m: dict[str, Any]) -> None:
    m["bundle_id"] = "0123456789abcdef"


def _index_newer(m: dict[str, Any]) -> None:
    m["format_version"] = INDEX_FORMAT_VERSION + 1


def _gallery_without_n(m: dict[str, Any]) -> None:
    del m["galleries"]["images"]["n"]


def _gallery_n_wrong(m: dict[str, Any]) -> None:
    m["galleries"]["images"]["n"] += 1


def _gallery_a_list(m: dict[str, Any]) -> None:
    m["galleries"]["images"] = [1, 2]


def _gallery_dims_wrong(m: dict[str, Any]) -> None:
    m["galleries"]["images"]["local_dim"] = 7
    m["galleries"]["images"]["stage1_dim"] = 14


def _gallery_dtype_bad(m: dict[str, Any]) -> None:
    m["galleries"]["images"]["dtype"] = "int8"


def _not_index(m: dict[str, Any]) -> None:
    m["format"] = "something-else"


def _index_file(gallery: str, array: str, fn: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        fn(root / f"{gallery}_{array}.npy" if array != "ids" else root / f"{gallery}_ids.json")

    return edit


def _trunc_file(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_file(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


INDEXES: list[Any] = [
    pytest.param(lambda root: shutil.rmtree(root), "not an mssan index", id="missing-folder"),
    pytest.param(_remove("index.json"), "not an mssan index", id="missing-manifest"),
    pytest.param(
        lambda root: (root / "index.json").write_text("{"), "not valid JSON", id="manifest-not-json"
    ),
    pytest.param(_truncate("index.json"), "not valid JSON", id="manifest-truncated"),
    pytest.param(
        lambda root: (root / "index.json").write_bytes(b"\xff\xfe"), "index.json", id="manifest-not-utf8"
    ),
    pytest.param(_edit_index(_not_index), "not an mssan index", id="other-format"),
    pytest.param(_edit_index(_index_newer), "newer", id="newer-format"),
    pytest.param(_edit_index(_other_bundle), "built with bundle", id="made-with-another-bundle"),
    pytest.param(_remove("images_local.npy"), "missing", id="missing-array"),
    pytest.param(_remove("texts_ids.json"), "missing", id="missing-ids"),
    pytest.param(_index_file("images", "local", _trunc_file), "sha256", id="truncated-array"),
    pytest.param(_index_file("images", "gram", _flip_file), "sha256", id="tampered-array"),
    pytest.param(_index_file("texts", "ids", _flip_file), "sha256", id="tampered-ids"),
    pytest.param(_edit_index(_gallery_without_n), "damaged", id="gallery-without-n"),
    pytest.param(_edit_index(_gallery_n_wrong), "do not match", id="gallery-n-wrong"),
    pytest.param(_edit_index(_gallery_a_list), "malformed", id="gallery-entry-a-list"),
    pytest.param(_edit_index(_gallery_dims_wrong), "do not match", id="gallery-dims-of-another-model"),
    pytest.param(_edit_index(_gallery_dtype_bad), "dtype", id="gallery-dtype-unknown"),
    pytest.param(_index_file_outside("absolute"), "unsafe", id="file-absolute-path"),
    pytest.param(_index_file_outside("dotdot"), "unsafe", id="file-dotdot"),
    pytest.param(_index_file_outside("symlink"), "unsafe", id="file-symlink"),
]


@pytest.mark.parametrize("damage, match", INDEXES)
def test_load_refuses_a_bad_index_with_an_index_file_error(
    tiny_bundle: Path, saved_index: Path, tmp_path: Path, damage: Callable[[Path], None], match: str
) -> None:
    root = tmp_path / "index"
    shutil.copytree(saved_index, root)
    damage(root)
    _expect(lambda: Retriever.load(tiny_bundle, index=root), IndexFileError, match)


def test_truncated_index_array_is_refused_even_without_verification(
    tiny_bundle: Path, saved_index: Path, tmp_path: Path
) -> None:
    root = tmp_path / "index"
    shutil.copytree(saved_index, root)
    _trunc_file(root / "images_local.npy")
    _expect(lambda: Retriever.load(tiny_bundle, index=root, verify=False), IndexFileError, "rebuild")


LOAD_OPTIONS: list[Any] = [
    pytest.param(dict(backend="nope"), InputError, "unknown backend", id="unknown-backend"),
    pytest.param(dict(device="gpu"), InputError, "device", id="unknown-device"),
    pytest.param(dict(threads=0), InputError, "threads", id="threads-zero"),
    pytest.param(dict(precision="int4"), InputError, "precision", id="unknown-precision"),
    pytest.param(dict(stage1="annoy"), InputError, "stage1", id="unknown-stage1"),
    pytest.param(dict(layout=("float32", "int4")), InputError, "local='int4'", id="unknown-local-dtype"),
    pytest.param(dict(layout="int4"), InputError, "layout", id="unknown-layout"),
    # removed names (docs/experiments/2026-12-06-stage1-scan.md) get the same error, listing what is left
    pytest.param(
        dict(layout="fp16"),
        InputError,
        "layout must be one of ['fp32', 'int8', 'int8-stage1'] or a layout, got 'fp16'",
        id="removed-layout-fp16",
    ),
    pytest.param(
        dict(layout=("float32", "float16")),
        InputError,
        "one of ('float32', 'int8')",
        id="removed-float16-locals",
    ),
    pytest.param(
        dict(stage1="faiss"),
        InputError,
        "stage1 method must be one of ('numpy', 'faiss-ivf'), got 'faiss'",
        id="removed-stage1-faiss",
    ),
    pytest.param(
        dict(stage1="faiss-hnsw"),
        InputError,
        "stage1 method must be one of ('numpy', 'faiss-ivf'), got 'faiss-hnsw'",
        id="removed-stage1-faiss-hnsw",
    ),
    pytest.param(
        dict(layout="int8", stage1="faiss-ivf"), InputError, "scans its own", id="layout-with-faiss-ivf"
    ),
    pytest.param(dict(batch_size=0), InputError, "batch_size", id="batch-size-zero"),
    pytest.param(dict(scorer_batch=-1), InputError, "scorer_batch", id="scorer-batch-negative"),
    pytest.param(dict(gather_threads=0), InputError, "gather_threads", id="gather-threads-zero"),
    pytest.param(dict(gather_threads=1.5), InputError, "gather_threads", id="gather-threads-float"),
    pytest.param(dict(rerank_threads=0), InputError, "rerank_threads", id="rerank-threads-zero"),
    pytest.param(dict(allow_spinning="no"), InputError, "allow_spinning", id="allow-spinning-str"),
    pytest.param(
        dict(session_config={"session.force_spinning_stop": 1}),
        InputError,
        "session_config",
        id="session-config-int-value",
    ),
    pytest.param(
        dict(session_config=["session.force_spinning_stop"]),
        InputError,
        "session_config",
        id="session-config-list",
    ),
    pytest.param(
        dict(graph_optimization="max"), InputError, "graph_optimization", id="unknown-ort-option-value"
    ),
    pytest.param(
        dict(backend=BackendOptions()), InputError, "names no registered backend", id="options-of-no-backend"
    ),
]

_BACKEND = {"device", "threads", "precision", "allow_spinning", "session_config", "graph_optimization"}
_GALLERY = {"layout", "stage1"}
_SEARCH = {"batch_size", "scorer_batch", "gather_threads", "rerank_threads"}


def _load(bundle: Path, **kw: Any) -> Retriever:
    """``Retriever.load`` with the flat settings of ``kw`` grouped into their option objects (made inside
    the call, so a bad value raises there)."""
    backend = kw.pop("backend", None)
    be = {k: kw.pop(k) for k in list(kw) if k in _BACKEND}
    ga = {k: kw.pop(k) for k in list(kw) if k in _GALLERY}
    se = {k: kw.pop(k) for k in list(kw) if k in _SEARCH}
    assert not kw, kw
    if isinstance(ga.get("layout"), tuple):
        ga["layout"] = Layout(*ga["layout"])
    if "stage1" in ga:
        ga["stage1"] = Stage1Options(method=ga["stage1"])
    return Retriever.load(
        bundle,
        backend if backend is not None else OnnxRuntimeOptions(**be),
        gallery=GalleryOptions(**ga) if ga else None,
        search=SearchOptions(**se) if se else None,
    )


def test_an_unknown_option_is_refused_by_its_options_class() -> None:
    with pytest.raises(TypeError, match="colour"):
        OnnxRuntimeOptions(colour="blue")  # type: ignore[call-arg]


@pytest.mark.parametrize("kwargs, error, match", LOAD_OPTIONS)
def test_load_refuses_bad_options_with_a_typed_error(
    tiny_bundle: Path, kwargs: dict[str, Any], error: type[MssanError], match: str
) -> None:
    _expect(lambda: _load(tiny_bundle, **kwargs), error, match)


# ---- python -m mssan_infer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory, saved_index: Path) -> Path:
    d = tmp_path_factory.mktemp("cli-bad")
    rng = np.random.default_rng(0)
    np.save(d / "feats.npy", rng.normal(size=(3, 4, DV)).astype(np.float32))
    np.save(d / "feats2d.npy", rng.normal(size=(3, DV)).astype(np.float32))
    np.save(d / "feats_dv.npy", rng.normal(size=(3, 4, DV + 2)).astype(np.float32))
    nan = rng.normal(size=(3, 4, DV)).astype(np.float32)
    nan[1, 1, 1] = np.nan
    np.save(d / "feats_nan.npy", nan)
    np.save(d / "feats_empty.npy", np.zeros((0, 4, DV), np.float32))
    np.save(d / "feats_obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "feats_str.npy", np.zeros((3, 4, DV), "U2"))
    (d / "feats_trunc.npy").write_bytes((d / "feats.npy").read_bytes()[:200])
    (d / "not_npy.npy").write_text("hello")
    (d / "caps.txt").write_text("a red dog\na blue ball\n")
    (d / "caps_latin1.txt").write_bytes("a red dog\ncaf\xe9 dog\n".encode("latin-1"))
    (d / "caps_empty.txt").write_text("\n  \n")
    (d / "caps_gap.txt").write_text("a red dog\n\na blue ball\n")
    (d / "caps_unknown.txt").write_text("a red dog\nquokka zebra\n")
    (d / "ids3.txt").write_text("a\nb\nc\n")
    (d / "ids2.txt").write_text("a\nb\n")
    (d / "ids_dup.txt").write_text("a\nb\na\n")
    (d / "a_file").write_text("x")
    tampered = d / "tampered"
    shutil.copytree(saved_index, tampered)
    _flip_file(tampered / "images_stage1.npy")
    other = d / "other"
    shutil.copytree(saved_index, other)
    _edit_index(_other_bundle)(other)
    return d


CLI: list[Any] = [
    pytest.param(["info", "--bundle", "{missing}"], "does not exist", id="info-missing-bundle"),
    pytest.param(["info", "--bundle", "{d}"], "manifest.json", id="info-not-a-bundle"),
    pytest.param(
        ["info", "--bundle", "{bundle}", "--index", "{missing}"],
        "not an mssan index",
        id="info-missing-index",
    ),
    pytest.param(["index", "--bundle", "{bundle}", "--out", "{out}"], "nothing to index", id="index-nothing"),
    pytest.param(
        ["index", "--bundle", "{missing}", "--out", "{out}", "--images", "{d}/feats.npy"],
        "does not exist",
        id="index-missing-bundle",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/none.npy"],
        "cannot read features",
        id="index-missing-features",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/not_npy.npy"],
        "not_npy.npy is not a .npy file",
        id="index-features-not-npy",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_trunc.npy"],
        "cannot read features",
        id="index-features-truncated",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_obj.npy"],
        "holds Python objects (a pickled array), which are never loaded",
        id="index-features-pickled-objects",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats2d.npy"],
        "[N, R, Dv]",
        id="index-features-ndim",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_dv.npy"],
        "[N, R, 24]",
        id="index-features-size",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_str.npy"],
        "real numbers",
        id="index-features-dtype",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_nan.npy"],
        "feats_nan.npy: row 1 has NaN or inf (region 1)",
        id="index-features-nan",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}/feats_empty.npy"],
        "feats_empty.npy holds no images",
        id="index-features-empty",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--images", "{d}"],
        "has no pixel graph",
        id="index-image-folder-without-pixel-graph",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps_gap.txt"],
        "line 2 is blank",
        id="index-captions-blank-line",
    ),
    pytest.param(
        ["remove", "--bundle", "{bundle}", "--index", "{index}", "--ids", "nope"],
        "nothing was removed",
        id="remove-unknown-id",
    ),
    pytest.param(
        [
            "index",
            "--bundle",
            "{bundle}",
            "--out",
            "{out}",
            "--images",
            "{d}/feats.npy",
            "--ids",
            "{d}/ids2.txt",
        ],
        "2 ids for 3 images",
        id="index-id-count",
    ),
    pytest.param(
        [
            "index",
            "--bundle",
            "{bundle}",
            "--out",
            "{out}",
            "--images",
            "{d}/feats.npy",
            "--ids",
            "{d}/ids_dup.txt",
        ],
        "duplicate",
        id="index-duplicate-ids",
    ),
    pytest.param(
        [
            "index",
            "--bundle",
            "{bundle}",
            "--out",
            "{out}",
            "--texts",
            "{d}/caps.txt",
            "--ids",
            "{d}/ids3.txt",
        ],
        "--ids needs --images",
        id="index-ids-without-images",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps_latin1.txt"],
        "cannot read captions",
        id="index-captions-not-utf8",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps_empty.txt"],
        "empty",
        id="index-captions-empty-file",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps_unknown.txt"],
        "vocabulary",
        id="index-captions-unknown-words",
    ),
    pytest.param(
        [
            "index",
            "--bundle",
            "{bundle}",
            "--out",
            "{out}",
            "--texts",
            "{d}/caps.txt",
            "--text-ids",
            "{d}/ids3.txt",
        ],
        "3 ids for 2 captions",
        id="index-text-id-count",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{d}/a_file", "--texts", "{d}/caps.txt"],
        "not an mssan index",
        id="index-out-is-a-file",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{d}/a_file/x", "--texts", "{d}/caps.txt"],
        "cannot write",
        id="index-out-under-a-file",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps.txt", "--threads", "0"],
        "--threads must be a positive int",
        id="index-threads-zero",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps.txt", "--batch-size", "0"],
        "--batch-size must be a positive int",
        id="index-batch-size-zero",
    ),
    pytest.param(
        ["index", "--bundle", "{bundle}", "--out", "{out}", "--texts", "{d}/caps.txt", "--backend", "x"],
        "unknown backend",
        id="index-unknown-backend",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "quokka"],
        "vocabulary",
        id="search-unknown-words",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "   "], "no words", id="search-whitespace"
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "a dog", "-k", "0"],
        "k must be",
        id="search-k-zero",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "a dog", "-k", "-2"],
        "k must be",
        id="search-k-negative",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "a dog", "--rerank", "-1"],
        "rerank",
        id="search-rerank-negative",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}"], "give a caption", id="search-no-query"
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "--image", "{d}/feats.npy", "--row", "3"],
        "outside",
        id="search-row-outside",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "--image", "{d}/feats.npy", "--row", "-1"],
        "outside",
        id="search-row-negative",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{index}", "--image", "{d}/feats_dv.npy"],
        "24",
        id="search-image-feature-size",
    ),
    pytest.param(
        [
            "search",
            "--bundle",
            "{bundle}",
            "--index",
            "{index}",
            "--image",
            "{d}/feats_nan.npy",
            "--row",
            "1",
        ],
        "NaN",
        id="search-image-nan",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{missing}", "a dog"],
        "not an mssan index",
        id="search-missing-index",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{d}/tampered", "a dog"],
        "sha256",
        id="search-tampered-index",
    ),
    pytest.param(
        ["search", "--bundle", "{bundle}", "--index", "{d}/other", "a dog"],
        "built with bundle",
        id="search-index-of-another-bundle",
    ),
]


@pytest.mark.parametrize("argv, match", CLI)
def test_mssan_infer_cli_exits_1_with_a_one_line_typed_message(
    tiny_bundle: Path, saved_index: Path, cli_files: Path, tmp_path: Path, argv: list[str], match: str
) -> None:
    from mssan_infer.cli.main import main

    subs = {
        "{bundle}": str(tiny_bundle),
        "{index}": str(saved_index),
        "{missing}": str(tmp_path / "missing"),
        "{out}": str(tmp_path / "out"),
        "{d}": str(cli_files),
    }
    args = []
    for a in argv:
        for key, value in subs.items():
            a = a.replace(key, value)
        args.append(a)
    out, err = io.StringIO(), io.StringIO()
    code = main(args, out=out, err=err)
    text = err.getvalue()
    assert code == 1, (out.getvalue(), text)
    assert text.startswith("error: ") and text.count("\n") == 1 and match.lower() in text.lower(), text
    assert not (tmp_path / "out").exists()


def test_mssan_infer_cli_with_non_utf8_argv_fails_cleanly(tiny_bundle: Path, saved_index: Path) -> None:
    """A caption of bytes that are not UTF-8 (surrogate-escaped by Python) is an unknown-word error,
    not a crash."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mssan_infer",
            "search",
            "--bundle",
            str(tiny_bundle),
            "--index",
            str(saved_index),
            b"\xff\xfe \xc3",
        ],
        cwd=ROOT,
        capture_output=True,
    )
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 1 and err.startswith("error: ") and "Traceback" not in err, err


# ---- export_bundle and python -m export -----------------------------------------------------------
def _ckpt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _ck_missing(ck: Path, tmp: Path) -> dict[str, Any]:
    return dict(checkpoint=tmp / "missing", out=tmp / "b")


def _ck_file(ck: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "ck.txt").write_text("x")
    return dict(checkpoint=tmp / "ck.txt", out=tmp / "b")


def _ck_edit(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path, Path], dict[str, Any]]:
    def make(ck: Path, tmp: Path) -> dict[str, Any]:
        c = _ckpt_copy(ck, tmp / "ck")
        old = (c / name).read_bytes()
        (c / name).write_bytes(data(old) if callable(data) else data)
        return dict(checkpoint=c, out=tmp / "b")

    return make


def _ck_remove(name: str) -> Callable[[Path, Path], dict[str, Any]]:
    def make(ck: Path, tmp: Path) -> dict[str, Any]:
        c = _ckpt_copy(ck, tmp / "ck")
        (c / name).unlink()
        return dict(checkpoint=c, out=tmp / "b")

    return make


def _ck_bigger_vocab(ck: Path, tmp: Path) -> dict[str, Any]:
    c = _ckpt_copy(ck, tmp / "ck")
    vocab = json.loads((c / "vocab.json").read_text())
    vocab["zzzextra"] = len(vocab)
    (c / "vocab.json").write_text(json.dumps(vocab))
    return dict(checkpoint=c, out=tmp / "b")


def _ck_unknown_config_key(ck: Path, tmp: Path) -> dict[str, Any]:
    c = _ckpt_copy(ck, tmp / "ck")
    cfg = json.loads((c / "config.json").read_text())
    cfg["model"]["colour"] = "blue"
    (c / "config.json").write_text(json.dumps(cfg))
    return dict(checkpoint=c, out=tmp / "b")


def _out_is_checkpoint(ck: Path, tmp: Path) -> dict[str, Any]:
    c = _ckpt_copy(ck, tmp / "ck")
    return dict(checkpoint=c, out=c)


def _out_is_a_file(ck: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "b").write_text("precious")
    return dict(checkpoint=ck, out=tmp / "b")


def _out_is_a_folder(ck: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "b").mkdir()
    (tmp / "b" / "notes.txt").write_text("precious")
    return dict(checkpoint=ck, out=tmp / "b")


def _opt(**kw: Any) -> Callable[[Path, Path], dict[str, Any]]:
    return lambda ck, tmp: dict(checkpoint=ck, out=tmp / "b", **kw)


EXPORT: list[Any] = [
    pytest.param(_ck_missing, "BundleError", "not a checkpoint folder", id="checkpoint-missing"),
    pytest.param(_ck_file, "BundleError", "not a checkpoint folder", id="checkpoint-is-a-file"),
    pytest.param(
        _ck_remove("model.safetensors"), "BundleError", "model.safetensors is missing", id="weights-missing"
    ),
    pytest.param(
        _ck_edit("model.safetensors", lambda b: b[: len(b) // 2]),
        "BundleError",
        "cannot load weights",
        id="weights-truncated",
    ),
    pytest.param(
        _ck_edit("model.safetensors", b"\x00" * 64),
        "BundleError",
        "cannot load weights",
        id="weights-garbage",
    ),
    pytest.param(_ck_edit("config.json", b"{not json"), "BundleError", "damaged", id="config-not-json"),
    pytest.param(_ck_edit("config.json", b"\xff\xfe"), "BundleError", "damaged", id="config-not-utf8"),
    pytest.param(_ck_edit("config.json", b"{}"), "BundleError", "damaged", id="config-without-model"),
    pytest.param(_ck_unknown_config_key, "BundleError", "colour", id="config-unknown-key"),
    pytest.param(_ck_edit("state.json", b"[1"), "BundleError", "damaged", id="state-not-json"),
    pytest.param(_ck_edit("vocab.json", b"[]"), "BundleError", "word->id", id="vocab-not-an-object"),
    pytest.param(
        _ck_edit("vocab.json", b'{"a": 0}'), "BundleError", "vocabulary must map", id="vocab-without-specials"
    ),
    pytest.param(_ck_bigger_vocab, "BundleError", "vocab_size", id="vocab-bigger-than-model"),
    pytest.param(
        _out_is_checkpoint, "ExportError", "would replace the checkpoint", id="out-is-the-checkpoint"
    ),
    pytest.param(_out_is_a_file, "ExportError", "not an export bundle", id="out-is-a-file"),
    pytest.param(_out_is_a_folder, "ExportError", "not an export bundle", id="out-is-a-non-bundle-folder"),
    pytest.param(_opt(opset=5), "ExportError", "opset", id="opset-too-old"),
    pytest.param(_opt(opset="17"), "ExportError", "opset", id="opset-str"),
    pytest.param(_opt(atol=-1.0), "ExportError", "atol", id="atol-negative"),
    pytest.param(_opt(atol=0), "ExportError", "atol", id="atol-zero"),
    pytest.param(_opt(tensorrt=True), "BackendUnavailableError", "tensorrt", id="tensorrt-not-installed"),
]


@pytest.mark.parametrize("make, error, match", EXPORT)
def test_export_bundle_refuses_bad_input_with_a_typed_error_and_writes_nothing(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path, Path], dict[str, Any]],
    error: str,
    match: str,
) -> None:
    from export import export_bundle

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    kwargs = make(tiny_checkpoint, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    e = _expect(lambda: export_bundle(**kwargs), MssanError, match)
    assert type(e).__name__ == error, f"{type(e).__name__}: {e}"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize(
    "make, error, match",
    [
        p
        for p in EXPORT
        if p.id
        in (
            "checkpoint-missing",
            "weights-truncated",
            "config-not-json",
            "vocab-bigger-than-model",
            "out-is-a-file",
            "opset-too-old",
            "atol-negative",
            "tensorrt-not-installed",
        )
    ],
)
def test_export_cli_exits_1_with_a_one_line_typed_message(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path, Path], dict[str, Any]],
    error: str,
    match: str,
) -> None:
    from export.__main__ import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    kw = make(tiny_checkpoint, tmp_path)
    argv = ["--checkpoint", str(kw.pop("checkpoint")), "--out", str(kw.pop("out")), "-q"]
    for key, value in kw.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the one error line of every MSSAN CLI: `error: <message>`, without the class name
    assert err and err[-1].startswith("error: ") and match.lower() in err[-1].lower(), err
    assert f"{error}:" not in err[-1]
    assert not any("Traceback" in line for line in err)


# ---- python -m training ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def precomp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A precomp folder with one good split and several broken ones."""
    d = tmp_path_factory.mktemp("precomp")
    rng = np.random.default_rng(0)
    caps = "\n".join(["a red dog on the beach"] * 10) + "\n"

    def split(name: str, ims: Any, text: str = caps, mask: Any = None, raw: bytes | None = None) -> None:
        if raw is not None:
            (d / f"{name}_ims.npy").write_bytes(raw)
        else:
            np.save(d / f"{name}_ims.npy", ims, allow_pickle=ims.dtype == object)
        (d / f"{name}_caps.txt").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        if mask is not None:
            np.save(d / f"{name}_masks.npy", mask)

    good = rng.normal(size=(2, 3, DV)).astype(np.float32)
    split("good", good)
    split("ndim", good[0])
    split("ints", good.astype(np.int32))
    split("objects", np.array([None, {"a": 1}], dtype=object))
    split("empty", good[:0], text="")
    split("count", good, text="\n".join(["a dog"] * 9) + "\n")
    split("latin1", good, text=("caf\xe9 dog\n" * 10).encode("latin-1"))
    split("maskshape", good, mask=np.ones((2, 4), np.float32))
    split("maskndim", good, mask=np.ones((2, 3, 1), np.float32))
    np.save(d / "trunc_src.npy", good)
    split("trunc", None, raw=(d / "trunc_src.npy").read_bytes()[:150])
    nan = good.copy()
    nan[1, 0, 0] = np.nan
    split("nan", nan)
    (d / "nocaps_ims.npy").write_bytes((d / "good_ims.npy").read_bytes())
    (d / "karpathy_bad.json").write_text('{"images": [{"filename": "a.jpg"}]}')
    (d / "karpathy_list.json").write_text("[1, 2]")
    (d / "karpathy_latin1.json").write_bytes('{"images": [], "x": "caf\xe9"}'.encode("latin-1"))
    return d


def _loader(name: str, *args: Any) -> Callable[[Path], Any]:
    def call(d: Path) -> Any:
        from training import data

        real = [d / a[2:] if isinstance(a, str) and a.startswith("d/") else a for a in args]
        return getattr(data, name)(*real)

    return call


def _split_then(split: str, what: str) -> Callable[[Path], Any]:
    def call(d: Path) -> Any:
        from training.data import PairDataset, iterate_images, load_split

        s = load_split(d, split)
        if what == "image":
            return s.image(1)
        if what == "batches":
            return list(iterate_images(s, 2))
        if what == "pairs":
            from mssan_infer.text.words import Tokenizer, build_vocab

            ds = PairDataset(s, Tokenizer(build_vocab(["a dog"] * 4)))
            return [ds[k] for k in range(len(ds))]
        raise AssertionError(what)

    return call


def _in_memory(images: Any, captions: list[str], mask: Any = None) -> Callable[[Path], Any]:
    def call(d: Path) -> Any:
        from training.data import PrecompSplit

        return PrecompSplit(images, mask, captions, name="mem")

    return call


def _iterate_bad_batch(fn: str) -> Callable[[Path], Any]:
    def call(d: Path) -> Any:
        from mssan_infer.text.words import Tokenizer, build_vocab
        from training import data

        s = data.load_split(d, "good")
        if fn == "images":
            return list(data.iterate_images(s, 0))
        return list(data.iterate_captions(s, Tokenizer(build_vocab(["a dog"] * 4)), -1))

    return call


LOADERS: list[Any] = [
    pytest.param(_loader("load_split", "d/missing-dir", "train"), "incomplete", id="split-folder-missing"),
    pytest.param(_loader("load_split", "d/", "nosuch"), "incomplete", id="split-missing"),
    pytest.param(_loader("load_split", "d/", "nocaps"), "incomplete", id="split-without-captions"),
    pytest.param(_loader("load_split", "d/", "ndim"), "[N, R, Dv]", id="features-ndim"),
    pytest.param(_loader("load_split", "d/", "ints"), "floating point", id="features-dtype-int"),
    pytest.param(_loader("load_split", "d/", "objects"), "no pickled objects", id="features-pickled-objects"),
    pytest.param(_loader("load_split", "d/", "trunc"), "cannot read", id="features-truncated"),
    pytest.param(_loader("load_split", "d/", "empty"), "no images", id="empty-split"),
    pytest.param(_loader("load_split", "d/", "count"), "9 captions for 2 images", id="caption-count"),
    pytest.param(_loader("load_split", "d/", "latin1"), "UTF-8", id="captions-not-utf8"),
    pytest.param(_loader("load_split", "d/", "maskshape"), "region mask", id="mask-shape"),
    pytest.param(_loader("load_split", "d/", "maskndim"), "region mask", id="mask-ndim"),
    pytest.param(_split_then("nan", "image"), "NaN", id="features-nan-image"),
    pytest.param(_split_then("nan", "batches"), "image 1", id="features-nan-batches"),
    pytest.param(_split_then("nan", "pairs"), "NaN", id="features-nan-pairs"),
    pytest.param(_loader("read_captions", "d/none_caps.txt"), "cannot read", id="captions-file-missing"),
    pytest.param(_loader("read_karpathy", "d/none.json"), "not found", id="karpathy-missing"),
    pytest.param(_loader("read_karpathy", "d/good_caps.txt"), "JSON", id="karpathy-not-json"),
    pytest.param(_loader("read_karpathy", "d/karpathy_list.json"), "not a Karpathy", id="karpathy-a-list"),
    pytest.param(
        _loader("read_karpathy", "d/karpathy_bad.json"), "Karpathy format", id="karpathy-missing-fields"
    ),
    pytest.param(_loader("read_karpathy", "d/karpathy_latin1.json"), "cannot read", id="karpathy-not-utf8"),
    pytest.param(_in_memory([[1.0]], ["a"] * 5), "[N, R, Dv]", id="in-memory-list"),
    pytest.param(
        _in_memory(np.zeros((1, 2, 3), np.complex64), ["a"] * 5), "floating", id="in-memory-complex"
    ),
    pytest.param(_loader("collate", []), "empty batch", id="collate-empty-batch"),
    pytest.param(_iterate_bad_batch("images"), "batch_size", id="iterate-images-batch-size-0"),
    pytest.param(_iterate_bad_batch("captions"), "batch_size", id="iterate-captions-batch-size-negative"),
]


@pytest.mark.parametrize("call, match", LOADERS)
def test_training_data_loaders_refuse_bad_input_with_an_input_error(
    precomp: Path, call: Callable[[Path], Any], match: str
) -> None:
    _expect(lambda: call(precomp), InputError, match)


def test_training_tokenizer_truncates_long_captions_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from mssan_infer.text.words import Tokenizer, build_vocab

    tok = Tokenizer(build_vocab(["a dog"] * 4), max_len=4)
    with caplog.at_level(logging.WARNING):
        tokens, mask = tok.encode_batch(["a dog a dog a dog", "a dog"])
    assert tokens.shape == (2, 4) and mask.sum() == 6
    assert any("truncated to max_len=4" in r.getMessage() for r in caplog.records)


TRAINING_CLI: list[Any] = [
    pytest.param(
        ["eval", "--checkpoint", "{tmp}/missing", "--data", "{d}"],
        "not a checkpoint folder",
        id="eval-checkpoint-missing",
    ),
    pytest.param(
        ["eval", "--checkpoint", "{ck}", "--data", "{tmp}/missing"], "incomplete", id="eval-data-missing"
    ),
    pytest.param(
        ["eval", "--checkpoint", "{ck}", "--data", "{d}", "--split", "nosuch"],
        "incomplete",
        id="eval-split-missing",
    ),
    pytest.param(
        ["eval", "--checkpoint", "{ck}", "--data", "{d}", "--split", "ndim"],
        "[N, R, Dv]",
        id="eval-features-ndim",
    ),
    pytest.param(
        ["eval", "--checkpoint", "{ck}", "--data", "{d}", "--split", "latin1"],
        "UTF-8",
        id="eval-captions-not-utf8",
    ),
    pytest.param(
        ["train", "--data", "{tmp}/missing", "--out", "{tmp}/run", "--epochs", "1", "--no-progress"],
        "incomplete",
        id="train-data-missing",
    ),
    pytest.param(["synth", "--out", "{tmp}/s", "--images", "0"], ">= 1", id="synth-zero-images"),
    pytest.param(["synth", "--out", "{d}/good_ims.npy", "--images", "2"], "error", id="synth-out-is-a-file"),
]


@pytest.mark.parametrize("argv, match", TRAINING_CLI)
def test_training_cli_exits_1_with_a_one_line_message(
    tiny_checkpoint: Path,
    precomp: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    match: str,
) -> None:
    from training.__main__ import main

    subs = {"{ck}": str(tiny_checkpoint), "{d}": str(precomp), "{tmp}": str(tmp_path)}
    args = []
    for a in argv:
        for key, value in subs.items():
            a = a.replace(key, value)
        args.append(a)
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and match.lower() in err[0].lower(), err
