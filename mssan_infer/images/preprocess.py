"""Image preprocessing for the pixel graph, in pillow + numpy (no torch).

The same steps as training's eval transform (``training.images.EvalTransform``),
with the constants read from the bundle manifest's ``"preprocessing"`` entry:
decode -> EXIF orientation -> RGB -> resize the shorter side to ``resize``
(pillow, bilinear) -> centre crop ``image_size`` -> ``/255`` -> ``(x - mean) / std``
-> CHW float32.

Mode conversion: grayscale (``1``, ``L``), palette, CMYK, YCbCr... become RGB;
transparency (``RGBA``, ``LA``, palette with a transparent colour) is composited over
white; 16-bit grayscale (``I;16*``, ``I``) is scaled ``0..65535 -> 0..255`` rather
than clipped; float (``F``) is clipped to ``0..255``.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np

from mssan_infer.deps import optional_import
from mssan_infer.errors import BundleError, InputError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "RESAMPLE",
    "Preprocessing",
    "ImageSource",
    "is_image_source",
    "load_image",
    "to_rgb",
    "resize_crop",
    "normalize",
    "preprocess",
    "preprocess_batch",
    "describe",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# a path, a PIL image, a uint8/uint16 array, or the encoded bytes of an image file (JPEG, PNG, WebP...)
ImageSource = Union[str, "os.PathLike[str]", "PILImage.Image", np.ndarray, bytes]


@dataclass(frozen=True)
class Preprocessing:
    """The constants of the pixel path, as stored in the manifest (``preprocessing.image``).

    Attributes:
        image_size: side of the square crop fed to the graph.
        resize: the shorter side is resized to this before the centre crop (>= ``image_size``).
        mean, std: per-channel normalisation of ``x/255`` (ImageNet's).
        resample: pillow filter of the resize (``"bilinear"``).
        channel_order, layout, dtype: what the graph takes (``"RGB"``, ``"NCHW"``, ``"float32"``).
    """

    image_size: int = 448
    resize: int = 448
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bilinear"
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise InputError(
                f"image_size must be an int >= 32 (the backbone's stride), got {self.image_size!r}"
            )
        if not isinstance(self.resize, int) or self.resize < self.image_size:
            raise InputError(f"resize ({self.resize!r}) must be an int >= image_size ({self.image_size})")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise InputError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")
        if self.resample not in RESAMPLE:
            raise InputError(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        """From a manifest entry; settings this runtime cannot reproduce raise ``BundleError``."""
        for key, want in (("channel_order", "RGB"), ("layout", "NCHW"), ("dtype", "float32")):
            if d.get(key, want) != want:
                raise BundleError(
                    f"pixel preprocessing with {key}={d.get(key)!r} is not supported (only {want!r})"
                )
        try:
            return cls(
                image_size=int(d["image_size"]),
                resize=int(d.get("resize", d["image_size"])),
                mean=tuple(float(x) for x in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
                std=tuple(float(x) for x in d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
                resample=str(d.get("resample", "bilinear")),
                scale=float(d.get("scale", 1.0 / 255.0)),
            )
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise BundleError(
                f"manifest preprocessing entry {dict(d)} is invalid ({e}); re-export the bundle"
            ) from e


RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def _pil() -> Any:
    return optional_import("PIL.Image", "pillow", "decoding image files")


def is_image_source(x: object) -> bool:
    """A path (str/PathLike), encoded file bytes, a PIL image, or a uint8/uint16 array ``[H,W]``,
    ``[H,W,1|3|4]``."""
    if isinstance(x, (str, os.PathLike, bytes, bytearray)):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype in (np.uint8, np.uint16) and (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3, 4)))
    return isinstance(x, _pil().Image)


def describe(src: object, i: int | None = None) -> str:
    """A name for messages: the path, or ``image i (PIL RGB 640x480)``."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    where = "image" if i is None else f"image {i}"
    if isinstance(src, (bytes, bytearray)):
        return f"{where} ({len(src)} bytes)"
    if isinstance(src, np.ndarray):
        return f"{where} (array {src.shape} {src.dtype})"
    return f"{where} ({type(src).__name__})"


def _sixteen_bit_to_l(arr: np.ndarray) -> "PILImage.Image":
    a = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return _pil().fromarray(np.rint(a).astype(np.uint8), mode="L")


def to_rgb(img: "PILImage.Image") -> "PILImage.Image":
    """Any pillow mode -> ``RGB`` (see the module docstring for the rules)."""
    Image = _pil()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(np.asarray(img)).convert("RGB")
    if mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _decode(file: "Path | io.BytesIO", label: str) -> "PILImage.Image":
    """Decode an image file (a path or its bytes) into an upright RGB pillow image."""
    Image = _pil()
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()  # decode now: truncation shows up here
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright if upright is not None else im)
    except UnidentifiedImageError as e:
        raise InputError(
            f"{label}: not an image file pillow can read (it reads JPEG, PNG, WebP, GIF, BMP, TIFF...)"
        ) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{label}: cannot decode image, the file is truncated or damaged ({e})") from e


