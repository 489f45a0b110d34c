"""MSSAN: Multi-level Symmetric Semantic Alignment Network (DESIGN §2).

Imports only torch, the config dataclass and ``training.ops``; the transformer text
tower (``training.text_transformer``) is imported lazily when configured. Shapes: ``B`` batch, ``R``
regions, ``L`` words, ``Dv`` region feature size, ``D`` joint size. Masks are
float 1/0, 1 for real positions; padded positions are zeroed in the encoders
and every pooling/softmax is masked, so a fully masked row yields 0, not NaN.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .ops import EPS, NEG_FILL, l2norm, masked_mean, masked_softmax, reverse_padded

__all__ = [
    "MSSAN",
    "Encoded",
    "TERMS",
    "cross_attention_score",
    "attention_scores",
]

TERMS = ("gg", "gl", "ll")


def _aggregate(x: Tensor, mask: Tensor, bias: Tensor, agg: str, lambda_lse: float) -> Tensor:
    """Reduce the last axis of ``x`` over the positions of a 0/1 ``mask`` ("mean" or "lse"); ``bias`` is
    the mask's additive form (0 kept, ``NEG_FILL`` dropped). A row with no position kept gives a finite
    value that the caller zeroes."""
    if agg == "mean":  # x is finite, so x * mask is x where kept and 0 elsewhere
        return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if agg == "lse":  # dropped positions sit at NEG_FILL (|lambda x| <= lambda: x is a cosine)
        # logsumexp written out, shifted by the maximum as torch.logsumexp is (ONNX Runtime's
        # ReduceLogSumExp costs several times these few small nodes)
        y = lambda_lse * x + bias
        m = y.amax(-1, keepdim=True).detach()  # the shift cancels: no gradient through it
        return ((y - m).exp().sum(-1).log() + m.squeeze(-1)) * (1.0 / lambda_lse)
    raise ValueError(f"agg must be 'mean' or 'lse', got {agg!r}")


def _diagonal(gram: Tensor) -> Tensor:
    """The diagonal of square matrices ``[..., N, N]`` -> ``[..., N]``: a strided slice of the flattened
    matrices (ONNX ``Slice``, which TensorRT runs; ``torch.diagonal`` exports to ``EyeLike``, which it does
    not)."""
    n = gram.shape[-1]
    return gram.flatten(-2)[..., :: n + 1]


def attention_scores(
    s: Tensor,
    p_mask: Tensor,
    p_gram: Tensor,
    q_mask: Tensor,
    q_gram: Tensor,
    lam_p: float,
    lam_q: float,
    leaky: float = 0.1,
    agg: str = "mean",
    lambda_lse: float = 6.0,
) -> Tensor:
    """S_ll of pairs of items, from their local similarities, through the Gram identity.

    One side of each pair has ``P`` positions, the other ``Q``; leading (batch) axes broadcast.

    Args:
        s: ``[..., P, Q]`` local similarities ``p_i . q_j`` (zero at padded positions).
        p_mask: ``[..., P]``, p_gram: ``[..., P, P]`` the P side's 0/1 mask and Gram matrix.
        q_mask: ``[..., Q]``, q_gram: ``[..., Q, Q]`` the Q side's.
        lam_p: temperature of the softmax over P (each Q position attends over the P positions);
            ``lam_q`` the other way. Images as P: ``lam_p = lambda_t2i``; words as P: ``lambda_i2t``.
    Returns:
        ``[...]`` = (S_{Q attends P} + S_{P attends Q}) / 2, 0 for a pair with an empty side. The attended
        contexts are never built: ``q_j . c_j = sum_i alpha_ij s_ij`` and ``|c_j|^2 = alpha_j^T G_p alpha_j``.
    """
    p_mask, q_mask = p_mask.to(s.dtype), q_mask.to(s.dtype)  # bool masks too (no node when float already)
    if s.shape[-2] == 0 or s.shape[-1] == 0:  # a zero-length side: every pair is empty (no max of nothing)
        return s.new_zeros(torch.broadcast_shapes(s.shape[:-2], p_mask.shape[:-1], q_mask.shape[:-1]))
    # Padding enters the softmaxes and the aggregates as an additive bias (0 or NEG_FILL), broadcast,
    # never expanded: scores at padded positions are exactly 0, so 0 + NEG_FILL == NEG_FILL there.
    p_bias = (1.0 - p_mask) * NEG_FILL  # [...,P]
    q_bias = (1.0 - q_mask) * NEG_FILL  # [...,Q]
    act = F.leaky_relu(s, leaky)
    sq = act * act  # shared by both normalisations
    # The norms are reduced without keepdim and broadcast only in the product: ONNX Runtime runs an
    # element-wise node on a trailing axis of size 1 one value at a time.

    # Q attends over P: each P row normalised over Q, softmax over P. The softmax is written out (ONNX
    # Runtime runs one over an axis other than the last through two transposes), shifted by its maximum
    # as torch.softmax is, and left unnormalised: alpha_ij = e_ij / z_j, and z divides the [...,Q] sums.
    a = act * (lam_p * torch.rsqrt(sq.sum(-1) + EPS)).unsqueeze(-1)
    x = a + p_bias.unsqueeze(-1)
    e = torch.exp(x - x.amax(-2, keepdim=True).detach())  # [...,P,Q]  (the shift cancels: no gradient)
    z = e.sum(-2).clamp(min=1.0)  # [...,Q]  >= 1 already (the maximum's term is 1); a graph fed P = 0 gets 1
    num = (e * s).sum(-2) / z  # [...,Q]  q_j . c_j
    c2 = (e * torch.matmul(p_gram, e)).sum(-2) / (z * z)  # [...,Q]  |c_j|^2
    q2 = _diagonal(q_gram)  # [...,Q]  |q_j|^2
    s_q = _aggregate(num * torch.rsqrt((c2 + EPS) * (q2 + EPS)), q_mask, q_bias, agg, lambda_lse)

    # P attends over Q: each Q column normalised over P, softmax over Q.
    b = act * (lam_q * torch.rsqrt(sq.sum(-2) + EPS)).unsqueeze(-2)
    beta = torch.softmax(b + q_bias.unsqueeze(-2), dim=-1)  # [...,P,Q]
    num_p = (beta * s).sum(-1)  # [...,P]
    c2_p = (beta * torch.matmul(beta, q_gram)).sum(-1)  # [...,P]
    p2 = _diagonal(p_gram)  # [...,P]
    s_p = _aggregate(num_p * torch.rsqrt((c2_p + EPS) * (p2 + EPS)), p_mask, p_bias, agg, lambda_lse)
    # A pair with an empty side has no alignment at all: 0 (masks are 0/1; a zero-length side sums to 0).
    both = p_mask.sum(-1).clamp(max=1.0) * q_mask.sum(-1).clamp(max=1.0)
    return (0.5 * both) * (s_q + s_p)


def cross_attention_score(
    v: Tensor,
    v_mask: Tensor,
    v_gram: Tensor,
    w: Tensor,
    w_mask: Tensor,
    w_gram: Tensor,
    lambda_t2i: float = 9.0,
    lambda_i2t: float = 4.0,
    leaky: float = 0.1,
    agg: str = "mean",
    lambda_lse: float = 6.0,
) -> Tensor:
    """S_ll for every image x caption pair: :func:`attention_scores` with regions as P, words as Q.

    Args:
        v: ``[Ni,R,D]`` unfused region locals (zero at padding), ``v_mask [Ni,R]``,
           ``v_gram = v v^T [Ni,R,R]``.
        w: ``[Nt,L,D]`` word locals, ``w_mask [Nt,L]``, ``w_gram [Nt,L,L]``.
    Returns:
        ``[Ni,Nt]`` = (S_t2i + S_i2t) / 2. Locals must be zero at padded positions (the encoders
        guarantee it): padded regions/words then contribute nothing even where an all-masked softmax
        is uniform.
    """
    ni, r, d = v.shape
    nt, l, _ = w.shape
    # s[n,m,i,j] = v[n,i] . w[m,j]: one [Ni*R, D] x [D, Nt*L] product.
    s = torch.matmul(v.reshape(-1, d), w.reshape(-1, d).t())  # [Ni*R, Nt*L]
    s = s.reshape(ni, r, nt, l).permute(0, 2, 1, 3)  # [Ni,Nt,R,L]
    return attention_scores(
        s,
        v_mask.unsqueeze(1),
        v_gram.unsqueeze(1),
        w_mask.unsqueeze(0),
        w_gram.unsqueeze(0),
        lambda_t2i,
        lambda_i2t,
        leaky,
        agg,
        lambda_lse,
    )


class Encoded(NamedTuple):
    """One side's encoding. ``local`` is zero at padded positions."""

    stage1: Tensor  # [B,2D]  stage-1 vector (e_img or e_txt)
    local: Tensor  # [B,N,D] unfused locals
    mask: Tensor  # [B,N]
    gram: Tensor  # [B,N,N] local @ local^T
    glob: Tensor  # [B,D]   g
    summary: Tensor  # [B,D]   u (MFFM, not normalised)

    def select(self, idx: Tensor | slice) -> "Encoded":
        return Encoded(*(t[idx] for t in self))


