"""The pixel path end to end: images -> features -> short training -> bundle with the pixel graph -> parity
-> Retriever with paths, PIL images and uint8 arrays in add_images / search(image=...).

Tiny backbone (``resnet-tiny``, 256-d, 2x2 grid at 64 px) and small images, so it stays fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export import ExportError, export_bundle
from export.__main__ import main as export_main
from export.pixels import (
    PIXEL_PRECISION,
    PixelEncoderGraph,
    export_pixel_graph,
    load_pixel_backbone,
    pixel_settings,
)
from export.validate import raise_if_failed
from mssan_infer import Retriever
from mssan_infer.bundle import load_bundle
from mssan_infer.errors import BundleError, InputError, ParityError
from mssan_infer.images.preprocess import Preprocessing, load_image, preprocess_batch
from mssan_infer.spec import GRAPHS, IMAGE_ENCODER_PIXELS, OPTIONAL_GRAPHS, QUERY_SCORERS, TOLERANCES
from training.checkpoint import load_checkpoint
from training.data import load_split
from training.images import karpathy_splits, write_features

from .test_images import karpathy_doc, make_images, tiny_weights

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images -> resnet-tiny features -> 1 short epoch of training -> bundle with the pixel graph (CLI)."""
    from training.train import train

    root = tmp_path_factory.mktemp("pixels")
    splits = ["train"] * 10 + ["restval"] * 2 + ["val"] * 3 + ["test"] * 4
    names = make_images(root / "imgs", len(splits), seed=1)
    (root / "k.json").write_text(json.dumps(karpathy_doc(names, splits)))
    weights = tiny_weights(root / "bb.safetensors", seed=3)
    write_features(
        root / "imgs",
        root / "k.json",
        root / "data",
        backbone="resnet-tiny",
        weights=weights,
        image_size=SIZE,
        batch_size=8,
        progress=False,
    )
    with (
        torch.enable_grad()
    ):  # `python -m training eval` run in-process by other tests turns grad off globally
        train(
            root / "data",
            root / "ckpt",
            preset="tiny",
            text_encoder="bigru",  # the fast tower: the tower is not what this tests
            epochs=1,
            max_steps=2,
            progress=False,
            model_overrides={"embed_size": 32, "word_dim": 16},
            train_overrides={"batch_size": 20, "vocab_threshold": 1, "eval_rerank": 5},
        )
    rc = export_main(
        [
            "--checkpoint",
            str(root / "ckpt"),
            "--out",
            str(root / "bundle"),
            "--pixels",
            "--features",
            str(root / "data"),
            "--backbone-weights",
            str(weights),
            "-q",
        ]
    )
    assert rc == 0
    return {
        "root": root,
        "images": root / "imgs",
        "karpathy": root / "k.json",
        "weights": weights,
        "data": root / "data",
        "ckpt": root / "ckpt",
        "bundle": root / "bundle",
    }


def test_pixel_graph_is_optional_hashed_and_described_in_the_manifest(e2e: dict[str, Path]) -> None:
    b = load_bundle(e2e["bundle"])  # verifies every sha256
    m = b.manifest.raw
    assert IMAGE_ENCODER_PIXELS.name not in GRAPHS and IMAGE_ENCODER_PIXELS.name in OPTIONAL_GRAPHS
    assert set(m["graphs"]) == set(GRAPHS) | set(QUERY_SCORERS)
    entry = m["optional_graphs"][IMAGE_ENCODER_PIXELS.name]
    assert entry["file"] == "image_encoder_pixels.onnx" and entry["file"] in m["files"]
    assert entry["backbone"] == "resnet-tiny" and entry["inputs"][0]["axes"] == ["B", "C", "H", "W"]
    prep = m["preprocessing"]["image"]
    assert Preprocessing.from_dict(prep) == Preprocessing(image_size=SIZE, resize=SIZE)
    assert prep["channel_order"] == "RGB" and prep["layout"] == "NCHW" and prep["resample"] == "bilinear"
    assert (
        prep["mean"] == [0.485, 0.456, 0.406]
        and prep["std"] == [0.229, 0.224, 0.225]
        and prep["grid"] == [2, 2]
    )
    assert m["preprocessing"]["feature_dim"] == 256 and m["verified"] is True


