"""Images with captions: Karpathy splits over an image folder, transforms, and the grid-feature writer.

``write_features`` turns an image folder plus a Karpathy JSON into the precomp
layout (``{split}_ims.npy [N, H'*W', C]``, ``{split}_caps.txt``) with a ResNet
backbone (``training.backbone``), so region-path training runs on Flickr8K/30K
or COCO images. Splits: ``train`` = Karpathy train + restval, ``dev`` = val,
``test`` = test. The eval transform is ``mssan_infer.images.preprocess`` (pillow decode,
resize, centre crop) followed by the normalisation in torch, so the runtime's
numpy preprocessing reproduces the features' inputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mssan_infer.errors import InputError
from mssan_infer.files import sha256_file
from mssan_infer.images.preprocess import IMAGE_SUFFIXES, RESAMPLE, Preprocessing, load_image, resize_crop

from .backbone import build_backbone, grid_side
from .data import CAPS_PER_IMAGE, read_karpathy

__all__ = [
    "PRECOMP_SPLITS",
    "ImageCaptionSplit",
    "karpathy_splits",
    "image_folder",
    "to_tensor",
    "EvalTransform",
    "TrainTransform",
    "ImageDataset",
    "ImageCaptionDataset",
    "write_features",
    "FEATURES_INFO",
]

log = logging.getLogger(__name__)

# precomp split <- Karpathy splits
PRECOMP_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train", "restval"),
    "dev": ("val",),
    "test": ("test",),
}
FEATURES_INFO = "features.json"


@dataclass
class ImageCaptionSplit:
    """Image files and their captions (``CAPS_PER_IMAGE`` each, in image order)."""

    name: str
    paths: list[Path]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _resolve(images_dir: Path, filepath: str, filename: str) -> Path:
    """``DIR/filepath/filename`` (COCO) when it exists, else ``DIR/filename`` (Flickr)."""
    if filepath:
        p = images_dir / filepath / filename
        if p.is_file():
            return p
    return images_dir / filename


def karpathy_splits(
    images_dir: str | os.PathLike[str], karpathy_json: str | os.PathLike[str], check_files: bool = True
) -> dict[str, ImageCaptionSplit]:
    """The precomp splits (train/dev/test) of a Karpathy JSON, with image paths under ``images_dir``.

    Each image keeps its first ``CAPS_PER_IMAGE`` captions (COCO has a few with 6-7).

    Raises:
        InputError: unreadable JSON, an image with fewer than 5 captions, or (``check_files``)
            image files missing from ``images_dir`` (the first few are named).
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    by_split = read_karpathy(karpathy_json)
    out: dict[str, ImageCaptionSplit] = {}
    missing: list[str] = []
    for name, sources in PRECOMP_SPLITS.items():
        paths, caps = [], []
        for src in sources:
            for im in by_split.get(src, []):
                if len(im.captions) < CAPS_PER_IMAGE:
                    raise InputError(
                        f"{karpathy_json}: image {im.filename} has {len(im.captions)} captions; the precomp "
                        f"layout needs {CAPS_PER_IMAGE} per image"
                    )
                p = _resolve(root, im.filepath, im.filename)
                if check_files and not p.is_file():
                    missing.append(str(p))
                paths.append(p)
                caps += [" ".join(c.split()) for c in im.captions[:CAPS_PER_IMAGE]]
        out[name] = ImageCaptionSplit(name, paths, caps)
    if missing:
        raise InputError(
            f"{len(missing)} image(s) of {karpathy_json} are not in {root}, e.g. {missing[:3]}; "
            "point --images at the folder that holds the dataset's image files"
        )
    return out


def image_folder(images_dir: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``images_dir`` (by suffix), sorted by name.

    Raises:
        InputError: the folder does not exist or holds no images.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def to_tensor(img: Any, cfg: Preprocessing) -> Tensor:
    """RGB pillow image -> normalised ``float32 [3,H,W]`` (``(x * scale - mean) / std``)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()  # [3,H,W]
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return (x * cfg.scale - mean) / std


class EvalTransform:
    """Deterministic: resize the shorter side, centre crop, normalise (the runtime's preprocessing)."""

    def __init__(self, cfg: Preprocessing) -> None:
        self.cfg = cfg

    def __call__(self, img: Any) -> Tensor:
        return to_tensor(resize_crop(img, self.cfg), self.cfg)


class TrainTransform:
    """Random resized crop (torchvision's sampling) + horizontal flip, then normalise.

    ``scale`` is the crop's area fraction: (0.5, 1) by default rather than ImageNet's
    (0.08, 1), because a caption describes the whole picture.
    """

    def __init__(
        self,
        cfg: Preprocessing,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise InputError(f"bad crop scale {scale} or ratio {ratio}")
        self.cfg, self.scale, self.ratio, self.flip, self.generator = cfg, scale, ratio, flip, generator

    def _uniform(self, lo: float, hi: float) -> float:
        return float(torch.empty(1).uniform_(lo, hi, generator=self.generator))

    def crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """``(left, top, width, height)`` of the crop, sampled as torchvision's RandomResizedCrop."""
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(*log_ratio))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=self.generator))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=self.generator))
                return left, top, cw, ch
        in_ratio = w / h  # fallback: centre crop within the ratio range
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            cw, ch = int(round(h * self.ratio[1])), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, img: Any) -> Tensor:
        left, top, cw, ch = self.crop_box(*img.size)
        s = self.cfg.image_size
        img = img.resize((s, s), RESAMPLE[self.cfg.resample], box=(left, top, left + cw, top + ch))
        x = to_tensor(img, self.cfg)  # [3,S,S]
        if float(torch.rand(1, generator=self.generator)) < self.flip:
            x = x.flip(-1)
        return x


