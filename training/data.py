"""Training data: precomp splits (SCAN layout), Karpathy JSON, batching with masks (DESIGN §4).

A precomp split is ``{split}_ims.npy`` ``[N,R,Dv]`` float region features,
``{split}_caps.txt`` (UTF-8, one caption per line, 5 per image in order:
caption ``k`` belongs to image ``k // 5``) and, optionally,
``{split}_masks.npy`` ``[N,R]`` (1 for real regions). Region features are
memory-mapped, never loaded whole; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mssan_infer.errors import InputError
from mssan_infer.text.subword import SubwordTokenizer
from mssan_infer.text.words import Tokenizer, build_vocab

__all__ = [
    "CAPS_PER_IMAGE",
    "PrecompSplit",
    "load_split",
    "PairDataset",
    "collate",
    "iterate_images",
    "iterate_captions",
    "read_captions",
    "KarpathyImage",
    "read_karpathy",
    "vocab_from_split",
]

log = logging.getLogger(__name__)

CAPS_PER_IMAGE = 5
KARPATHY_SPLITS = ("train", "val", "test", "restval")


@dataclass
class PrecompSplit:
    """One split in the precomp layout.

    Attributes:
        images: ``[N,R,Dv]`` floating region features (a read-only memmap when loaded from disk).
        region_mask: ``[N,R]`` float32, 1 for real regions; ``None`` when every region is real.
        captions: ``5*N`` captions; caption ``k`` describes image ``k // 5``.
        name: the split's name (``"train"``, ``"dev"``...), for messages.

    Raises:
        InputError: wrong ndim or dtype, caption count not ``5*N``, mask of the wrong shape.
    """

    images: np.ndarray
    region_mask: np.ndarray | None
    captions: list[str]
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        what = f"split {self.name!r}" if self.name else "split"
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 3:
            shape = getattr(self.images, "shape", None)
            raise InputError(
                f"{what}: region features must be a [N, R, Dv] array (images x regions x feature size), "
                f"got shape {shape}. Write them as one float32 .npy per split."
            )
        if not np.issubdtype(self.images.dtype, np.floating):
            raise InputError(
                f"{what}: region features must be floating point (float32), got {self.images.dtype}"
            )
        n, r, _ = self.images.shape
        if n == 0:
            raise InputError(f"{what}: has no images")
        if len(self.captions) != CAPS_PER_IMAGE * n:
            raise InputError(
                f"{what}: {len(self.captions)} captions for {n} images; expected exactly "
                f"{CAPS_PER_IMAGE} per image ({CAPS_PER_IMAGE * n}), in image order. "
                "Check that the captions file and the features file belong together."
            )
        if self.region_mask is not None:
            if tuple(self.region_mask.shape) != (n, r):
                raise InputError(
                    f"{what}: region mask has shape {tuple(self.region_mask.shape)}, "
                    f"expected [N, R] = [{n}, {r}]"
                )

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def caps_per_image(self) -> int:
        return CAPS_PER_IMAGE

    @property
    def regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feat_dim(self) -> int:
        return int(self.images.shape[2])

    def _check_finite(self, regions: np.ndarray, start: int) -> None:
        """Refuse NaN/inf features when they are read (a whole-file scan would read every split twice)."""
        if not np.isfinite(regions).all():
            bad = start + int(np.flatnonzero(~np.isfinite(regions.reshape(len(regions), -1)).all(1))[0])
            raise InputError(
                f"split {self.name!r}: region features of image {bad} contain NaN or inf; "
                "recompute or clean the features file"
            )

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Regions ``[R,Dv]`` float32 (a copy) and mask ``[R]`` float32 of image ``i``.

        Raises:
            InputError: the image's features contain NaN or inf.
        """
        regions = np.array(self.images[i], dtype=np.float32)
        self._check_finite(regions[None], int(i))
        if self.region_mask is None:
            mask = np.ones(self.regions, dtype=np.float32)
        else:
            mask = np.array(self.region_mask[i], dtype=np.float32)
        return regions, mask

    def image_batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Regions ``[b,R,Dv]`` float32 and masks ``[b,R]`` of images ``start:stop`` (a copy).

        Raises:
            InputError: an image's features contain NaN or inf.
        """
        regions = np.array(self.images[start:stop], dtype=np.float32)
        self._check_finite(regions, start)
        if self.region_mask is None:
            mask = np.ones(regions.shape[:2], dtype=np.float32)
        else:
            mask = np.array(self.region_mask[start:stop], dtype=np.float32)
        return regions, mask


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle (refused); a truncated file cannot be mapped
        raise InputError(
            f"{path}: cannot read {what} ({e}); expected a complete plain float32 .npy (no pickled objects)"
        ) from e
    except OSError as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from e


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions of a ``*_caps.txt`` file: UTF-8, one per line (a final newline is optional)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: captions must be UTF-8 text ({e}); re-encode the file as UTF-8") from e
    except OSError as e:
        raise InputError(
            f"{p}: cannot read the captions file ({e}); expected UTF-8 text, one caption per line"
        ) from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_split(data_dir: str | os.PathLike[str], split: str) -> PrecompSplit:
    """Open split ``split`` of a precomp folder: ``{split}_ims.npy``, ``{split}_caps.txt``
    and the optional ``{split}_masks.npy``.

    Raises:
        InputError: a file is missing or unreadable, features are not ``[N,R,Dv]``,
            the caption count is not ``5*N``, or the mask shape is wrong.
    """
    d = Path(data_dir)
    ims_path, caps_path, mask_path = d / f"{split}_ims.npy", d / f"{split}_caps.txt", d / f"{split}_masks.npy"
    missing = [p.name for p in (ims_path, caps_path) if not p.is_file()]
    if missing:
        have = sorted(p.name for p in d.glob("*_ims.npy")) if d.is_dir() else []
        hint = f"the folder has {have}" if have else "the folder has no *_ims.npy"
        raise InputError(
            f"{d}: split {split!r} is incomplete, missing {missing} ({hint}). A precomp folder holds "
            f"{{split}}_ims.npy [N,R,Dv] and {{split}}_caps.txt (5 lines per image); "
            "write a synthetic one with `python -m training synth --out DIR`."
        )
    images = _load_npy(ims_path, "region features")
    mask: np.ndarray | None = None
    if mask_path.is_file():
        mask = _load_npy(mask_path, "region masks")
        if mask.ndim != 2:
            raise InputError(f"{mask_path}: region mask must be [N, R], got shape {mask.shape}")
    captions = read_captions(caps_path)
    try:
        return PrecompSplit(images, mask, captions, name=split)
    except InputError as e:
        raise InputError(f"{d}: {e}") from None


class PairDataset(torch.utils.data.Dataset):
    """One item per caption: ``(regions [R,Dv] float32, region_mask [R] float32,
    token_ids list[int], image_index k // 5, caption_index k)``.

    Captions are tokenised once, up front (stored flat, so COCO-sized splits stay small), by
    the word ``Tokenizer`` or the ``SubwordTokenizer`` of a transformer tower.
    """

    def __init__(self, split: PrecompSplit, tokenizer: Tokenizer | SubwordTokenizer) -> None:
        self.split = split
        self.tokenizer = tokenizer
        ids = (
            tokenizer.encode_many(split.captions)
            if isinstance(tokenizer, SubwordTokenizer)
            else [tokenizer.encode(c) for c in split.captions]
        )
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        empty = int((lengths == 0).sum())
        if empty:
            log.warning("split %r: %d captions have no words", split.name, empty)

    def __len__(self) -> int:
        return len(self.split.captions)

    def tokens(self, k: int) -> list[int]:
        return self._flat[self._offsets[k] : self._offsets[k + 1]].tolist()

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, list[int], int, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"caption index {k} out of range [0, {len(self)})")
        img = k // CAPS_PER_IMAGE
        regions, mask = self.split.image(img)
        return regions, mask, self.tokens(k), img, k


def _pad(ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    length = max([1] + [len(x) for x in ids])
    tokens = torch.zeros(len(ids), length, dtype=torch.int64)
    mask = torch.zeros(len(ids), length, dtype=torch.float32)
    for i, x in enumerate(ids):
        if len(x):
            tokens[i, : len(x)] = torch.as_tensor(x, dtype=torch.int64)
            mask[i, : len(x)] = 1.0
    return tokens, mask


def collate(items: Sequence[tuple[Any, Any, Sequence[int], int, int]]) -> dict[str, Tensor]:
    """Batch ``PairDataset`` items.

    Returns:
        ``regions [B,R,Dv]`` float32, ``region_mask [B,R]`` float32, ``tokens [B,L]`` int64
        (0 = ``<pad>``), ``token_mask [B,L]`` float32, ``img_ids [B]`` int64, ``cap_ids [B]`` int64;
        ``L`` is the longest caption of the batch, at least 1.
    """
    if not items:
        raise InputError("cannot collate an empty batch")
    regions = torch.from_numpy(np.stack([np.asarray(it[0], dtype=np.float32) for it in items]))
    region_mask = torch.from_numpy(np.stack([np.asarray(it[1], dtype=np.float32) for it in items]))
    tokens, token_mask = _pad([it[2] for it in items])
    return {
        "regions": regions,  # [B,R,Dv]
        "region_mask": region_mask,  # [B,R]
        "tokens": tokens,  # [B,L]
        "token_mask": token_mask,  # [B,L]
        "img_ids": torch.as_tensor([int(it[3]) for it in items], dtype=torch.int64),
        "cap_ids": torch.as_tensor([int(it[4]) for it in items], dtype=torch.int64),
    }


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


def iterate_images(split: PrecompSplit, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Every image in order, in batches: ``(regions [b,R,Dv] float32, region_mask [b,R] float32)``."""
    _check_batch_size(batch_size)
    for start in range(0, split.n_images, batch_size):
        regions, mask = split.image_batch(start, min(start + batch_size, split.n_images))
        yield torch.from_numpy(regions), torch.from_numpy(mask)


def iterate_captions(
    split: PrecompSplit, tokenizer: Tokenizer | SubwordTokenizer, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every caption in order, in batches: ``(tokens [b,L] int64, token_mask [b,L] float32)``."""
    _check_batch_size(batch_size)
    caps = split.captions
    for start in range(0, len(caps), batch_size):
        tokens, mask = tokenizer.encode_batch(caps[start : start + batch_size])
        yield torch.from_numpy(tokens), torch.from_numpy(mask)


@dataclass
class KarpathyImage:
    """One image of a Karpathy split file (``dataset_flickr8k.json`` ...)."""

    filename: str
    filepath: str  # "" when the file has none (Flickr)
    captions: list[str]  # the raw sentences
    imgid: int


def read_karpathy(json_path: str | os.PathLike[str]) -> dict[str, list[KarpathyImage]]:
    """Images per split of a Karpathy JSON, in file order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "restval": [...]}`` (always these
        four keys, possibly empty; any other split name found is added too).

    Raises:
        InputError: missing or unreadable file, not the Karpathy format.
    """
    p = Path(json_path)
    try:
        with open(p, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError as e:
        raise InputError(f"{p}: Karpathy split file not found") from e
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read as JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InputError(f'{p}: not a Karpathy split file: expected an object with an "images" list')
    out: dict[str, list[KarpathyImage]] = {s: [] for s in KARPATHY_SPLITS}
    for n, im in enumerate(doc["images"]):
        try:
            caps = [str(s["raw"]) for s in im["sentences"]]
            item = KarpathyImage(
                filename=str(im["filename"]),
                filepath=str(im.get("filepath", "")),
                captions=caps,
                imgid=int(im.get("imgid", n)),
            )
            split = str(im["split"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{p}: image #{n} is not in the Karpathy format (needs filename, split, "
                f"sentences[].raw): missing or bad {e}"
            ) from e
        out.setdefault(split, []).append(item)
    return out


def vocab_from_split(split: PrecompSplit, threshold: int = 4) -> dict[str, int]:
    """Vocabulary of a (training) split's captions: words seen ``threshold`` times or more."""
    return build_vocab(split.captions, threshold=threshold)
