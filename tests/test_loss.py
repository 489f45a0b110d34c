"""Adaptive-margin triplet loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from training.loss import AdaptiveMarginLoss

S = torch.tensor([[0.9, 0.3, 0.5], [0.2, 0.8, 0.7], [0.6, 0.1, 0.4]])
IDS = torch.tensor([0, 1, 2])


def test_hardest_negative_loss_equals_hand_computed_vsepp() -> None:
    loss, stats = AdaptiveMarginLoss(m0=0.2, adaptive=False)(S, IDS)
    # i2t rows: max(0.2-0.9+0.5, 0.2-0.9+0.3)=0 ; max(.2-.8+.7)=0.1 ; max(.2-.4+.6)=0.4
    # t2i cols: col0 max(.2-.9+.6)=0 ; col1 max(.2-.8+.3)=0 ; col2 max(.2-.4+.7)=0.5
    assert float(loss) == pytest.approx(0.1 + 0.4 + 0.5, abs=1e-6)
    assert stats["gap_i2t"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7) + (0.4 - 0.6)) / 3, abs=1e-6)
    assert stats["gap_t2i"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.3) + (0.4 - 0.7)) / 3, abs=1e-6)


def test_all_negatives_sums_every_violation() -> None:
    loss, _ = AdaptiveMarginLoss(m0=0.2, adaptive=False, negatives="all")(S, IDS)
    i2t = [0, 0, 0, 0.1, 0.4, 0.0]  # (0,1) (0,2) | (1,0) (1,2) | (2,0) (2,1)
    t2i = [0, 0, 0, 0, 0.3, 0.5]  # col0: (1,0)(2,0) col1: (0,1)(2,1) col2: (0,2)(1,2)
    expect = sum(max(0, 0.2 - S[i, i] + S[i, j]) for i in range(3) for j in range(3) if i != j)
    expect += sum(max(0, 0.2 - S[j, j] + S[i, j]) for j in range(3) for i in range(3) if i != j)
    assert float(loss) == pytest.approx(float(expect), abs=1e-6)
    assert float(loss) == pytest.approx(sum(i2t) + sum(t2i), abs=1e-6)


def test_captions_of_the_same_image_are_not_negatives() -> None:
    s = torch.tensor([[0.5, 0.9], [0.9, 0.5]])
    loss_same, _ = AdaptiveMarginLoss(adaptive=False)(s, torch.tensor([3, 3]))
    loss_diff, _ = AdaptiveMarginLoss(adaptive=False)(s, torch.tensor([3, 4]))
    assert float(loss_same) == 0.0 and float(loss_diff) > 0.5


def test_margin_update_follows_the_formula_and_clamps() -> None:
    f = AdaptiveMarginLoss(m0=0.2, rho=0.1, kappa=0.5, m_min=0.05, m_max=0.5)
    f.update_margins(0.4, -1.0)
    assert f.margin[0].item() == pytest.approx(0.9 * 0.2 + 0.1 * (0.2 + 0.5 * 0.4))
    assert f.margin[1].item() == pytest.approx(max(0.05, 0.9 * 0.2 + 0.1 * (0.2 - 0.5)))
    for _ in range(500):
        f.update_margins(10.0, 10.0)
    assert f.margin.tolist() == pytest.approx([0.5, 0.5])


def test_non_adaptive_margins_never_move() -> None:
    f = AdaptiveMarginLoss(m0=0.2, adaptive=False)
    f.update_margins(5.0, 5.0)
    assert f.margin.tolist() == pytest.approx([0.2, 0.2])


def test_margins_are_buffers_saved_in_state_dict() -> None:
    f = AdaptiveMarginLoss()
    assert "margin" in f.state_dict() and not list(f.parameters())
