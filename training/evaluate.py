"""Recall@K evaluation: stage-1-only, two-stage at K, and exhaustive (DESIGN §4).

Scores go through the model's one cross-product ``score``, sharded. Ranks are
pessimistic on ties: a ground truth tied with a negative counts as ranked
below it, so a constant scorer gets R@1 = 0, never 100.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mssan_infer.text.subword import SubwordTokenizer
from mssan_infer.text.words import Tokenizer

from .model import MSSAN, TERMS, Encoded

__all__ = [
    "ranks_i2t",
    "ranks_t2i",
    "recall_from_ranks",
    "recall_report",
    "twostage_scores",
    "encode_split",
    "pad_cat",
    "sharded_score",
    "evaluate",
    "evaluate_split",
    "report_from_scores",
    "sharded_level_scores",
    "select_level_weights",
    "twostage_recall",
    "LEVEL_GRID",
]

log = logging.getLogger(__name__)
CAPS = 5
_RERANK_OFFSET = 1e4  # lifts reranked candidates above every stage-1 score
# Candidate weights of a level relative to the reference level (S_ll when it is on), which keeps 1.
# No 0: a level the config weights stays in the score (and stage 1 keeps a global level to rank by).
LEVEL_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


def ranks_i2t(sims: np.ndarray, caps_per_image: int = CAPS) -> np.ndarray:
    """Rank (0 = first) of each image's best ground-truth caption. ``sims [N, caps*N]``."""
    n, m = sims.shape
    if m != caps_per_image * n:
        raise ValueError(f"i2t needs [N, {caps_per_image}N] similarities, got {sims.shape}")
    gt = np.zeros_like(sims, dtype=bool)
    rows = np.repeat(np.arange(n), caps_per_image)
    gt[rows, np.arange(m)] = True
    best_gt = np.where(gt, sims, -np.inf).max(1, keepdims=True)  # [N,1]
    return ((sims >= best_gt) & ~gt).sum(1)


def ranks_t2i(sims: np.ndarray, caps_per_image: int = CAPS) -> np.ndarray:
    """Rank (0 = first) of each caption's image ``caption // caps``. ``sims [N, caps*N]``."""
    n, m = sims.shape
    if m != caps_per_image * n:
        raise ValueError(f"t2i needs [N, {caps_per_image}N] similarities, got {sims.shape}")
    gt_img = np.arange(m) // caps_per_image
    gt_score = sims[gt_img, np.arange(m)]  # [M]
    ge = sims >= gt_score[None, :]
    ge[gt_img, np.arange(m)] = False
    return ge.sum(0)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def recall_report(sims_i2t: np.ndarray, sims_t2i: np.ndarray | None = None) -> dict[str, Any]:
    """``{"i2t": {r1,r5,r10}, "t2i": {...}, "rsum"}`` from image x caption similarities.

    ``sims_t2i`` defaults to ``sims_i2t``; they differ for two-stage ranking,
    whose candidate lists depend on the query direction.
    """
    i2t = recall_from_ranks(ranks_i2t(sims_i2t))
    t2i = recall_from_ranks(ranks_t2i(sims_i2t if sims_t2i is None else sims_t2i))
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t.values()) + sum(t2i.values())}


