"""The training loop: adaptive-margin triplet loss, Adam with a step decay, best-on-dev selection.

``out_dir`` holds the best checkpoint (by dev exhaustive rSum) and ``out_dir/last``
the latest one, from which ``resume=True`` continues.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mssan_infer.tokenizer import Tokenizer

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, preset as get_preset
from .data import PairDataset, collate, load_split, vocab_from_split
from .evaluate import evaluate_split
from .loss import AdaptiveMarginLoss
from .model import MSSAN

__all__ = ["train", "seed_everything", "lr_at"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule: ``lr`` until ``lr_decay_epoch``, then ``lr * lr_decay``."""
    return cfg.lr * (cfg.lr_decay if epoch >= cfg.lr_decay_epoch else 1.0)


def _overrides(obj: Any, values: dict[str, Any] | None) -> Any:
    d = obj.to_dict()
    for k, v in (values or {}).items():
        if k not in d:
            raise ValueError(f"unknown {type(obj).__name__} field {k!r}; known: {sorted(d)}")
        d[k] = v
    return type(obj).from_dict(d)


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    epochs: int | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train MSSAN on a precomp-layout dataset; returns the best dev report and timings.

    Args:
        data_dir: folder with ``train_*`` and ``dev_*`` files (e.g. ``python -m training synth``).
        out_dir: checkpoint folder to write (best model; ``last/`` for resuming).
        preset: "tiny" or "paper"; ``model_overrides``/``train_overrides`` change fields.
        epochs: overrides the preset's epoch count.
        resume: continue from ``out_dir/last`` if present.
        max_steps: stop after this many optimiser steps in total (tests).
    """
    out = Path(out_dir)
    p = get_preset(preset)
    tcfg: TrainConfig = _overrides(p.train, train_overrides)
    if epochs is not None:
        tcfg.epochs = epochs
    seed_everything(tcfg.seed)
    train_split = load_split(data_dir, "train")
    dev_split = load_split(data_dir, "dev")

    start_epoch, best, history = 0, -1.0, []
    resumed = None
    if resume and (out / "last" / "state.json").is_file():
        resumed = load_checkpoint(out / "last")
        model, tokenizer = resumed.model, resumed.tokenizer
        mcfg = model.cfg
        start_epoch = int(resumed.state.get("epoch", -1)) + 1
        best = float(resumed.state.get("best_rsum", -1.0))
        history = list(resumed.state.get("history", []))
        log.info("resuming from %s at epoch %d", out / "last", start_epoch)
    else:
        tokenizer = Tokenizer(vocab_from_split(train_split, tcfg.vocab_threshold))
        mcfg = _overrides(p.model, {**(model_overrides or {}), "vocab_size": len(tokenizer),
                                    "img_dim": train_split.feat_dim})
        tokenizer.max_len = mcfg.max_len
        model = MSSAN(mcfg)
    device = torch.device(tcfg.device)
    model.to(device)
    loss_fn = AdaptiveMarginLoss(tcfg.m0, tcfg.rho, tcfg.kappa, tcfg.m_min, tcfg.m_max, tcfg.adaptive, tcfg.negatives).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    if resumed is not None:
        if resumed.optimizer_state is not None:
            opt.load_state_dict(resumed.optimizer_state)
        if "margins" in resumed.state:
            loss_fn.margin.copy_(torch.tensor(resumed.state["margins"]))

    ds = PairDataset(train_split, tokenizer)
    gen = torch.Generator()
    t0, steps = time.perf_counter(), 0
    log.info("training %s: %d captions, %d images, vocab %d, %d epochs", preset, len(ds),
             train_split.n_images, len(tokenizer), tcfg.epochs)
    for epoch in range(start_epoch, tcfg.epochs):
        gen.manual_seed(tcfg.seed * 1000 + epoch)
        loader = DataLoader(ds, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                            generator=gen, num_workers=tcfg.workers, drop_last=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(tcfg, epoch)
        negatives = "all" if epoch < tcfg.warmup_all_epochs else tcfg.negatives
        model.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            img = model.encode_image(batch["regions"], batch["region_mask"])
            txt = model.encode_text(batch["tokens"], batch["token_mask"])
            loss, stats = loss_fn(model.score(img, txt), batch["img_ids"], negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            loss_fn.update_margins(stats["gap_i2t"], stats["gap_t2i"])
            total += float(loss)
            n += 1
            steps += 1
            bar.set_postfix(loss=f"{float(loss):.2f}")
            if max_steps is not None and steps >= max_steps:
                break
        rep = evaluate_split(model, dev_split.images, dev_split.region_mask, dev_split.captions,
                             tokenizer, rerank=tcfg.eval_rerank)
        rsum = rep["exhaustive"]["rsum"]
        rec = {"epoch": epoch, "loss": total / max(n, 1), "negatives": negatives,
               "margins": loss_fn.margin.tolist(), "dev_rsum": rsum,
               "dev_stage1_rsum": rep["stage1"]["rsum"], "elapsed_s": time.perf_counter() - t0}
        history.append(rec)
        log.info("epoch %d loss %.3f margins %s dev rsum %.1f (stage1 %.1f)", epoch, rec["loss"],
                 [round(m, 3) for m in rec["margins"]], rsum, rep["stage1"]["rsum"])
        state = {"epoch": epoch, "margins": loss_fn.margin.tolist(), "best_rsum": max(best, rsum),
                 "history": history, "dev": rep}
        if rsum > best:
            best = rsum
            save_checkpoint(out, model, tokenizer, tcfg, {**state, "best_epoch": epoch})
        save_checkpoint(out / "last", model, tokenizer, tcfg, state, opt)
        if max_steps is not None and steps >= max_steps:
            break
    wall = time.perf_counter() - t0
    result = {"best_dev_rsum": best, "wall_s": wall, "steps": steps, "history": history}
    (out / "train_log.json").write_text(json.dumps(result, indent=2))
    return result


