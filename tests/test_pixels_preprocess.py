"""mssan_infer.images.preprocess: pillow+numpy preprocessing equal to training's torch eval transform;
decoding rules."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mssan_infer.errors import BundleError, InputError
from mssan_infer.images.preprocess import (
    Preprocessing,
    is_image_source,
    load_image,
    preprocess,
    preprocess_batch,
)
from training.images import EvalTransform

ROOT = Path(__file__).resolve().parents[1]


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: resizing it exercises the filter, not just flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize(
    "w, h, size, resize", [(80, 64, 64, 64), (50, 90, 64, 72), (64, 64, 64, 64), (300, 120, 96, 110)]
)
def test_numpy_preprocessing_equals_the_torch_eval_transform(
    tmp_path: Path, w: int, h: int, size: int, resize: int
) -> None:
    cfg = Preprocessing(image_size=size, resize=resize)
    path = tmp_path / "a.png"
    _photo(w, h).save(path)
    ours = preprocess(path, cfg)  # numpy
    ref = EvalTransform(cfg)(load_image(path)).numpy()  # torch
    assert ours.shape == ref.shape == (3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


def test_normalisation_uses_imagenet_mean_and_std_in_rgb_chw() -> None:
    cfg = Preprocessing(image_size=32, resize=32)
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[..., 0] = 255  # pure red
    x = preprocess(arr, cfg)
    assert np.allclose(x[:, 0, 0], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225], atol=1e-6)


def test_resize_keeps_aspect_and_centre_crops() -> None:
    cfg = Preprocessing(image_size=32, resize=32)
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255  # white middle third
    x = preprocess(arr, cfg)
    assert np.allclose(x, preprocess(np.full((32, 32, 3), 255, np.uint8), cfg))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _photo(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (24, 40)
    plain = Image.open(tmp_path / "r.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(out), np.asarray(plain))


def test_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    g = np.full((8, 8), 100, np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    assert np.all(np.asarray(load_image(tmp_path / "l.png")) == 100)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (10, 20, 30, 255)  # top half opaque, bottom transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert np.all(out[:4] == (10, 20, 30)) and np.all(out[4:] == 255)  # composited over white

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 1]) == (0, 0, 255)
    pal.save(tmp_path / "pt.png", transparency=0)
    assert tuple(np.asarray(load_image(tmp_path / "pt.png"))[0, 0]) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, gg, b = np.asarray(load_image(tmp_path / "c.jpg")).reshape(-1, 3).mean(0)
    assert r > 200 and gg < 60 and b < 60  # CMYK red stays red

    sixteen = np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))[..., 0]
    assert out.tolist() == [[0, 255], [100, 200]]  # scaled, not clipped to 255

    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert np.asarray(load_image(tmp_path / "b.png"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    for p in tmp_path.iterdir():
        assert load_image(p).mode == "RGB"


def test_arrays_and_pil_images_equal_the_same_image_from_a_file(tmp_path: Path) -> None:
    cfg = Preprocessing(image_size=32, resize=40)
    img = _photo(50, 45)
    img.save(tmp_path / "x.png")
    from_file = preprocess(tmp_path / "x.png", cfg)
    assert np.array_equal(preprocess(np.asarray(img), cfg), from_file)
    assert np.array_equal(preprocess(img, cfg), from_file)
    assert np.array_equal(preprocess(str(tmp_path / "x.png"), cfg), from_file)
    gray = np.asarray(img.convert("L"))
    assert np.array_equal(preprocess(gray, cfg), preprocess(gray[..., None], cfg))
    batch = preprocess_batch([tmp_path / "x.png", img], cfg)
    assert batch.shape == (2, 3, 32, 32) and np.array_equal(batch[0], batch[1])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_bytes_of_an_image_file_equal_the_file(tmp_path: Path, fmt: str) -> None:
    cfg = Preprocessing(image_size=32, resize=40)
    path = tmp_path / f"x.{fmt.lower()}"
    _photo(50, 45).save(path, fmt)
    data = path.read_bytes()
    assert is_image_source(data) and is_image_source(bytearray(data))
    assert np.array_equal(preprocess(data, cfg), preprocess(path, cfg))
    assert np.array_equal(preprocess(bytearray(data), cfg), preprocess(path, cfg))


def test_bytes_that_are_not_a_whole_image_are_input_errors_saying_so() -> None:
    buf = io.BytesIO()
    _photo(64, 64).save(buf, "JPEG")
    with pytest.raises(InputError, match=r"image \(\d+ bytes\): cannot decode image, the file is truncated"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="not an image file pillow can read"):
        load_image(b"this is not an image")
    with pytest.raises(InputError, match="no bytes"):
        load_image(b"")


def test_region_features_are_not_mistaken_for_images() -> None:
    assert not is_image_source(np.zeros((36, 2048), np.float32))
    assert not is_image_source(np.zeros((2, 36, 2048), np.float32))
    assert is_image_source(np.zeros((8, 8, 3), np.uint8)) and is_image_source("a.jpg")
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))


def test_truncated_damaged_and_missing_files_are_input_errors_naming_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _photo(64, 64).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    _photo(64, 64).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.jpg").write_text("this is not an image")
    for name in ("cut.jpg", "cut.png", "notes.jpg", "absent.png"):
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            load_image(tmp_path / name)


def test_preprocessing_round_trips_through_the_manifest_and_refuses_what_it_cannot_do() -> None:
    cfg = Preprocessing(image_size=64, resize=72)
    assert Preprocessing.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BundleError, match="channel_order"):
        Preprocessing.from_dict({**cfg.to_dict(), "channel_order": "BGR"})
    with pytest.raises(InputError, match="resize"):
        Preprocessing(image_size=64, resize=32)


def test_preprocess_runs_without_torch() -> None:
    code = (
        "import sys, numpy as np; from mssan_infer.images.preprocess import Preprocessing, preprocess; "
        "x = preprocess(np.zeros((40, 50, 3), np.uint8), Preprocessing(image_size=32, resize=32)); "
        "print(x.shape, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(3, 32, 32) False"


def test_eval_transform_output_is_a_float_tensor() -> None:
    x = EvalTransform(Preprocessing(image_size=32, resize=32))(_photo(40, 40))
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 32, 32)