def twostage_scores(stage1: np.ndarray, full: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Effective ranking scores of two-stage retrieval at depth ``k``.

    Queries run along ``axis`` (1: each image ranks captions; 0: each caption
    ranks images). The top ``k`` candidates by stage-1 are reordered by the full
    score and placed above all others, which keep their stage-1 order.
    """
    n_cand = stage1.shape[axis]
    k = min(k, n_cand)
    out = stage1.astype(np.float64).copy()
    if k <= 0:
        return out
    top = np.argpartition(-stage1, k - 1, axis=axis).take(np.arange(k), axis=axis)
    vals = np.take_along_axis(full, top, axis=axis).astype(np.float64) + _RERANK_OFFSET
    np.put_along_axis(out, top, vals, axis=axis)
    return out


def twostage_recall(stage1: np.ndarray, full: np.ndarray, k: int) -> dict[str, Any]:
    """``recall_report`` of two-stage retrieval at depth ``k`` (as ``twostage_scores`` both ways) from
    ``[N, 5N]`` scores, without building the reranked matrices when ``k >= 10``: a right item outside
    a query's top ``k`` then ranks ``k`` or lower and counts for no R@1/5/10, and one inside ranks by
    the candidates of that query whose full score is at least its own (ties pessimistic, as
    ``ranks_i2t``/``ranks_t2i``)."""
    n, m = stage1.shape
    if m != CAPS * n or full.shape != stage1.shape:
        raise ValueError(f"two-stage recall needs [N, {CAPS}N] scores, got {stage1.shape} and {full.shape}")
    if k < 10 or k >= m:
        return recall_report(
            twostage_scores(stage1, full, k, axis=1), twostage_scores(stage1, full, k, axis=0)
        )
    # each query's top k by stage 1, as twostage_scores picks them: captions per image, images per caption
    top = np.argpartition(-stage1, k - 1, axis=1)[:, :k]
    top_t = None if k >= n else np.argpartition(-np.ascontiguousarray(stage1.T), k - 1, axis=1)[:, :k]
    # image -> text: each row ranks the 5N captions; its right ones are 5i .. 5i+4
    f = np.take_along_axis(full, top, axis=1)
    right = top // CAPS == np.arange(n)[:, None]
    best = np.where(right, f, -np.inf).max(1, keepdims=True)
    r_i2t = np.where(np.isfinite(best[:, 0]), ((f >= best) & ~right).sum(1), k)
    # text -> image: each caption ranks the N images; its right one is caption // 5
    if top_t is None:
        r_t2i = ranks_t2i(full)
    else:
        f_t = full[top_t, np.arange(m)[:, None]]  # [5N, k]
        right_t = top_t == (np.arange(m) // CAPS)[:, None]
        own = np.where(right_t, f_t, -np.inf).max(1, keepdims=True)
        r_t2i = np.where(np.isfinite(own[:, 0]), ((f_t >= own) & ~right_t).sum(1), k)
    i2t, t2i = recall_from_ranks(r_i2t), recall_from_ranks(r_t2i)
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t.values()) + sum(t2i.values())}


def pad_cat(parts: Sequence[Encoded]) -> Encoded:
    """Concatenate encodings of different lengths, zero-padding locals, masks and Grams."""
    n = max(p.local.shape[1] for p in parts)
    out = []
    for p in parts:
        pad = n - p.local.shape[1]
        out.append(
            Encoded(
                p.stage1,
                F.pad(p.local, (0, 0, 0, pad)),
                F.pad(p.mask, (0, pad)),
                F.pad(p.gram, (0, pad, 0, pad)),
                p.glob,
                p.summary,
            )
        )
    return Encoded(*(torch.cat(ts, 0) for ts in zip(*out)))


@torch.inference_mode()
def encode_split(
    model: MSSAN,
    images: np.ndarray,
    region_mask: np.ndarray | None,
    captions: Sequence[str],
    tokenizer: Tokenizer | SubwordTokenizer,
    batch_size: int = 256,
) -> tuple[Encoded, Encoded]:
    """Encode every image (``[N,R,Dv]``, possibly a memmap) and caption of a split."""
    model.eval()
    dev = next(model.parameters()).device
    imgs = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[s : s + batch_size], dtype=np.float32)).to(dev)
        m = (
            torch.ones(x.shape[:2])
            if region_mask is None
            else torch.from_numpy(np.asarray(region_mask[s : s + batch_size], dtype=np.float32))
        ).to(dev)
        imgs.append(model.encode_image(x, m))
    txts = []
    for s in range(0, len(captions), batch_size):
        tok, msk = tokenizer.encode_batch(list(captions[s : s + batch_size]))
        txts.append(model.encode_text(torch.from_numpy(tok).to(dev), torch.from_numpy(msk).to(dev)))
    return pad_cat(imgs), pad_cat(txts)


@torch.inference_mode()
def sharded_score(
    model: MSSAN,
    img: Encoded,
    txt: Encoded,
    shard: int = 128,
    terms: Iterable[str] = TERMS,
) -> np.ndarray:
    """``model.score`` over all pairs in ``shard x shard`` blocks -> ``[Ni, Nt]`` numpy."""
    terms = tuple(terms)
    ni, nt = img.stage1.shape[0], txt.stage1.shape[0]
    out = np.empty((ni, nt), dtype=np.float32)
    for i in range(0, ni, shard):
        sub_i = img.select(slice(i, i + shard))
        for j in range(0, nt, shard):
            out[i : i + shard, j : j + shard] = (
                model.score(sub_i, txt.select(slice(j, j + shard)), terms).float().cpu().numpy()
            )
    return out


def evaluate(
    model: MSSAN,
    img: Encoded,
    txt: Encoded,
    rerank: int = 100,
    terms: Iterable[str] = TERMS,
    shard: int = 128,
) -> dict[str, dict[str, Any]]:
    """Recall for ``stage1``, ``twostage@K`` and ``exhaustive`` on encoded images x captions."""
    terms = tuple(terms)
    full = sharded_score(model, img, txt, shard, terms)
    # Stage 1 is the global part of the same score (e_img . e_txt when both global terms are on).
    stage1 = sharded_score(model, img, txt, max(shard, 1024), tuple(t for t in terms if t != "ll"))
    return report_from_scores(full, stage1, rerank)


def report_from_scores(full: np.ndarray, stage1: np.ndarray, rerank: int = 100) -> dict[str, dict[str, Any]]:
    """Recall for ``stage1``, ``twostage@K`` and ``exhaustive`` from ``[N, 5N]`` score matrices."""
    out = {"stage1": recall_report(stage1), "exhaustive": recall_report(full)}
    if rerank > 0:
        out[f"twostage@{rerank}"] = twostage_recall(stage1, full, rerank)
    for mode, rep in out.items():
        rep["mode"] = mode
    return out


def evaluate_split(
    model: MSSAN,
    images: np.ndarray,
    region_mask: np.ndarray | None,
    captions: Sequence[str],
    tokenizer: Tokenizer | SubwordTokenizer,
    rerank: int = 100,
    terms: Iterable[str] = TERMS,
    coco: bool = False,
) -> dict[str, Any]:
    """Encode and evaluate a split; with ``coco=True`` (COCO ``testall``) report 1K (5 folds) and 5K."""
    img, txt = encode_split(model, images, region_mask, captions, tokenizer)
    if not coco:
        return evaluate(model, img, txt, rerank, terms)
    n = img.stage1.shape[0]
    if n < 5000:
        raise ValueError(f"COCO 1K/5K evaluation needs the 5000-image testall split, got {n} images")
    folds = [
        evaluate(
            model,
            img.select(slice(f * 1000, (f + 1) * 1000)),
            txt.select(slice(f * 5000, (f + 1) * 5000)),
            rerank,
            terms,
        )
        for f in range(5)
    ]
    return {"coco1k": _mean_reports(folds), "coco5k": evaluate(model, img, txt, rerank, terms)}


def _mean_reports(reports: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mode in reports[0]:
        rs = [r[mode] for r in reports]
        agg: dict[str, Any] = {
            d: {k: float(np.mean([r[d][k] for r in rs])) for k in rs[0][d]} for d in ("i2t", "t2i")
        }
        agg["rsum"] = float(np.mean([r["rsum"] for r in rs]))
        agg["mode"] = mode
        out[mode] = agg
    return out


def sharded_level_scores(model: MSSAN, img: Encoded, txt: Encoded, shard: int = 128) -> dict[str, np.ndarray]:
    """Each level the model weights (``lam_t != 0``), unweighted: ``{"gg": S_gg, ...}``, ``[Ni, Nt]`` each."""
    out = {}
    for t in TERMS:
        lam = float(getattr(model.cfg, f"lam_{t}"))
        if lam:
            out[t] = sharded_score(
                model, img, txt, shard if t == "ll" else max(shard, 1024), (t,)
            ) / np.float32(lam)
    return out


def _weighted(levels: dict[str, np.ndarray], w: dict[str, float], terms: Sequence[str]) -> np.ndarray:
    out = np.float32(w[terms[0]]) * levels[terms[0]]
    for t in terms[1:]:
        out += np.float32(w[t]) * levels[t]
    return out


def select_level_weights(
    levels: dict[str, np.ndarray],
    start: dict[str, float],
    grid: Sequence[float] = LEVEL_GRID,
    rerank: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Level weights with the best dev rSum on ``levels`` (a dev split's ``sharded_level_scores``).

    The reference level (S_ll when present, else the last present level) keeps weight 1; each
    other present level takes a weight from ``grid``; absent levels stay 0. Only the ratios
    matter to a ranking. ``start`` (the training weights) is tried first and kept on a tie.
    ``0 < rerank < 5N`` (the dev captions) with a global level present: the rSum is that of
    two-stage retrieval at that depth (stage 1 ranks by the weighted global levels, ``S_gg`` and
    ``S_gl``; the top ``rerank`` are reordered by the full score), what the runtime returns, so the
    weights also keep stage 1 good; otherwise the exhaustive rSum.

    Returns:
        The chosen weights (all three levels) and the recall report they were chosen by (``mode``:
        ``"twostage@K"`` or ``"exhaustive"``).
    """
    present = [t for t in TERMS if t in levels]
    if not present:
        raise ValueError("no level to weight: every lam_* is 0")
    ref = present[-1]
    others = present[:-1]
    glob = [t for t in ("gg", "gl") if t in levels]
    two = rerank > 0 and bool(glob) and rerank < max(levels[ref].shape)
    candidates = [tuple(start[t] / start[ref] for t in others)]
    candidates += list(itertools.product(grid, repeat=len(others)))
    best: tuple[float, dict[str, float], dict[str, Any]] | None = None
    for cand in candidates:  # the training weights come first and win a tie
        w = {t: 0.0 for t in TERMS}
        w.update(dict(zip(others, (float(c) for c in cand))))
        w[ref] = 1.0
        full = _weighted(levels, w, present)
        if two:  # stage 1 ranks by the weighted global levels
            rep = {**twostage_recall(_weighted(levels, w, glob), full, rerank), "mode": f"twostage@{rerank}"}
        else:
            rep = {**recall_report(full), "mode": "exhaustive"}
        if best is None or rep["rsum"] > best[0]:
            best = (rep["rsum"], w, rep)
    assert best is not None
    return best[1], best[2]
