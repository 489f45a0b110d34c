"""Inputs for export and parity: the tracing example and the reference cases, per graph.

All feeds are numpy arrays keyed by the spec's input names (what every runner takes).
The ONNX cases (:func:`parity_cases`) deliberately use shapes other than the tracing
example (B=1 and B>example, L=1 and L>example, R=36 and R!=36, heavy padding, fully
masked rows) so that a dimension frozen during tracing shows up as a parity failure;
the engine cases (:func:`profile_cases`) sit at the optimisation profiles' min/opt/max.
Scorer inputs are always what an encoder makes of image and text feeds (unit locals,
zero padding, consistent Grams), through whichever runner is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from mssan_infer.backends.base import Backend
from mssan_infer.spec import IMAGE_ENCODER, SCORER, TEXT_ENCODER
from training.model import MSSAN

from .graphs import build_graphs
from .runners import TorchRunner

__all__ = [
    "Case",
    "Feeds",
    "FeedConfig",
    "image_feeds",
    "text_feeds",
    "scorer_feeds",
    "torch_runner",
    "example_feeds",
    "parity_cases",
    "profile_cases",
    "rerank_inputs",
    "FIRST_TOKEN_ID",
]

Feeds = dict[str, np.ndarray]
FIRST_TOKEN_ID = 4  # ids 0..3 are <pad> <start> <end> <unk>

# The tracing example: small, padded, and with every dynamic dimension distinct.
EXAMPLE_B, EXAMPLE_R, EXAMPLE_L = 2, 7, 5
EXAMPLE_NI, EXAMPLE_NT = 2, 3


class FeedConfig(Protocol):
    """What feeds are made from: ``training.config.ModelConfig``, or a bundle's sizes
    (``export.tensorrt``)."""

    @property
    def img_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_len(self) -> int: ...


@dataclass(frozen=True)
class Case:
    """One named set of inputs for one graph."""

    name: str
    feeds: Feeds = field(repr=False)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.feeds.items()}


def _mask(lengths: Sequence[int], n: int) -> np.ndarray:
    lengths = [min(max(int(x), 0), n) for x in lengths]
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)  # [B,n]


def image_feeds(cfg: FeedConfig, rng: np.random.Generator, lengths: Sequence[int], r: int) -> Feeds:
    """Region features ``[B,R,Dv]`` (non-negative, like pooled CNN features; junk at padding) and their
    mask."""
    regions = np.abs(rng.standard_normal((len(lengths), r, cfg.img_dim))).astype(np.float32)
    return {"regions": regions, "region_mask": _mask(lengths, r)}


def text_feeds(cfg: FeedConfig, rng: np.random.Generator, lengths: Sequence[int], l: int) -> Feeds:
    """Token ids ``[B,L]`` (random words; random ids also at padding, which must not leak) and their mask."""
    tokens = rng.integers(
        FIRST_TOKEN_ID, max(FIRST_TOKEN_ID + 1, cfg.vocab_size), size=(len(lengths), l), dtype=np.int64
    )
    return {"tokens": tokens, "token_mask": _mask(lengths, l)}


def scorer_feeds(encoder: Backend, images: Feeds, texts: Feeds) -> Feeds:
    """Scorer inputs as ``encoder``'s image and text encoders produce them from ``images`` and ``texts``."""
    img = encoder.run(IMAGE_ENCODER.name, images)
    txt = encoder.run(TEXT_ENCODER.name, texts)
    return {
        "img_local": img["img_local"],
        "region_mask": images["region_mask"],
        "img_gram": img["img_gram"],
        "txt_local": txt["txt_local"],
        "token_mask": texts["token_mask"],
        "txt_gram": txt["txt_gram"],
    }


def torch_runner(model: MSSAN) -> TorchRunner:
    """The PyTorch graph wrappers of ``model`` as a runner (the reference of the ONNX graphs)."""
    cfg = model.cfg
    return TorchRunner(
        build_graphs(model), {"D": cfg.embed_size, "D2": 2 * cfg.embed_size, "Dv": cfg.img_dim}
    )


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
        SCORER.name: scorer_feeds(torch_runner(model), s_img, s_txt),
    }


