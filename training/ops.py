"""Masked tensor ops shared by the model and its text towers (DESIGN §2).

Imports only torch. Masks are float 1/0, 1 for real positions; a fully masked row
yields 0, not NaN. ``training.model`` and ``training.text_transformer`` both import
from here, so neither has to import the other for these.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EPS", "NEG_FILL", "l2norm", "masked_mean", "masked_softmax", "reverse_padded"]

EPS = 1e-8
NEG_FILL = -1e4  # additive attention bias / softmax fill at padding (the model's one fill value)


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """``x / sqrt(sum(x^2) + 1e-8)``: the one normalisation form of the model."""
    return x / torch.sqrt((x * x).sum(dim, keepdim=True) + EPS)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` of positions where ``mask`` > 0; masked (and all-masked) -> 0."""
    keep = mask > 0
    p = torch.softmax(torch.where(keep, logits, torch.full_like(logits, NEG_FILL)), dim=dim)
    return torch.where(keep, p, torch.zeros_like(p))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over axis 1 of ``x [B,N,D]`` at positions ``mask [B,N]`` > 0; empty -> 0."""
    keep = (mask > 0).unsqueeze(-1)  # [B,N,1]
    total = torch.where(keep, x, torch.zeros_like(x)).sum(1)  # [B,D]
    count = mask.sum(1, keepdim=True).clamp(min=1.0)  # [B,1]
    return total / count


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence of ``x [B,L,E]`` within its length; padding stays in place.

    An involution: applying it twice gives ``x`` back. Exports to ONNX at any ``L``.
    """
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # [1,L]
    idx = lengths.unsqueeze(1) - 1 - steps  # [B,L]
    idx = torch.where(idx >= 0, idx, steps.expand_as(idx))
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
