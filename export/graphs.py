"""Thin ``nn.Module`` wrappers over ``MSSAN``, one per exported graph (no copied math).

Each wrapper's ``forward`` takes the inputs of its ``mssan_infer.spec`` graph in
order and returns its outputs in order, so ``torch.onnx.export`` and the parity
check can both be driven by the spec.
"""

from __future__ import annotations

from torch import Tensor, nn

from mssan_infer.spec import GRAPHS, IMAGE_ENCODER, SCORER, TEXT_ENCODER
from training.model import MSSAN, cross_attention_score

__all__ = ["ImageEncoderGraph", "TextEncoderGraph", "ScorerGraph", "build_graphs"]


class ImageEncoderGraph(nn.Module):
    """``regions [B,R,Dv]``, ``region_mask [B,R]`` -> ``img_stage1 [B,2D]``, ``img_local [B,R,D]``,
    ``img_gram [B,R,R]``."""

    spec = IMAGE_ENCODER

    def __init__(self, model: MSSAN) -> None:
        super().__init__()
        self.model = model

    def forward(self, regions: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.model.encode_image(regions, region_mask)
        return enc.stage1, enc.local, enc.gram


class TextEncoderGraph(nn.Module):
    """``tokens [B,L]`` int64, ``token_mask [B,L]`` -> ``txt_stage1 [B,2D]``, ``txt_local [B,L,D]``,
    ``txt_gram [B,L,L]``."""

    spec = TEXT_ENCODER

    def __init__(self, model: MSSAN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.model.encode_text(tokens, token_mask)
        return enc.stage1, enc.local, enc.gram


class ScorerGraph(nn.Module):
    """Image locals ``[Ni,R,D]`` and caption locals ``[Nt,L,D]`` (+ masks, Grams) -> ``s_ll [Ni,Nt]`` =
    lam_ll * S_ll."""

    spec = SCORER

    def __init__(self, model: MSSAN) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        img_local: Tensor,
        region_mask: Tensor,
        img_gram: Tensor,
        txt_local: Tensor,
        token_mask: Tensor,
        txt_gram: Tensor,
    ) -> Tensor:
        c = self.model.cfg
        s = cross_attention_score(
            img_local,
            region_mask,
            img_gram,
            txt_local,
            token_mask,
            txt_gram,
            c.lambda_t2i,
            c.lambda_i2t,
            c.leaky,
            c.agg,
            c.lambda_lse,
        )  # [Ni,Nt]
        return c.lam_ll * s


def build_graphs(model: MSSAN) -> dict[str, nn.Module]:
    """One eval-mode wrapper per graph of ``mssan_infer.spec.GRAPHS``, keyed by graph name."""
    model.eval()
    graphs: dict[str, nn.Module] = {
        IMAGE_ENCODER.name: ImageEncoderGraph(model),
        TEXT_ENCODER.name: TextEncoderGraph(model),
        SCORER.name: ScorerGraph(model),
    }
    assert set(graphs) == set(GRAPHS), "every spec graph needs a wrapper"
    return graphs