class ImageDataset(Dataset):
    """``(pixels [3,S,S] float32, index)`` per image file; decoding errors name the file."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], transform: Any) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.paths[i])), i


class ImageCaptionDataset(Dataset):
    """One item per caption, for training on pixels: ``(pixels [3,S,S], caption, image_index,
    caption_index)``."""

    def __init__(self, split: ImageCaptionSplit, transform: Any) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, k: int) -> tuple[Tensor, str, int, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"caption index {k} out of range [0, {len(self)})")
        i = k // CAPS_PER_IMAGE
        return self.transform(load_image(self.split.paths[i])), self.split.captions[k], i, k


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@torch.inference_mode()
def write_features(
    images_dir: str | os.PathLike[str],
    karpathy_json: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    backbone: str = "resnet152",
    weights: str | os.PathLike[str] | None = None,
    image_size: int = 448,
    resize: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 0,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Write grid features of every Karpathy image in the precomp layout.

    For each split with images: ``{split}_ims.npy [N, G, C]`` (``G = grid_side(image_size)**2``,
    ``C`` the backbone's channels; written incrementally through a memmap, then renamed into
    place) and ``{split}_caps.txt`` (5 lines per image); then ``features.json`` (backbone,
    weights sha256, preprocessing, grid) which export's ``--pixels`` must match.

    Returns:
        The ``features.json`` content, with ``images_per_s``.
    Raises:
        InputError: bad inputs (missing/undecodable images are named).
    """
    if dtype not in ("float32", "float16"):
        raise InputError(f"dtype must be float32 or float16, got {dtype!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    cfg = Preprocessing(image_size=image_size, resize=resize or image_size)
    splits = karpathy_splits(images_dir, karpathy_json)
    net = build_backbone(backbone, weights).to(device)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    side = grid_side(image_size)
    grid, dim = side * side, net.out_dim
    transform = EvalTransform(cfg)
    started, total = time.perf_counter(), 0
    counts: dict[str, int] = {}
    for name, split in splits.items():
        if not len(split):
            log.warning("split %s has no images in %s; not written", name, karpathy_json)
            continue
        target = outp / f"{name}_ims.npy"
        tmp = outp / f".{name}_ims.tmp.npy"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(len(split), grid, dim))
        ok = False
        try:
            loader = DataLoader(
                ImageDataset(split.paths, transform), batch_size=batch_size, num_workers=workers
            )
            bar = tqdm(total=len(split), desc=f"features {name}", unit="img", disable=not progress)
            for pixels, idx in loader:
                feats = net(pixels.to(device)).float().cpu().numpy()  # [b, G, C]
                arr[int(idx[0]) : int(idx[-1]) + 1] = feats
                bar.update(len(idx))
            bar.close()
            arr.flush()
            ok = True
        finally:
            del arr
            if not ok:
                tmp.unlink(missing_ok=True)
        os.replace(tmp, target)
        (outp / f"{name}_masks.npy").unlink(missing_ok=True)  # every grid cell is a real region
        _atomic_text(outp / f"{name}_caps.txt", "".join(c + "\n" for c in split.captions))
        counts[name] = len(split)
        total += len(split)
    wall = time.perf_counter() - started
    info = {
        "backbone": backbone,
        "backbone_weights": str(weights) if weights is not None else None,
        "backbone_sha256": sha256_file(weights) if weights is not None else None,
        "grid": [side, side],
        "feature_dim": dim,
        "dtype": dtype,
        "preprocessing": cfg.to_dict(),
        "karpathy": str(karpathy_json),
        "images": counts,
        "images_per_s": total / wall if wall > 0 else None,
    }
    _atomic_text(outp / FEATURES_INFO, json.dumps(info, indent=2))
    log.info("wrote %s features of %d images (%s) to %s in %.1f s", backbone, total, counts, outp, wall)
    return info