def load_image(src: ImageSource, name: str | None = None) -> "PILImage.Image":
    """Decode ``src`` (path, encoded file bytes, PIL image, uint8/uint16 array) into an upright RGB pillow
    image.

    Arrays are HWC (or HW); uint8 RGB(A) or grayscale, uint16 grayscale. Bytes are the content of an image
    file (any format pillow reads: JPEG, PNG, WebP...).

    Raises:
        InputError: missing file, not an image, truncated/damaged data (naming the file), or an
            array of another dtype/shape.
    """
    Image = _pil()
    from PIL import ImageOps

    label = name or describe(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise InputError(f"{path}: image file not found")
        return _decode(path, str(path))
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise InputError(f"{label}: no bytes; expected the content of an image file (JPEG, PNG, WebP...)")
        return _decode(io.BytesIO(bytes(src)), label)
    if isinstance(src, np.ndarray):
        if not is_image_source(src):
            raise InputError(
                f"{label}: an image array must be uint8 [H,W], [H,W,1|3|4] (RGB/RGBA) or uint16 [H,W]; "
                f"got {src.dtype} {src.shape}. Float arrays are taken as region features, not pixels"
            )
        a = src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src
        if a.dtype == np.uint16:
            if a.ndim != 2:
                raise InputError(f"{label}: uint16 arrays must be grayscale [H,W], got {src.shape}")
            return _sixteen_bit_to_l(a).convert("RGB")
        if min(a.shape[:2]) < 1:
            raise InputError(f"{label}: empty image {src.shape}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(a)))
    if isinstance(src, Image.Image):
        try:
            src.load()
            upright = ImageOps.exif_transpose(src)
            return to_rgb(upright if upright is not None else src)
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{label}: cannot decode image ({e})") from e
    raise InputError(f"{label}: expected an image path, image file bytes, a PIL image or a uint8 HWC array")


def resize_crop(img: "PILImage.Image", cfg: Preprocessing) -> "PILImage.Image":
    """Resize the shorter side to ``cfg.resize`` (torchvision's rounding), then centre-crop ``image_size``."""
    w, h = img.size
    if min(w, h) < 1:
        raise InputError(f"image of size {w}x{h} is empty")
    s = cfg.resize
    if w <= h:
        ow, oh = s, int(s * h / w)
    else:
        ow, oh = int(s * w / h), s
    if (ow, oh) != (w, h):
        img = img.resize((ow, oh), RESAMPLE[cfg.resample])
    c = cfg.image_size
    top = int(round((oh - c) / 2.0))
    left = int(round((ow - c) / 2.0))
    return img.crop((left, top, left + c, top + c))


def normalize(rgb: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    """``uint8 [H,W,3]`` -> ``float32 [3,H,W]`` = ``(x * scale - mean) / std``."""
    x = rgb.astype(np.float32) * np.float32(cfg.scale)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(src: ImageSource, cfg: Preprocessing, name: str | None = None) -> np.ndarray:
    """One image -> ``float32 [3, image_size, image_size]``."""
    img = resize_crop(load_image(src, name), cfg)
    return normalize(np.asarray(img, dtype=np.uint8), cfg)


def preprocess_batch(srcs: Sequence[ImageSource], cfg: Preprocessing) -> np.ndarray:
    """Images -> ``float32 [N, 3, image_size, image_size]``.

    Raises:
        InputError: any image that cannot be read (named in the message).
    """
    out = np.empty((len(srcs), 3, cfg.image_size, cfg.image_size), np.float32)
    for i, s in enumerate(srcs):
        out[i] = preprocess(s, cfg, describe(s, i))
    return out
