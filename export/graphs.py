"""Thin ``nn.Module`` wrappers over ``MSSAN``, one per exported graph (no copied math).

Each wrapper's ``forward`` takes the inputs of its ``mssan_infer.spec`` graph in
order and returns its outputs in order, so ``torch.onnx.export`` and the parity
check can both be driven by the spec.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mssan_infer.spec import GRAPHS, IMAGE_ENCODER, QUERY_SCORERS, SCORER, TEXT_ENCODER, GraphSpec
from training.model import MSSAN, attention_scores, cross_attention_score

__all__ = [
    "ImageEncoderGraph",
    "TextEncoderGraph",
    "ScorerGraph",
    "QueryScorerGraph",
    "build_graphs",
    "build_query_scorers",
    "QUERY_BITS",
    "QUERY_MAX",
]

# The query's locals are quantized to symmetric codes in [-63, 63] inside the int8 query scorers: with
# the candidates' uint8 codes (8 bits) the u8 x s8 kernel's pairwise int16 sums cannot saturate on CPUs
# without VNNI (2 * 255 * 63 < 2^15).
QUERY_BITS = 7
QUERY_MAX = 2 ** (QUERY_BITS - 1) - 1  # the largest query code


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


class _MatMulInteger(torch.autograd.Function):
    """``(a - 128) @ b`` for uint8 ``a`` and int8 ``b`` as int32: ONNX ``MatMulInteger`` (zero points 128
    and 0). Eager torch computes it exactly in float64 (|sums| < 2^53) for tracing and tests."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:  # noqa: ARG004
        return torch.matmul(a.to(torch.float64) - 128.0, b.to(torch.float64)).to(torch.int32)

    @staticmethod
    def symbolic(g: Any, a: Any, b: Any) -> Any:
        za = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        zb = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        return g.op("MatMulInteger", a, b, za, zb)


def quantize_query(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-vector codes of ``x [P, D]`` in [-63, 63] (int8) and their scales ``[P, 1]``."""
    scale = torch.clamp(x.abs().amax(-1, keepdim=True), min=1e-30) / QUERY_MAX
    return torch.round(x / scale).to(torch.int8), scale


class QueryScorerGraph(nn.Module):
    """One query against ``K`` candidates (a graph of ``mssan_infer.spec.QUERY_SCORERS``) -> ``s_ll [K]``.

    float32 candidates come as their similarities to the query, ``similarity = c_local @ q_local^T``
    ``[K, P, Q]`` (the runtime computes that product where the candidates' rows lie); int8 candidates as
    stored, uint8 codes + 128 ``[K, P, D]`` with per-vector scales ``[K, P]``, beside the query's locals
    ``[Q, D]``: the graph quantizes the query to 7 bits and runs the product as one integer GEMM. Then
    masks ``[K, P]``, Grams ``[K, P, P]``, the query's mask ``[Q]`` and Gram ``[Q, Q]``, and
    :func:`training.model.attention_scores` -- the model's own math, with the words as its P side.
    """

    def __init__(self, model: MSSAN, spec: GraphSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.int8 = spec.name.endswith("_int8")
        self.query_is_text = spec.name.startswith("scorer_t2i")

    def forward(self, *xs: Tensor) -> Tensor:
        c = self.model.cfg
        if self.int8:
            codes, scale, c_mask, c_gram, q_local, q_mask, q_gram = xs
            q_codes, q_scale = quantize_query(q_local)  # [Q, D] int8, [Q, 1]
            # [K, P, D] x [D, Q]: ONNX Runtime runs it as one GEMM, and fuses the Cast and the scaling
            # into MatMulIntegerToFloat.
            s_int = _MatMulInteger.apply(codes, q_codes.t())  # [K, P, Q] int32
            s = s_int.to(torch.float32) * (scale.unsqueeze(-1) * q_scale.t())
            c_gram = c_gram.to(torch.float32)
        else:
            s, c_mask, c_gram, q_mask, q_gram = xs  # s = c_local @ q_local^T [K, P, Q]
        # Words as P and regions last whichever side queries: ONNX Runtime's broadcasts over [K, P, Q] then
        # run over spans of regions, not of words (docs/experiments/2026-12-07-query-threads.md).
        if self.query_is_text:
            # s^T as the product eye(words) @ s^T, exact (each value times 1, plus zeros): ONNX Runtime fuses
            # the transpose into that small GEMM, where its Transpose of [K, regions, words] dispatches to the
            # thread pool once per candidate (docs/experiments/2026-12-07-query-threads.md). No EyeLike.
            i = torch.arange(q_mask.shape[0], device=s.device)
            eye = (i.unsqueeze(-1) == i).to(s.dtype)  # [words, words]
            s = torch.matmul(eye, s.transpose(-1, -2))  # [K, words, regions]
            words, regions = (q_mask, q_gram), (c_mask, c_gram)
        else:
            words, regions = (c_mask, c_gram), (q_mask, q_gram)
        return c.lam_ll * attention_scores(
            s, *words, *regions, c.lambda_i2t, c.lambda_t2i, c.leaky, c.agg, c.lambda_lse
        )


def build_query_scorers(model: MSSAN) -> dict[str, nn.Module]:
    """One eval-mode wrapper per graph of ``mssan_infer.spec.QUERY_SCORERS``, keyed by graph name."""
    model.eval()
    return {name: QueryScorerGraph(model, spec) for name, spec in QUERY_SCORERS.items()}


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
