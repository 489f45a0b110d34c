"""MSSAN math: the cross-product score, the Gram identity, masks, stage-1 decomposition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.model import MSSAN, cross_attention_score, l2norm, reverse_padded


def _model(agg: str = "mean", **kw: float) -> MSSAN:
    torch.manual_seed(0)
    return MSSAN(ModelConfig(vocab_size=40, word_dim=12, embed_size=24, img_dim=20, agg=agg, **kw))  # type: ignore[arg-type]


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    reg = torch.randn(4, 6, 20, generator=g)
    rmask = torch.ones(4, 6)
    rmask[1, 4:] = 0
    rmask[3, 1:] = 0
    tok = torch.randint(4, 40, (5, 8), generator=g)
    tmask = torch.ones(5, 8)
    tmask[0, 3:] = 0
    tmask[2, 1:] = 0
    tmask[4, 6:] = 0
    return reg, rmask, tok * tmask.long(), tmask


def _reference_s_ll(v, vm, w, wm, lt2i=9.0, li2t=4.0, leaky=0.1):  # type: ignore[no-untyped-def]
    """SCAN-form S_ll for ONE pair with materialised attended contexts (no Gram identity)."""
    v, w = v[vm > 0], w[wm > 0]  # [R,D], [L,D] real positions only
    s = v @ w.t()  # [R,L]
    a = l2norm(F.leaky_relu(s, leaky), dim=1)  # each region's row over words
    alpha = torch.softmax(lt2i * a, dim=0)  # over regions
    ctx = alpha.t() @ v  # [L,D]
    t2i = (l2norm(w) * l2norm(ctx)).sum(-1).mean()
    b = l2norm(F.leaky_relu(s, leaky), dim=0)  # each word's column over regions
    beta = torch.softmax(li2t * b, dim=1)  # over words
    ctx_i = beta @ w  # [R,D]
    i2t = (l2norm(v) * l2norm(ctx_i)).sum(-1).mean()
    return 0.5 * (t2i + i2t)


def test_score_cross_product_equals_per_pair_loop() -> None:
    m = _model()
    reg, rmask, tok, tmask = _inputs()
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    full = m.score(img, txt)
    assert full.shape == (4, 5)
    for i in range(4):
        for j in range(5):
            one = m.score(img.select(slice(i, i + 1)), txt.select(slice(j, j + 1)))
            assert torch.allclose(one[0, 0], full[i, j], atol=1e-6)


def test_gram_identity_s_ll_matches_materialised_contexts() -> None:
    m = _model()
    reg, rmask, tok, tmask = _inputs()
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    s_ll = m.s_ll(img, txt)
    for i in range(4):
        for j in range(5):
            ref = _reference_s_ll(img.local[i], rmask[i], txt.local[j], tmask[j])
            assert abs(ref.item() - s_ll[i, j].item()) < 1e-5, (i, j)


def test_stage1_dot_product_equals_weighted_global_terms() -> None:
    m = _model(lam_gg=0.7, lam_gl=1.3, lam_ll=0.5)
    reg, rmask, tok, tmask = _inputs()
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    expect = 0.7 * m.s_gg(img, txt) + 1.3 * m.s_gl(img, txt)
    assert (m.stage1_score(img, txt) - expect).abs().max() < 1e-5
    assert (m.score(img, txt) - expect - 0.5 * m.s_ll(img, txt)).abs().max() < 1e-5
    assert img.stage1.shape == (4, 48) and txt.stage1.shape == (5, 48)


@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_padding_never_changes_a_score(agg: str) -> None:
    m = _model(agg)
    reg, rmask, tok, tmask = _inputs()
    base = m.score(m.encode_image(reg, rmask), m.encode_text(tok, tmask))
    g = torch.Generator().manual_seed(7)
    reg2 = torch.cat([reg, 5 * torch.randn(4, 3, 20, generator=g)], 1)
    tok2 = torch.cat([tok, torch.randint(4, 40, (5, 5), generator=g)], 1)  # garbage ids under the mask
    padded = m.score(
        m.encode_image(reg2, torch.cat([rmask, torch.zeros(4, 3)], 1)),
        m.encode_text(tok2, torch.cat([tmask, torch.zeros(5, 5)], 1)),
    )
    assert (base - padded).abs().max() < 1e-5


@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_fully_masked_rows_give_zero_terms_and_finite_gradients(agg: str) -> None:
    m = _model(agg)
    reg, rmask, tok, tmask = _inputs()
    rmask[0] = 0
    tmask[1] = 0
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    s_ll = m.s_ll(img, txt)
    assert torch.isfinite(s_ll).all()
    assert s_ll[0].abs().max() == 0 and s_ll[:, 1].abs().max() == 0
    assert img.local[0].abs().max() == 0 and txt.local[1].abs().max() == 0
    m.score(img, txt).sum().backward()
    for name, p in m.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_reverse_padded_reverses_within_length_only() -> None:
    x = torch.arange(10.0).reshape(2, 5, 1)
    out = reverse_padded(x, torch.tensor([3, 5]))
    assert out[0, :, 0].tolist() == [2, 1, 0, 3, 4]
    assert out[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_padded(out, torch.tensor([3, 5])), x)


def test_backward_gru_sees_no_padding() -> None:
    """The same caption with and without trailing padding gives identical word features."""
    m = _model()
    tok = torch.tensor([[5, 6, 7]])
    a = m.encode_text(tok, torch.ones(1, 3)).local
    b = m.encode_text(torch.tensor([[5, 6, 7, 9, 9]]), torch.tensor([[1.0, 1, 1, 0, 0]])).local
    assert (a - b[:, :3]).abs().max() < 1e-6


def test_cross_attention_is_symmetric_in_shard_order() -> None:
    """Scoring a shard equals scoring its pieces: no cross-talk between pairs."""
    m = _model()
    reg, rmask, tok, tmask = _inputs()
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    whole = cross_attention_score(img.local, img.mask, img.gram, txt.local, txt.mask, txt.gram)
    part = cross_attention_score(
        img.local[2:], img.mask[2:], img.gram[2:], txt.local[:2], txt.mask[:2], txt.gram[:2]
    )
    assert torch.allclose(whole[2:, :2], part, atol=1e-6)


def test_terms_ablation_and_unknown_term() -> None:
    m = _model()
    reg, rmask, tok, tmask = _inputs()
    img, txt = m.encode_image(reg, rmask), m.encode_text(tok, tmask)
    assert torch.allclose(m.score(img, txt, ("ll",)), m.s_ll(img, txt))
    assert torch.allclose(m.score(img, txt, ("gg", "ll")), m.s_gg(img, txt) + m.s_ll(img, txt), atol=1e-6)
    with pytest.raises(ValueError):
        m.score(img, txt, ("xx",))
