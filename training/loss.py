"""Triplet ranking loss with adaptively updated margins (DESIGN §3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["AdaptiveMarginLoss"]

Negatives = Literal["hardest", "all"]


class AdaptiveMarginLoss(nn.Module):
    """``L = sum_pos [m - S(pos) + S(neg)]_+`` in both directions, in-batch negatives.

    ``scores[i, j]`` is the similarity of the image of pair ``i`` and the caption
    of pair ``j``; the positives are the diagonal. Captions of the same image are
    never negatives (``img_ids``). One margin per direction, kept in the buffer
    ``margin = [m_i2t, m_t2i]`` and moved after each step by :meth:`update_margins`:
    ``m <- clamp((1-rho) m + rho (m0 + kappa gap), m_min, m_max)``. With
    ``adaptive=False`` the margins stay at ``m0``: exactly VSE++.
    """

    def __init__(
        self,
        m0: float = 0.2,
        rho: float = 0.01,
        kappa: float = 0.5,
        m_min: float = 0.05,
        m_max: float = 0.5,
        adaptive: bool = True,
        negatives: Negatives = "hardest",
    ) -> None:
        super().__init__()
        if negatives not in ("hardest", "all"):
            raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
        self.m0, self.rho, self.kappa, self.m_min, self.m_max = m0, rho, kappa, m_min, m_max
        self.adaptive = adaptive
        self.negatives: Negatives = negatives
        self.register_buffer("margin", torch.full((2,), float(m0)))

    def forward(
        self, scores: Tensor, img_ids: Tensor, negatives: Negatives | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss (scalar, summed over the batch) and stats ``gap_i2t``, ``gap_t2i``."""
        mode = negatives or self.negatives
        pos = scores.diagonal()  # [B]
        neg, cost_cap, cost_img = self._costs(scores, img_ids)
        if mode == "hardest":
            loss = cost_cap.max(1).values.sum() + cost_img.max(0).values.sum()
        elif mode == "all":
            loss = cost_cap.sum() + cost_img.sum()
        else:
            raise ValueError(f"negatives must be 'hardest' or 'all', got {mode!r}")
        with torch.no_grad():
            filled = torch.where(neg, scores, torch.full_like(scores, float("-inf")))
            hard_cap, hard_img = filled.max(1).values, filled.max(0).values
            ok_cap, ok_img = torch.isfinite(hard_cap), torch.isfinite(hard_img)
            gap_i2t = (pos - hard_cap)[ok_cap].mean() if ok_cap.any() else torch.zeros(())
            gap_t2i = (pos - hard_img)[ok_img].mean() if ok_img.any() else torch.zeros(())
        return loss, {"gap_i2t": float(gap_i2t), "gap_t2i": float(gap_t2i)}

    def _costs(self, scores: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The valid negatives ``[B,B]`` and the hinge costs of image i vs caption j and of caption j vs
        image i."""
        pos = scores.diagonal()  # [B]
        neg = img_ids.unsqueeze(1) != img_ids.unsqueeze(0)  # [B,B] True where a valid negative
        m_i2t, m_t2i = self.margin[0], self.margin[1]
        zero = torch.zeros_like(scores)
        cost_cap = torch.where(neg, (m_i2t - pos.unsqueeze(1) + scores).clamp(min=0), zero)
        cost_img = torch.where(neg, (m_t2i - pos.unsqueeze(0) + scores).clamp(min=0), zero)
        return neg, cost_cap, cost_img

    @torch.no_grad()
    def hardest_entries(self, scores: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rows and columns of the entries of ``scores [B,B]`` that the ``"hardest"`` loss has a gradient
        through, each once: the positives (the diagonal) and each row's and each column's hardest negative,
        found as :meth:`forward` finds them (the same ``max`` over the same values picks the same entry)."""
        _, cost_cap, cost_img = self._costs(scores, img_ids)
        b = scores.shape[0]
        i = torch.arange(b, device=scores.device)
        rows = torch.cat([i, i, cost_img.max(0).indices])
        cols = torch.cat([i, cost_cap.max(1).indices, i])
        flat = torch.unique(rows * b + cols)
        return flat // b, flat % b

    @torch.no_grad()
    def update_margins(self, gap_i2t: float, gap_t2i: float) -> None:
        """Move each direction's margin towards ``m0 + kappa * gap`` (no-op unless adaptive)."""
        if not self.adaptive:
            return
        gap = torch.tensor([gap_i2t, gap_t2i], dtype=self.margin.dtype, device=self.margin.device)
        new = (1 - self.rho) * self.margin + self.rho * (self.m0 + self.kappa * gap)
        self.margin.copy_(new.clamp(self.m_min, self.m_max))