def parity_cases(model: MSSAN, seed: int = 1) -> dict[str, list[Case]]:
    """Reference cases of every graph: the example shape and shapes the tracer never saw."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    lmax = max(cfg.max_len, EXAMPLE_L + 1)
    ex = example_feeds(model)
    enc = torch_runner(model)

    def img(lengths: Sequence[int], r: int) -> Feeds:
        return image_feeds(cfg, rng, lengths, r)

    def txt(lengths: Sequence[int], l: int) -> Feeds:
        return text_feeds(cfg, rng, lengths, l)

    def sc(images: Feeds, texts: Feeds) -> Feeds:
        return scorer_feeds(enc, images, texts)

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
        Case("Ni1_Nt1_R36_L1", sc(img([36], 36), txt([1], 1))),
        Case("Ni9_Nt1_R3_L12", sc(img([3, 1, 2, 3, 2, 3, 1, 2, 3], 3), txt([12], 12))),
        Case(f"Ni1_Nt8_R36_L{lmax}", sc(img([30], 36), txt([lmax, 1, 2, 5, 9, 12, lmax - 3, 4], lmax))),
        Case(
            "Ni4_Nt5_R20_L15_heavy_padding_and_empty_rows",
            sc(img([1, 0, 20, 3], 20), txt([15, 0, 1, 2, 0], 15)),
        ),
    ]
    return {IMAGE_ENCODER.name: image_cases, TEXT_ENCODER.name: text_cases, SCORER.name: scorer_cases}


def _lengths(n: int, full: int, pad: bool) -> list[int]:
    """``n`` lengths up to ``full``: all full, or (``pad``) the first full and the others padded."""
    if not pad or full == 1:
        return [full] * n
    return [full] + [max(1, (full * (i % 3 + 1)) // 4) for i in range(1, n)]


def profile_cases(
    cfg: FeedConfig, axes: Mapping[str, tuple[int, int, int]], encoder: Backend, seed: int = 0
) -> dict[str, list[Case]]:
    """Cases at the optimisation profiles' min, opt and max of every axis (padded, except at min).

    The encoders get ``B x R`` / ``B x L`` at each point; the scorer gets ``Ni x Nt`` at min and opt,
    and at max once along each candidate axis (``Ni`` max against one caption, one image against
    ``Nt`` max), with ``R``/``L`` at their maximum. Scorer inputs come from ``encoder``.
    """
    rng = np.random.default_rng(seed)
    cases: dict[str, list[Case]] = {IMAGE_ENCODER.name: [], TEXT_ENCODER.name: [], SCORER.name: []}
    for i, label in enumerate(("min", "opt", "max")):
        b, r, l = (axes[a][i] for a in ("B", "R", "L"))
        pad = label != "min"
        cases[IMAGE_ENCODER.name].append(
            Case(f"{label}_B{b}_R{r}", image_feeds(cfg, rng, _lengths(b, r, pad), r))
        )
        cases[TEXT_ENCODER.name].append(
            Case(f"{label}_B{b}_L{l}", text_feeds(cfg, rng, _lengths(b, l, pad), l))
        )
        pairs = (
            [(axes["Ni"][i], axes["Nt"][i])] if label != "max" else [(axes["Ni"][2], 1), (1, axes["Nt"][2])]
        )
        for ni, nt in pairs:
            feeds = scorer_feeds(
                encoder,
                image_feeds(cfg, rng, _lengths(ni, r, pad), r),
                text_feeds(cfg, rng, _lengths(nt, l, pad), l),
            )
            cases[SCORER.name].append(Case(f"{label}_Ni{ni}_Nt{nt}_R{r}_L{l}", feeds))
    return cases


def rerank_inputs(
    cfg: FeedConfig, direction: str, depth: int, seed: int, r_max: int = 36, l_max: int | None = None
) -> tuple[Feeds, Feeds]:
    """One query against ``depth`` candidates: ``"t2i"`` one caption vs images, ``"i2t"`` one image vs
    captions.

    Images have up to ``min(36, r_max)`` regions, captions up to 12 (query) / 20 (candidates) words,
    within ``l_max`` (default: the tokenizer's ``max_len``).
    """
    rng = np.random.default_rng(seed)
    l_cap = cfg.max_len if l_max is None else min(l_max, max(cfg.max_len, 1))
    r = max(1, min(36, r_max))
    lq = max(1, min(12, l_cap))
    lc = max(1, min(20, max(l_cap, 2)))
    if direction == "t2i":
        lengths = rng.integers(max(1, min(5, r)), r + 1, size=depth)
        lengths[: min(3, depth)] = (1, min(2, r), r)[: min(3, depth)]
        return image_feeds(cfg, rng, lengths.tolist(), r), text_feeds(cfg, rng, [max(1, lq - 3)], lq)
    lengths = rng.integers(1, lc + 1, size=depth)
    lengths[: min(2, depth)] = (1, lc)[: min(2, depth)]
    return image_feeds(cfg, rng, [min(30, r)], r), text_feeds(cfg, rng, lengths.tolist(), lc)
