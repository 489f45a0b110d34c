"""training.images: Karpathy splits over an image folder, augmentation, and the grid-feature writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mssan_infer.errors import InputError
from mssan_infer.images.preprocess import Preprocessing, load_image
from training.__main__ import main as training_main
from training.backbone import BACKBONES, ResNetBackbone
from training.data import load_split
from training.images import (
    EvalTransform,
    ImageCaptionDataset,
    TrainTransform,
    image_folder,
    karpathy_splits,
    to_tensor,
    write_features,
)

SIZE = 64


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small images (alternating PNG/JPEG, a few shapes and sizes); returns their file names."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = (80, 64) if i % 3 else (64, 90)
        arr = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 255, 3)
        name = f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(root / name)
        names.append(name)
    return names


WORDS = (
    "red blue green yellow black white dog cat ball tree car man woman bird boat house beach street".split()
)


def karpathy_doc(names: list[str], splits: list[str], filepath: str = "") -> dict[str, Any]:
    """A Karpathy split file for ``names``: five distinct captions per image."""
    rng = np.random.default_rng(len(names))
    images = []
    for i, (name, split) in enumerate(zip(names, splits)):
        caps = [
            f"a {' '.join(rng.choice(WORDS, 3, replace=False))} picture {i} caption {j}" for j in range(5)
        ]
        im: dict[str, Any] = {
            "filename": name,
            "split": split,
            "imgid": i,
            "sentences": [{"raw": c} for c in caps],
        }
        if filepath:
            im["filepath"] = filepath
        images.append(im)
    return {"images": images, "dataset": "test"}


def tiny_weights(path: Path, seed: int = 0) -> Path:
    """A random-initialised ``resnet-tiny`` with non-trivial BatchNorm statistics, saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = ResNetBackbone(BACKBONES["resnet-tiny"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    splits = ["train"] * 5 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 3
    names = make_images(root / "imgs", len(splits))
    (root / "k.json").write_text(json.dumps(karpathy_doc(names, splits)))
    return {
        "images": root / "imgs",
        "karpathy": root / "k.json",
        "weights": tiny_weights(root / "bb.safetensors"),
    }


def test_restval_joins_train_val_becomes_dev(dataset: dict[str, Path]) -> None:
    s = karpathy_splits(dataset["images"], dataset["karpathy"])
    assert [len(s[k]) for k in ("train", "dev", "test")] == [7, 2, 3]
    assert [p.name for p in s["train"].paths] == [f"img{i:03d}.{'png' if i % 2 else 'jpg'}" for i in range(7)]
    assert len(s["train"].captions) == 35 and s["train"].captions[5].endswith("picture 1 caption 0")


def test_coco_style_filepath_and_extra_captions(tmp_path: Path) -> None:
    names = make_images(tmp_path / "imgs" / "val2014", 2)
    doc = karpathy_doc(names, ["val", "test"], filepath="val2014")
    doc["images"][0]["sentences"].append({"raw": "a sixth caption"})
    (tmp_path / "k.json").write_text(json.dumps(doc))
    s = karpathy_splits(tmp_path / "imgs", tmp_path / "k.json")
    assert s["dev"].paths[0] == tmp_path / "imgs" / "val2014" / names[0]
    assert len(s["dev"].captions) == 5 and "sixth" not in " ".join(s["dev"].captions)


def test_missing_images_and_short_caption_lists_are_clear_errors(tmp_path: Path) -> None:
    names = make_images(tmp_path / "imgs", 2)
    doc = karpathy_doc(names + ["gone.jpg"], ["train", "val", "test"])
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="1 image.*gone.jpg"):
        karpathy_splits(tmp_path / "imgs", tmp_path / "k.json")
    doc = karpathy_doc(names, ["train", "test"])
    doc["images"][1]["sentences"] = doc["images"][1]["sentences"][:3]
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="3 captions"):
        karpathy_splits(tmp_path / "imgs", tmp_path / "k.json")


