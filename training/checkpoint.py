"""Checkpoint folders: ``config.json``, ``model.safetensors``, ``state.json``, and the tokenizer:
``vocab.json`` (Bi-GRU tower) or ``tokenizer.json`` (transformer tower, ``mssan_infer.text.subword``).

No pickle: weights and optimizer tensors go through safetensors, everything
else through JSON. Each file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mssan_infer.errors import BundleError
from mssan_infer.text.base import TextTokenizer
from mssan_infer.text.subword import FILE as SUBWORD_FILE
from mssan_infer.text.subword import SubwordTokenizer
from mssan_infer.text.words import Tokenizer

from .config import ModelConfig, TrainConfig
from .model import MSSAN

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_model", "tokenizer_file"]

CONFIG, WEIGHTS, STATE, VOCAB, OPTIM = (
    "config.json",
    "model.safetensors",
    "state.json",
    "vocab.json",
    "optimizer.safetensors",
)


def tokenizer_file(cfg: ModelConfig) -> str:
    """The checkpoint's tokenizer file for the model's text tower."""
    return SUBWORD_FILE if cfg.text_encoder == "transformer" else VOCAB


@dataclass
class Checkpoint:
    model: MSSAN
    tokenizer: TextTokenizer
    train_config: TrainConfig | None
    state: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None


def _optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        scalars["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars["state"][str(pid)][k] = v
    return tensors, scalars


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in scalars["state"].items():
        state[int(pid)] = dict(st)
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": scalars["param_groups"]}


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MSSAN,
    tokenizer: TextTokenizer,
    train_config: TrainConfig | None = None,
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write (or overwrite) the checkpoint files in folder ``path``; other files there are kept."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"model": model.cfg.to_dict()}
    if train_config is not None:
        cfg["train"] = train_config.to_dict()
    st = dict(state or {})
    # Each file is written beside its target and renamed into place; state.json,
    # which says what the folder holds, goes last.
    _atomic(
        out / WEIGHTS,
        lambda p: save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(p)
        ),
    )
    if optimizer is not None:
        tensors, scalars = _optimizer_to_flat(optimizer.state_dict())
        _atomic(out / OPTIM, lambda p: save_file(tensors, str(p)))
        st["optimizer"] = scalars
    _atomic(out / tokenizer_file(model.cfg), tokenizer.save)
    _atomic(out / CONFIG, lambda p: p.write_text(json.dumps(cfg, indent=2)))
    _atomic(out / STATE, lambda p: p.write_text(json.dumps(st, indent=2)))
    return out


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model (eval mode), tokenizer, train config and state of a checkpoint folder."""
    p = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (p / name).is_file():
            raise BundleError(
                f"{p} is not a checkpoint folder: {name} is missing "
                "(a checkpoint holds config.json, model.safetensors, state.json, vocab.json or "
                "tokenizer.json)"
            )
    try:
        cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
        mcfg = ModelConfig.from_dict(cfg["model"])
        tcfg = TrainConfig.from_dict(cfg["train"]) if "train" in cfg else None
        state = json.loads((p / STATE).read_text(encoding="utf-8")) if (p / STATE).is_file() else {}
        if not isinstance(state, dict):
            raise TypeError(f"{STATE} must hold a JSON object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(
            f"checkpoint {p} is damaged: cannot read {CONFIG}/{STATE} ({e!r}); "
            "use another checkpoint or train again"
        ) from e
    tok_name = tokenizer_file(mcfg)
    if not (p / tok_name).is_file():
        raise BundleError(
            f"{p} is not a complete checkpoint: {tok_name} (the {mcfg.text_encoder} tower's tokenizer) "
            "is missing"
        )
    tok: TextTokenizer = (
        SubwordTokenizer.from_file(p / tok_name, max_len=mcfg.max_len)
        if tok_name == SUBWORD_FILE
        else Tokenizer.from_file(p / tok_name, max_len=mcfg.max_len)
    )
    if len(tok) > mcfg.vocab_size:
        raise BundleError(
            f"checkpoint {p}: {tok_name} has {len(tok)} tokens but the model was built for vocab_size="
            f"{mcfg.vocab_size}; the files come from different runs. Copy the whole checkpoint folder again"
        )
    model = MSSAN(mcfg)
    try:
        weights = load_file(str(p / WEIGHTS), device=map_location)
        model.load_state_dict(weights, strict=True)
    except Exception as e:  # safetensors/torch raise several types
        raise BundleError(f"cannot load weights from {p / WEIGHTS}: {e}") from e
    model.eval()
    opt_state = None
    if "optimizer" in state:
        tensors = load_file(str(p / OPTIM), device=map_location) if (p / OPTIM).is_file() else {}
        opt_state = _optimizer_from_flat(tensors, state.pop("optimizer"))
    return Checkpoint(model, tok, tcfg, state, opt_state)


def load_model(path: str | os.PathLike[str]) -> tuple[MSSAN, TextTokenizer]:
    """The model (eval mode) and tokenizer of a checkpoint folder."""
    ck = load_checkpoint(path)
    return ck.model, ck.tokenizer