def test_pixel_parity_covers_two_sizes_and_batch_one_and_several(e2e: dict[str, Path]) -> None:
    rep = json.loads((e2e["bundle"] / "manifest.json").read_text())["parity"][PIXEL_PRECISION]
    assert rep["passed"] and not rep["failures"]
    cases = rep["graphs"][IMAGE_ENCODER_PIXELS.name]
    shapes = [c["shapes"]["img_local"] for c in cases.values()]
    assert {s[0] for s in shapes} >= {1, 3} and {s[1] for s in shapes} == {4, 1}  # 64 px -> 2x2, 32 px -> 1x1
    assert all(v <= TOLERANCES["fp32"].atol for c in cases.values() for v in c["max_abs"].values())


def test_pixel_graph_equals_region_graph_on_the_written_features(e2e: dict[str, Path]) -> None:
    """numpy preprocessing + pixel graph (ORT) == image_encoder (ORT) on features from torch's transform."""
    split = load_split(e2e["data"], "test")
    paths = karpathy_splits(e2e["images"], e2e["karpathy"])["test"].paths
    pixels = preprocess_batch(paths, Preprocessing(image_size=SIZE, resize=SIZE))
    pix = ort.InferenceSession(
        str(e2e["bundle"] / "image_encoder_pixels.onnx"), providers=["CPUExecutionProvider"]
    )
    reg = ort.InferenceSession(str(e2e["bundle"] / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = pix.run(None, {"pixels": pixels})
    regions = np.asarray(split.images, np.float32)
    want = reg.run(None, {"regions": regions, "region_mask": np.ones(regions.shape[:2], np.float32)})
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g - w).max() < 1e-4


def test_parity_failure_of_the_pixel_graph_is_reported_and_fatal(
    e2e: dict[str, Path], tmp_path: Path
) -> None:
    model = load_checkpoint(e2e["ckpt"]).model
    backbone = load_pixel_backbone(model, "resnet-tiny", e2e["weights"])
    with pytest.MonkeyPatch.context() as mp:  # a graph that drifts from PyTorch: perturb after export
        import export.pixels as px

        real = px.export_graph

        def export_then_perturb(*a: object, **k: object) -> Path:
            out = real(*a, **k)  # type: ignore[arg-type]
            backbone.layer4[0].bn3.running_mean.add_(0.5)  # PyTorch reference changes, the file does not
            return out

        mp.setattr(px, "export_graph", export_then_perturb)
        report, _ = export_pixel_graph(model, backbone, tmp_path, Preprocessing(SIZE, SIZE))
    assert not report.passed and all(
        f.startswith(f"[{PIXEL_PRECISION}] image_encoder_pixels") for f in report.failures
    )
    with pytest.raises(ParityError, match="image_encoder_pixels"):
        raise_if_failed([report])


def test_export_refuses_a_backbone_whose_features_the_model_was_not_trained_on(
    tiny_checkpoint: Path, e2e: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="img_dim"):
        export_bundle(
            tiny_checkpoint,
            tmp_path / "b",
            pixels=True,
            backbone="resnet-tiny",
            backbone_weights=e2e["weights"],
            image_size=SIZE,
        )
    with pytest.raises(ExportError, match="--backbone-weights"):
        export_bundle(e2e["ckpt"], tmp_path / "b", pixels=True, backbone="resnet-tiny", image_size=SIZE)
    with pytest.raises(ExportError, match="do not fit"):
        export_bundle(
            e2e["ckpt"],
            tmp_path / "b",
            pixels=True,
            backbone="resnet50",
            backbone_weights=e2e["weights"],
            image_size=SIZE,
        )
    assert not (tmp_path / "b").exists()


def test_settings_come_from_features_json_and_contradictions_are_refused(
    e2e: dict[str, Path], tmp_path: Path
) -> None:
    st = pixel_settings(e2e["data"], weights=e2e["weights"])
    assert st.backbone == "resnet-tiny" and st.preprocessing == Preprocessing(SIZE, SIZE)
    assert pixel_settings().backbone == "resnet152" and pixel_settings().preprocessing.image_size == 448
    with pytest.raises(ExportError, match="image_size 224 != recorded 64"):
        pixel_settings(e2e["data"], image_size=224)
    other = tiny_weights(tmp_path / "other.safetensors", seed=9)
    with pytest.raises(ExportError, match="sha256 differs"):
        pixel_settings(e2e["data"] / "features.json", weights=other)
    with pytest.raises(ExportError, match="features.json"):
        pixel_settings(tmp_path)


def test_pixel_wrapper_reuses_the_model_image_encoder(e2e: dict[str, Path]) -> None:
    model = load_checkpoint(e2e["ckpt"]).model
    backbone = load_pixel_backbone(model, "resnet-tiny", e2e["weights"])
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        regions = backbone(x)
        want = model.encode_image(regions, torch.ones(regions.shape[:2]))
        got = PixelEncoderGraph(backbone, model)(x)
    assert all(torch.equal(g, w) for g, w in zip(got, (want.stage1, want.local, want.gram)))


# ---- Retriever ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_images(e2e: dict[str, Path]) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths, written features ``[N,4,256]`` and captions of the test split."""
    split = load_split(e2e["data"], "test")
    paths = karpathy_splits(e2e["images"], e2e["karpathy"])["test"].paths
    return paths, np.asarray(split.images, np.float32), split.captions


@pytest.fixture()
def retriever(e2e: dict[str, Path]) -> Retriever:
    return Retriever.load(e2e["bundle"])


def test_images_from_paths_encode_like_their_region_features(
    retriever: Retriever, test_images: tuple[list[Path], np.ndarray, list[str]]
) -> None:
    paths, feats, _ = test_images
    from_pixels = retriever.encode_images(paths)
    from_regions = retriever.encode_images(feats)
    assert from_pixels.local.shape == from_regions.local.shape == (len(paths), 4, 32)
    for a, b in zip(
        (from_pixels.stage1, from_pixels.local, from_pixels.gram),
        (from_regions.stage1, from_regions.local, from_regions.gram),
    ):
        assert np.abs(a - b).max() < 1e-4
    assert np.array_equal(from_pixels.mask, np.ones((len(paths), 4), np.float32))


def test_paths_pil_images_and_uint8_arrays_give_the_same_encoding(
    retriever: Retriever, test_images: tuple[list[Path], np.ndarray, list[str]]
) -> None:
    paths = test_images[0]
    pil = [Image.open(p) for p in paths[:2]]
    arrays = [np.asarray(load_image(p)) for p in paths[:2]]
    ref = retriever.encode_images([str(p) for p in paths[:2]]).stage1
    assert np.allclose(retriever.encode_images(pil).stage1, ref, atol=1e-6)
    assert np.allclose(retriever.encode_images(arrays).stage1, ref, atol=1e-6)
    stacked = np.stack([arrays[1], arrays[1]])  # [N,H,W,3] uint8
    assert np.allclose(retriever.encode_images(stacked).stage1, ref[[1, 1]], atol=1e-6)
    assert np.allclose(retriever.encode_images(arrays[0]).stage1, ref[:1], atol=1e-6)  # one [H,W,3]


def test_index_and_search_with_images_match_the_region_path(
    retriever: Retriever, e2e: dict[str, Path], test_images: tuple[list[Path], np.ndarray, list[str]]
) -> None:
    paths, feats, captions = test_images
    ids = [p.stem for p in paths]
    assert retriever.add_images(paths, ids=ids) == ids
    retriever.add_texts(captions)
    regions = Retriever.load(e2e["bundle"])
    regions.add_images(feats, ids=ids)
    regions.add_texts(captions)
    for q in (captions[0], captions[7]):
        got, want = retriever.search(text=q, k=3, rerank=4), regions.search(text=q, k=3, rerank=4)
        assert [h.id for h in got] == [h.id for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
    got = retriever.search(image=paths[1], k=5, rerank=10)
    want = regions.search(image=feats[1], k=5, rerank=10)
    assert [h.id for h in got] == [h.id for h in want]
    assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
    assert [h.id for h in retriever.search(image=Image.open(paths[1]), k=5, rerank=10)] == [h.id for h in got]
    assert [h.id for h in retriever.search(image=str(paths[1]), k=5, rerank=10)] == [h.id for h in got]


def test_images_given_as_paths_keep_their_path_as_source_and_file_bytes_search_like_the_file(
    retriever: Retriever, test_images: tuple[list[Path], np.ndarray, list[str]]
) -> None:
    paths, _, captions = test_images
    retriever.add_images([paths[0], str(paths[1])], ids=["p0", "p1"])
    retriever.add_images([paths[2].read_bytes(), Image.open(paths[3])], ids=["b2", "i3"])
    retriever.add_images([paths[0]], ids=["named"], sources=["photos/first.jpg"])
    hits = {h.id: h for h in retriever.search(text=captions[0], k=5)}
    assert hits["p0"].source == str(paths[0]) and hits["p1"].source == str(paths[1])
    assert hits["b2"].source is None and hits["i3"].source is None
    assert hits["named"].source == "photos/first.jpg"
    retriever.add_texts(captions)
    by_path = retriever.search(image=paths[1], k=4)
    by_bytes = retriever.search(image=paths[1].read_bytes(), k=4)
    assert [(h.id, h.text) for h in by_bytes] == [(h.id, h.text) for h in by_path]
    assert [h.text for h in by_path] == [captions[int(h.id)] for h in by_path]
    assert np.allclose([h.score for h in by_bytes], [h.score for h in by_path], atol=1e-6)


def test_bad_image_files_are_named_and_nothing_is_added(
    retriever: Retriever, test_images: tuple[list[Path], np.ndarray, list[str]], tmp_path: Path
) -> None:
    paths = test_images[0]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(paths[0].read_bytes()[:60] if paths[0].suffix == ".jpg" else b"\xff\xd8\xff\xe0junk")
    with pytest.raises(InputError, match=r"cut\.jpg"):
        retriever.add_images([paths[1], cut], ids=["a", "b"])
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.png"):
        retriever.add_images([tmp_path / "notes.png"])
    retriever.add_texts(["a red dog near the house"])
    with pytest.raises(InputError, match="not found"):
        retriever.search(image=tmp_path / "absent.jpg")
    with pytest.raises(InputError, match="mask"):
        retriever.add_images([paths[0]], mask=np.ones((1, 4), np.float32))
    assert retriever.n_images == 0


def test_a_bundle_without_the_pixel_graph_says_how_to_get_one(tiny_bundle: Path, tmp_path: Path) -> None:
    r = Retriever.load(tiny_bundle)
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    with pytest.raises(InputError, match="--pixels"):
        r.add_images([img])
    r.add_texts(["a red dog near the house"])
    with pytest.raises(InputError, match="--pixels"):
        r.search(image=np.zeros((40, 40, 3), np.uint8))


def test_a_manifest_pixel_entry_without_its_hash_is_refused(e2e: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(e2e["bundle"], bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    del m["files"]["image_encoder_pixels.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    r = Retriever.load(bundle)
    with pytest.raises(BundleError, match="sha256"):
        r.encode_images([np.zeros((40, 40, 3), np.uint8)])


def test_pixel_search_runs_without_torch(
    e2e: dict[str, Path], test_images: tuple[list[Path], np.ndarray, list[str]]
) -> None:
    paths = [str(p) for p in test_images[0]]
    code = (
        "import sys; from mssan_infer import Retriever; "
        f"r = Retriever.load({str(e2e['bundle'])!r}); r.add_images({paths!r}); "
        f"r.add_texts({test_images[2][:5]!r}); "
        f"print(len(r.search(image={paths[0]!r}, k=2)), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "2 False"