def test_image_folder_lists_images_only(tmp_path: Path) -> None:
    make_images(tmp_path, 3)
    (tmp_path / "readme.txt").write_text("x")
    assert [p.name for p in image_folder(tmp_path)] == ["img000.jpg", "img001.png", "img002.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        image_folder(tmp_path / "empty")


def test_features_are_the_backbone_grid_of_the_eval_transform_in_precomp_layout(
    dataset: dict[str, Path], tmp_path: Path
) -> None:
    info = write_features(
        dataset["images"],
        dataset["karpathy"],
        tmp_path,
        backbone="resnet-tiny",
        weights=dataset["weights"],
        image_size=SIZE,
        batch_size=3,
        progress=False,
    )
    assert (
        info["grid"] == [2, 2]
        and info["feature_dim"] == 256
        and info["images"] == {"train": 7, "dev": 2, "test": 3}
    )
    assert json.loads((tmp_path / "features.json").read_text())["backbone_sha256"] == info["backbone_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{s}_{k}" for s in ("train", "dev", "test") for k in ("ims.npy", "caps.txt")] + ["features.json"]
    )
    split = load_split(tmp_path, "train")
    assert (
        split.images.shape == (7, 4, 256) and split.images.dtype == np.float32 and split.region_mask is None
    )
    # every row (batches of 3 over 7 images, the last one partial) equals the backbone on that image
    from training.backbone import build_backbone

    net = build_backbone("resnet-tiny", dataset["weights"])
    s = karpathy_splits(dataset["images"], dataset["karpathy"])
    pixels = torch.stack([EvalTransform(Preprocessing(SIZE, SIZE))(load_image(p)) for p in s["train"].paths])
    with torch.inference_mode():
        ref = net(pixels).numpy()
    assert np.abs(np.asarray(split.images) - ref).max() < 1e-5
    assert split.captions == s["train"].captions


def test_float16_storage_halves_the_file(dataset: dict[str, Path], tmp_path: Path) -> None:
    write_features(
        dataset["images"],
        dataset["karpathy"],
        tmp_path,
        backbone="resnet-tiny",
        weights=dataset["weights"],
        image_size=SIZE,
        batch_size=8,
        dtype="float16",
        progress=False,
    )
    split = load_split(tmp_path, "test")
    assert split.images.dtype == np.float16
    regions, mask = split.image_batch(0, 3)
    assert regions.dtype == np.float32 and mask.shape == (3, 4)


def test_an_undecodable_image_fails_naming_it_and_leaves_no_partial_file(
    dataset: dict[str, Path], tmp_path: Path
) -> None:
    imgs = tmp_path / "imgs"
    names = make_images(imgs, 3)
    (imgs / names[1]).write_bytes((imgs / names[1]).read_bytes()[:40])
    (tmp_path / "k.json").write_text(json.dumps(karpathy_doc(names, ["train", "train", "test"])))
    with pytest.raises(InputError, match=names[1].replace(".", r"\.")):
        write_features(
            imgs,
            tmp_path / "k.json",
            tmp_path / "out",
            backbone="resnet-tiny",
            weights=dataset["weights"],
            image_size=SIZE,
            progress=False,
        )
    assert not list((tmp_path / "out").glob("*train*"))


def test_train_transform_is_seeded_crops_inside_the_image_and_flips() -> None:
    cfg = Preprocessing(image_size=32, resize=32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    t = TrainTransform(cfg, generator=torch.Generator().manual_seed(0))
    for _ in range(50):
        left, top, w, h = t.crop_box(70, 50)
        assert 0 <= left and 0 <= top and left + w <= 70 and top + h <= 50
        assert 0.5 * 3500 * 0.9 <= w * h <= 3500
    a = TrainTransform(cfg, flip=0.0, generator=torch.Generator().manual_seed(5))(img)
    b = TrainTransform(cfg, flip=1.0, generator=torch.Generator().manual_seed(5))(img)
    c = TrainTransform(cfg, flip=0.0, generator=torch.Generator().manual_seed(5))(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, c) and torch.equal(b, a.flip(-1))
    whole = TrainTransform(cfg, scale=(1.0, 1.0), ratio=(0.1, 10.0), flip=0.0)
    assert whole.crop_box(70, 50) == (0, 0, 70, 50)
    assert torch.equal(whole(img), to_tensor(img.resize((32, 32), Image.Resampling.BILINEAR), cfg))


def test_image_caption_dataset_yields_one_item_per_caption(dataset: dict[str, Path]) -> None:
    s = karpathy_splits(dataset["images"], dataset["karpathy"])
    ds = ImageCaptionDataset(s["dev"], EvalTransform(Preprocessing(SIZE, SIZE)))
    assert len(ds) == 10
    pixels, caption, i, k = ds[7]
    assert pixels.shape == (3, SIZE, SIZE) and (i, k) == (1, 7) and caption == s["dev"].captions[7]


def test_features_command_writes_the_precomp_layout(
    dataset: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = training_main(
        [
            "features",
            "--images",
            str(dataset["images"]),
            "--karpathy",
            str(dataset["karpathy"]),
            "--out",
            str(tmp_path),
            "--backbone",
            "resnet-tiny",
            "--backbone-weights",
            str(dataset["weights"]),
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0 and "resnet-tiny" in capsys.readouterr().out
    assert load_split(tmp_path, "dev").images.shape == (2, 4, 256)
    rc = training_main(
        [
            "features",
            "--images",
            str(dataset["images"]),
            "--karpathy",
            str(tmp_path / "none.json"),
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 1