class MFFM(nn.Module):
    """Multi-level feature fusion: significance-weighted summary of globally fused locals."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.att = nn.Linear(d, d)  # W_a (with bias)
        self.query = nn.Linear(d, 1, bias=False)  # q
        self.gate = nn.Linear(2 * d, d)  # W_z, b_z

    def forward(self, x: Tensor, g: Tensor, mask: Tensor) -> Tensor:
        """``x [B,N,D]`` locals, ``g [B,D]`` global, ``mask [B,N]`` -> ``u [B,D]``."""
        logits = self.query(torch.tanh(self.att(x))).squeeze(-1)  # [B,N]
        a = masked_softmax(logits, mask, dim=1)  # [B,N]
        # W_z [x; g] + b_z as W_x x + (W_g g + b_z): the global's half once per item instead of once per
        # local (the same gate; its graph reads the same weights and does half the products). The
        # split is at a fixed width, so the exported graph holds W_x and W_g as two constants.
        d = self.att.in_features
        zg = F.linear(g.unsqueeze(1), self.gate.weight[:, d:], self.gate.bias)  # [B,1,D] (MatMul, not Gemm)
        z = torch.sigmoid(F.linear(x, self.gate.weight[:, :d]) + zg)  # [B,N,D]
        fused = l2norm(x + z * g.unsqueeze(1))  # [B,N,D]
        return (a.unsqueeze(-1) * fused).sum(1)  # [B,D]


class MSSAN(nn.Module):
    """Image-text matching with global-global, global-local and local-local similarities."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 4:
            raise ValueError(f"ModelConfig.vocab_size must be set from the vocabulary (got {cfg.vocab_size})")
        self.cfg = cfg
        d = cfg.embed_size
        self.img_fc = nn.Linear(cfg.img_dim, d)
        if cfg.text_encoder == "transformer":
            from .text_transformer import TransformerText  # imports transformers

            self.text_tower = TransformerText(cfg)
        elif cfg.text_encoder == "bigru":
            self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
            self.gru_fwd = nn.GRU(cfg.word_dim, d, batch_first=True)
            self.gru_bwd = nn.GRU(cfg.word_dim, d, batch_first=True)
        else:
            raise ValueError(
                f"ModelConfig.text_encoder must be 'bigru' or 'transformer', got {cfg.text_encoder!r}"
            )
        self.mffm_img = MFFM(d)
        self.mffm_txt = MFFM(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = (6.0 / (self.img_fc.in_features + self.img_fc.out_features)) ** 0.5
        nn.init.uniform_(self.img_fc.weight, -r, r)
        nn.init.zeros_(self.img_fc.bias)
        if self.cfg.text_encoder == "bigru":
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            with torch.no_grad():
                self.embed.weight[0].zero_()

    # ---- encoders -------------------------------------------------------
    def encode_image(self, regions: Tensor, region_mask: Tensor) -> Encoded:
        """``regions [B,R,Dv]``, ``region_mask [B,R]`` -> image ``Encoded``."""
        keep = (region_mask > 0).unsqueeze(-1)  # [B,R,1]
        v = l2norm(self.img_fc(regions))  # [B,R,D]
        v = torch.where(keep, v, torch.zeros_like(v))
        g = l2norm(masked_mean(v, region_mask))  # [B,D]
        u = self.mffm_img(v, g, region_mask)  # [B,D]
        c = self.cfg
        stage1 = torch.cat([c.lam_gg * g + 0.5 * c.lam_gl * u, 0.5 * c.lam_gl * g], dim=-1)
        return Encoded(stage1, v, region_mask, torch.matmul(v, v.transpose(1, 2)), g, u)

    def encode_text(self, tokens: Tensor, token_mask: Tensor) -> Encoded:
        """``tokens [B,L]`` int64, ``token_mask [B,L]`` -> text ``Encoded``."""
        if self.cfg.text_encoder == "transformer":
            w = self.text_tower(tokens, token_mask)  # [B,L,D] subword locals
        else:
            w = self._bigru_locals(tokens, token_mask)  # [B,L,D]
        g = l2norm(masked_mean(w, token_mask))  # [B,D]
        u = self.mffm_txt(w, g, token_mask)  # [B,D]
        return Encoded(torch.cat([g, u], dim=-1), w, token_mask, torch.matmul(w, w.transpose(1, 2)), g, u)

    def _bigru_locals(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Masked Bi-GRU word locals ``[B,L,D]``, L2-normalised, zero at padding."""
        keep = (token_mask > 0).unsqueeze(-1)  # [B,L,1]
        lengths = (token_mask > 0).sum(1)  # [B]
        x = self.embed(tokens)  # [B,L,E]
        h_f, _ = self.gru_fwd(x)  # [B,L,D]
        h_b, _ = self.gru_bwd(reverse_padded(x, lengths))  # [B,L,D] (reversed time)
        h_b = reverse_padded(h_b, lengths)
        w = l2norm((h_f + h_b) / 2)
        return torch.where(keep, w, torch.zeros_like(w))

    # ---- similarities (all cross products [Ni, Nt]) ----------------------
    @staticmethod
    def s_gg(img: Encoded, txt: Encoded) -> Tensor:
        return img.glob @ txt.glob.t()

    @staticmethod
    def s_gl(img: Encoded, txt: Encoded) -> Tensor:
        return 0.5 * (img.summary @ txt.glob.t() + img.glob @ txt.summary.t())

    def s_ll(self, img: Encoded, txt: Encoded) -> Tensor:
        c = self.cfg
        return cross_attention_score(
            img.local,
            img.mask,
            img.gram,
            txt.local,
            txt.mask,
            txt.gram,
            c.lambda_t2i,
            c.lambda_i2t,
            c.leaky,
            c.agg,
            c.lambda_lse,
        )

    def s_ll_pairs(self, img: Encoded, txt: Encoded, rows: Tensor, cols: Tensor) -> Tensor:
        """``S_ll`` of the image of ``rows[k]`` and the caption of ``cols[k]`` only -> ``[K]``: the entries
        ``s_ll(img, txt)[rows, cols]`` (the same math, pair by pair instead of all pairs)."""
        c = self.cfg
        s = torch.matmul(img.local[rows], txt.local[cols].transpose(1, 2))  # [K,R,L]
        return attention_scores(
            s,
            img.mask[rows],
            img.gram[rows],
            txt.mask[cols],
            txt.gram[cols],
            c.lambda_t2i,
            c.lambda_i2t,
            c.leaky,
            c.agg,
            c.lambda_lse,
        )

    def level_scores(self, img: Encoded, txt: Encoded) -> dict[str, Tensor]:
        """Each level the config weights (``lam_* != 0``), unweighted: ``{"gg": S_gg, ...}``,
        ``[Ni,Nt]`` each."""
        fns = {"gg": self.s_gg, "gl": self.s_gl, "ll": self.s_ll}
        return {t: fns[t](img, txt) for t in TERMS if getattr(self.cfg, f"lam_{t}")}

    @staticmethod
    def stage1_score(img: Encoded, txt: Encoded) -> Tensor:
        """``e_img . e_txt`` = lam_gg*S_gg + lam_gl*S_gl."""
        return img.stage1 @ txt.stage1.t()

    def score(self, img: Encoded, txt: Encoded, terms: Iterable[str] = TERMS) -> Tensor:
        """Final similarity ``[Ni,Nt]``; ``terms`` selects a subset of ("gg","gl","ll") for ablations."""
        terms = tuple(terms)
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}; choose from {TERMS}")
        c = self.cfg
        if "gg" in terms and "gl" in terms and c.lam_gg and c.lam_gl:
            out = self.stage1_score(img, txt)
        else:
            out = torch.zeros(
                img.stage1.shape[0], txt.stage1.shape[0], dtype=img.stage1.dtype, device=img.stage1.device
            )
            if "gg" in terms and c.lam_gg:
                out = out + c.lam_gg * self.s_gg(img, txt)
            if "gl" in terms and c.lam_gl:
                out = out + c.lam_gl * self.s_gl(img, txt)
        if "ll" in terms and c.lam_ll:
            out = out + c.lam_ll * self.s_ll(img, txt)
        return out

    def forward(self, regions: Tensor, region_mask: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        return self.score(self.encode_image(regions, region_mask), self.encode_text(tokens, token_mask))
