"""Inputs for export and parity: the tracing example and the reference cases, per graph.

All feeds are numpy arrays keyed by the spec's input names (what ONNX Runtime
takes); ``to_torch`` turns them into the tensors the PyTorch wrappers take.
The cases deliberately use shapes other than the tracing example (B=1 and
B>example, L=1 and L>example, R=36 and R!=36, heavy padding, fully masked rows)
so that a dimension frozen during tracing shows up as a parity failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mssan_infer.spec import IMAGE_ENCODER, SCORER, TEXT_ENCODER
from training.config import ModelConfig
from training.model import MSSAN

__all__ = [
    "Case", "Feeds", "to_torch", "image_feeds", "text_feeds", "scorer_feeds",
    "example_feeds", "parity_cases", "FIRST_TOKEN_ID",
]

Feeds = dict[str, np.ndarray]
FIRST_TOKEN_ID = 4                     # ids 0..3 are <pad> <start> <end> <unk>

# The tracing example: small, padded, and with every dynamic dimension distinct.
EXAMPLE_B, EXAMPLE_R, EXAMPLE_L = 2, 7, 5
EXAMPLE_NI, EXAMPLE_NT = 2, 3


@dataclass(frozen=True)
class Case:
    """One named set of inputs for one graph."""

    name: str
    feeds: Feeds = field(repr=False)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.feeds.items()}


def to_torch(feeds: Feeds) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def _mask(lengths: Sequence[int], n: int) -> np.ndarray:
    lengths = [min(max(int(x), 0), n) for x in lengths]
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)   # [B,n]


def image_feeds(cfg: ModelConfig, rng: np.random.Generator, lengths: Sequence[int], r: int) -> Feeds:
    """Region features ``[B,R,Dv]`` (non-negative, like pooled CNN features; junk at padding) and their mask."""
    regions = np.abs(rng.standard_normal((len(lengths), r, cfg.img_dim))).astype(np.float32)
    return {"regions": regions, "region_mask": _mask(lengths, r)}


def text_feeds(cfg: ModelConfig, rng: np.random.Generator, lengths: Sequence[int], l: int) -> Feeds:
    """Token ids ``[B,L]`` (random words; random ids also at padding, which must not leak) and their mask."""
    tokens = rng.integers(FIRST_TOKEN_ID, cfg.vocab_size, size=(len(lengths), l), dtype=np.int64)
    return {"tokens": tokens, "token_mask": _mask(lengths, l)}


@torch.inference_mode()
def scorer_feeds(model: MSSAN, images: Feeds, texts: Feeds) -> Feeds:
    """Scorer inputs as the encoders produce them (unit locals, zero padding, consistent Grams)."""
    ti, tt = to_torch(images), to_torch(texts)
    img = model.encode_image(ti["regions"], ti["region_mask"])
    txt = model.encode_text(tt["tokens"], tt["token_mask"])
    return {
        "img_local": img.local.numpy(), "region_mask": images["region_mask"], "img_gram": img.gram.numpy(),
        "txt_local": txt.local.numpy(), "token_mask": texts["token_mask"], "txt_gram": txt.gram.numpy(),
    }


def example_feeds(model: MSSAN, seed: int = 0) -> dict[str, Feeds]:
    """The tracing inputs of every graph (padded, every dynamic dimension distinct)."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    img = image_feeds(cfg, rng, [EXAMPLE_R, EXAMPLE_R - 2], EXAMPLE_R)
    txt = text_feeds(cfg, rng, [EXAMPLE_L, EXAMPLE_L - 2], EXAMPLE_L)
    s_img = image_feeds(cfg, rng, [EXAMPLE_R, EXAMPLE_R - 3][:EXAMPLE_NI], EXAMPLE_R)
    s_txt = text_feeds(cfg, rng, [EXAMPLE_L, EXAMPLE_L - 1, 2][:EXAMPLE_NT], EXAMPLE_L)
    return {
        IMAGE_ENCODER.name: img,
        TEXT_ENCODER.name: txt,
        SCORER.name: scorer_feeds(model, s_img, s_txt),
    }


def parity_cases(model: MSSAN, seed: int = 1) -> dict[str, list[Case]]:
    """Reference cases of every graph: the example shape and shapes the tracer never saw."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    lmax = max(cfg.max_len, EXAMPLE_L + 1)
    ex = example_feeds(model)

    def img(lengths: Sequence[int], r: int) -> Feeds:
        return image_feeds(cfg, rng, lengths, r)

    def txt(lengths: Sequence[int], l: int) -> Feeds:
        return text_feeds(cfg, rng, lengths, l)

    image_cases = [
        Case("example_B2_R7", ex[IMAGE_ENCODER.name]),
        Case("B1_R36", img([36], 36)),
        Case("B9_R3_mixed", img([3, 1, 2, 3, 0, 3, 1, 2, 3], 3)),
        Case("B4_R50_heavy_padding", img([1, 2, 50, 5], 50)),
        Case("B3_R10_fully_masked_rows", img([0, 10, 0], 10)),
    ]
    text_cases = [
        Case("example_B2_L5", ex[TEXT_ENCODER.name]),
        Case("B1_L1", txt([1], 1)),
        Case("B9_L1_mixed", txt([1, 0, 1, 1, 0, 1, 1, 1, 1], 1)),
        Case(f"B7_L{lmax}_mixed", txt([lmax, 1, 3, lmax - 1, 7, 2, 12], lmax)),
        Case(f"B5_L{lmax}_heavy_padding", txt([1, 2, 3, lmax, 1], lmax)),
        Case("B3_L6_fully_masked_rows", txt([0, 0, 6], 6)),
    ]
    scorer_cases = [
        Case("example_Ni2_Nt3_R7_L5", ex[SCORER.name]),
        Case("Ni1_Nt1_R36_L1", scorer_feeds(model, img([36], 36), txt([1], 1))),
        Case("Ni9_Nt1_R3_L12", scorer_feeds(model, img([3, 1, 2, 3, 2, 3, 1, 2, 3], 3), txt([12], 12))),
        Case(f"Ni1_Nt8_R36_L{lmax}", scorer_feeds(model, img([30], 36), txt([lmax, 1, 2, 5, 9, 12, lmax - 3, 4], lmax))),
        Case("Ni4_Nt5_R20_L15_heavy_padding_and_empty_rows",
             scorer_feeds(model, img([1, 0, 20, 3], 20), txt([15, 0, 1, 2, 0], 15))),
    ]
    return {IMAGE_ENCODER.name: image_cases, TEXT_ENCODER.name: text_cases, SCORER.name: scorer_cases}
