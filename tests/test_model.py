"""MSSAN math: the cross-product score, the Gram identity, masks, stage-1 decomposition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.model import MFFM, MSSAN, attention_scores, cross_attention_score, l2norm, reverse_padded
from training.ops import masked_softmax


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


def _plain_attention_scores(s, pm, pg, qm, qg, lam_p, lam_q, agg):  # type: ignore[no-untyped-def]
    """``attention_scores`` with torch.softmax / torch.logsumexp and normalised weights (its first form)."""
    act = F.leaky_relu(s, 0.1)
    pb, qb = (1 - pm) * -1e4, (1 - qm) * -1e4
    alpha = torch.softmax(l2norm(act, dim=-1) * lam_p + pb.unsqueeze(-1), dim=-2)
    beta = torch.softmax(l2norm(act, dim=-2) * lam_q + qb.unsqueeze(-2), dim=-1)
    c2 = (alpha * (pg @ alpha)).sum(-2) + 1e-8
    c2_p = (beta * (beta @ qg)).sum(-1) + 1e-8
    x_q = (alpha * s).sum(-2) / torch.sqrt(c2 * (qg.diagonal(dim1=-2, dim2=-1) + 1e-8))
    x_p = (beta * s).sum(-1) / torch.sqrt(c2_p * (pg.diagonal(dim1=-2, dim2=-1) + 1e-8))

    def agg_(x, m, b):  # type: ignore[no-untyped-def]
        if agg == "mean":
            return (x * m).sum(-1) / m.sum(-1).clamp(min=1)
        return torch.logsumexp(6.0 * x + b, -1) / 6.0

    both = pm.amax(-1) * qm.amax(-1)
    return 0.5 * both * (agg_(x_q, qm, qb) + agg_(x_p, pm, pb))


@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_attention_scores_equal_the_plain_softmax_form_with_their_gradients(agg: str) -> None:
    """The softmax over P written out and left unnormalised, logsumexp written out: the same values and
    gradients as torch.softmax / torch.logsumexp (float64), large temperatures and empty rows included."""
    g = torch.Generator().manual_seed(3)
    for lam in ((9.0, 4.0), (60.0, 45.0)):
        v = l2norm(torch.randn(3, 7, 16, generator=g, dtype=torch.float64))
        w = l2norm(torch.randn(4, 5, 16, generator=g, dtype=torch.float64))
        vm = (torch.rand(3, 7, generator=g) > 0.3).double()
        wm = (torch.rand(4, 5, generator=g) > 0.3).double()
        vm[0], wm[1] = 0, 0
        v, w = (v * vm[..., None]).requires_grad_(), (w * wm[..., None]).requires_grad_()
        outs = []
        for fn in (attention_scores, _plain_attention_scores):
            s = (v[:, None, :, None] * w[None, :, None]).sum(-1)  # [Ni, Nt, R, L]
            vg, wg = v @ v.mT, w @ w.mT
            out = fn(s, vm[:, None], vg[:, None], wm[None], wg[None], *lam, agg=agg)
            outs.append((out, torch.autograd.grad((out + out**2).sum(), (v, w))))
        (got, dgot), (want, dwant) = outs
        assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-12
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(dgot, dwant))


def test_mffm_gate_split_equals_the_concatenated_gate_with_its_gradients() -> None:
    """W_z [x; g] + b_z computed as W_x x + (W_g g + b_z): the paper's gate, values and gradients
    (float64), padding included."""
    torch.manual_seed(2)
    m = MFFM(16).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.float64)
    mask[1, 4:] = 0

    def concatenated(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = masked_softmax(m.query(torch.tanh(m.att(x))).squeeze(-1), mask, dim=1)
        gx = g.unsqueeze(1).expand_as(x)
        z = torch.sigmoid(m.gate(torch.cat([x, gx], dim=-1)))
        return (a.unsqueeze(-1) * l2norm(x + z * gx)).sum(1)

    outs = []
    for fn in (lambda x, g: m(x, g, mask), concatenated):
        out = fn(x, g)
        params = (x, g, m.gate.weight, m.gate.bias)
        outs.append((out, torch.autograd.grad((out + out**2).sum(), params)))
    (got, dgot), (want, dwant) = outs
    assert (got - want).abs().max() < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(dgot, dwant))


@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_a_zero_length_side_scores_zero(agg: str) -> None:
    for p, q in ((0, 5), (4, 0), (0, 0)):
        s, pm, qm = torch.zeros(3, p, q), torch.ones(3, p, dtype=torch.bool), torch.ones(1, q)
        out = attention_scores(s, pm, torch.zeros(3, p, p), qm, torch.zeros(1, q, q), 9.0, 4.0, agg=agg)
        assert out.shape == (3,) and (out == 0).all()


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
