"""Section 1: scorer throughput (pairs/s) — ONNX Runtime vs PyTorch eager vs a SCAN-style per-caption loop.

Shapes: one caption x K images (t2i rerank), one image x K captions (i2t
rerank) and an ``Ni x Nt`` shard (evaluation). FLOPs per pair are those of
the Gram formulation's matrix products (DESIGN §2): ``2RLD`` for the
similarities, ``2R^2L`` for ``alpha^T G_v alpha`` and ``2RL^2`` for
``beta^T G_w beta``; element-wise work is not counted, so the fraction of the
sgemm peak is a lower bound.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from .timing import numpy_blas_setter, sgemm_fn, side_by_side

__all__ = ["run_scorer", "scan_loop_score", "flops_per_pair"]

log = logging.getLogger(__name__)


def flops_per_pair(r: int, l: int, d: int) -> float:
    """Matrix-product FLOPs of one image x caption pair in the Gram form."""
    return 2.0 * r * l * d + 2.0 * r * r * l + 2.0 * r * l * l


def scan_loop_score(
    v: Any, v_mask: Any, w: Any, w_mask: Any, lambda_t2i: float, lambda_i2t: float, leaky: float
) -> Any:
    """S_ll the way SCAN's reference code scores: for each caption, attended contexts materialised
    over all images.

    ``v [Ni,R,D]``, ``w [Nt,L,D]`` (PyTorch tensors, zero at padding) -> ``[Ni,Nt]``.
    Same math as ``training.model.cross_attention_score`` with ``agg="mean"``.
    """
    import torch
    import torch.nn.functional as F

    ni = v.shape[0]
    out = torch.empty(ni, w.shape[0], dtype=v.dtype)
    v_keep = (v_mask > 0).unsqueeze(2)  # [Ni,R,1]
    n_reg = v_mask.sum(1).clamp(min=1.0)  # [Ni]
    for j in range(w.shape[0]):
        n_words = int((w_mask[j] > 0).sum())
        cap = w[j, :n_words].unsqueeze(0).expand(ni, -1, -1)  # [Ni,L,D]
        attn = F.leaky_relu(torch.bmm(v, cap.transpose(1, 2)), leaky)  # [Ni,R,L]
        # t2i: normalise each region's row over words, softmax over regions, contexts [Ni,L,D]
        a = lambda_t2i * F.normalize(attn, dim=2, eps=1e-8)
        alpha = torch.softmax(a.masked_fill(~v_keep, -1e4), dim=1)
        ctx = torch.bmm(alpha.transpose(1, 2), v)  # [Ni,L,D]
        t2i = F.cosine_similarity(cap, ctx, dim=2, eps=1e-8).mean(1)  # [Ni]
        # i2t: normalise each word's column over regions, softmax over words, contexts [Ni,R,D]
        b = lambda_i2t * F.normalize(attn.masked_fill(~v_keep, 0.0), dim=1, eps=1e-8)
        beta = torch.softmax(b, dim=2)
        ctx_i = torch.bmm(beta, cap)  # [Ni,R,D]
        cos_i = F.cosine_similarity(v, ctx_i, dim=2, eps=1e-8)  # [Ni,R]
        i2t = torch.where(v_keep[..., 0], cos_i, torch.zeros_like(cos_i)).sum(1) / n_reg
        out[:, j] = 0.5 * (t2i + i2t)
    return out


def _ort_scorer(bundle: Any, threads: int) -> Any:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads would steal the cores from the interleaved PyTorch rounds.
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.log_severity_level = 3
    return ort.InferenceSession(str(bundle / "scorer.onnx"), o, providers=["CPUExecutionProvider"])


def run_scorer(
    bundle: Any,
    model: Any,
    imgs: Any,
    txts: Any,
    shapes: list[tuple[str, int, int]],
    threads: int,
    repeats: int,
    loop_max_pairs: int,
    max_seconds: float,
) -> dict[str, Any]:
    """Time every candidate on each ``(name, Ni, Nt)`` shape.

    Args:
        bundle: bundle folder of ``model`` (its ``scorer.onnx``).
        model: the PyTorch ``MSSAN`` of the bundle.
        imgs, txts: runtime ``Encoded`` (numpy) images and captions, at least ``max Ni`` / ``max Nt`` items.
        loop_max_pairs: skip the SCAN loop on bigger shapes (it is the slow reference).
    """
    import torch

    from training.model import Encoded

    sess = _ort_scorer(bundle, threads)
    cfg = model.cfg
    sgemm_raw, sgemm_flops = sgemm_fn()
    set_blas = numpy_blas_setter()

    def sgemm() -> None:
        # numpy's BLAS gets `threads` only here; elsewhere it runs on one thread, so no idle
        # OpenBLAS worker spins on a core another candidate needs.
        set_blas(threads)
        sgemm_raw()
        set_blas(1)

    set_blas(1)
    out: dict[str, Any] = {"threads": threads, "shapes": {}}
    T = torch.from_numpy
    for name, ni, nt in shapes:
        iv = [np.ascontiguousarray(a[:ni]) for a in (imgs.stage1, imgs.local, imgs.mask, imgs.gram)]
        tv = [np.ascontiguousarray(a[:nt]) for a in (txts.stage1, txts.local, txts.mask, txts.gram)]
        r, l, d = iv[1].shape[1], tv[1].shape[1], iv[1].shape[2]
        feeds = {
            "img_local": iv[1],
            "region_mask": iv[2],
            "img_gram": iv[3],
            "txt_local": tv[1],
            "token_mask": tv[2],
            "txt_gram": tv[3],
        }
        zi, zt = torch.zeros(ni, d), torch.zeros(nt, d)
        ie = Encoded(T(iv[0]), T(iv[1]), T(iv[2]), T(iv[3]), zi, zi)
        te = Encoded(T(tv[0]), T(tv[1]), T(tv[2]), T(tv[3]), zt, zt)

        def ort_score() -> np.ndarray:
            return iv[0] @ tv[0].T + sess.run(None, feeds)[0]  # stage 1 + s_ll, as the runtime adds them

        def torch_score() -> Any:
            with torch.inference_mode():
                return model.score(ie, te)

        def loop_score() -> Any:
            with torch.inference_mode():
                return ie.stage1 @ te.stage1.t() + cfg.lam_ll * scan_loop_score(
                    ie.local, ie.mask, te.local, te.mask, cfg.lambda_t2i, cfg.lambda_i2t, cfg.leaky
                )

        fns: dict[str, Callable[[], Any]] = {"onnxruntime": ort_score, "torch_eager": torch_score}
        if ni * nt <= loop_max_pairs:
            fns["scan_loop"] = loop_score
        fns["sgemm"] = sgemm
        ref = torch_score().numpy()
        agree = {
            k: float(np.abs(np.asarray(f() if k != "sgemm" else ref) - ref).max())
            for k, f in fns.items()
            if k not in ("sgemm", "torch_eager")
        }
        log.info("scorer %s (%dx%d): timing %s", name, ni, nt, list(fns))
        res = side_by_side(
            fns, repeats=repeats, warmup=2, max_seconds=max_seconds, after={"sgemm": lambda: time.sleep(0.2)}
        )
        fpp = flops_per_pair(r, l, d)
        pairs = ni * nt
        sg = sgemm_flops / (res["sgemm"]["p50_ms"] / 1e3) / 1e9
        row: dict[str, Any] = {
            "ni": ni,
            "nt": nt,
            "r": r,
            "l": l,
            "d": d,
            "pairs": pairs,
            "flops_per_pair": fpp,
            "sgemm_gflops": sg,
            "max_abs_diff_vs_torch": agree,
        }
        for k, s in res.items():
            if k == "sgemm":
                continue
            pps = pairs / (s["p50_ms"] / 1e3)
            row[k] = {
                **s,
                "pairs_per_s": pps,
                "gflops": pps * fpp / 1e9,
                "fraction_of_sgemm": pps * fpp / 1e9 / sg,
            }
        row["sgemm"] = res["sgemm"]
        row["speedup_ort_vs_torch"] = res["torch_eager"]["p50_ms"] / res["onnxruntime"]["p50_ms"]
        if "scan_loop" in res:
            row["speedup_ort_vs_loop"] = res["scan_loop"]["p50_ms"] / res["onnxruntime"]["p50_ms"]
        out["shapes"][name] = row
    set_blas(threads)
    return out
