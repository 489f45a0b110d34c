"""Shared fixtures: small models and checkpoints made by the tests themselves (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest

WORDS = (
    "a the and of on in with near red blue green yellow black white dog cat ball tree car "
    "man woman bird boat house runs sits big small beach street field"
).split()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised small MSSAN saved as a checkpoint folder (vocab of ~30 words)."""
    import torch

    from mssan_infer.tokenizer import Tokenizer, build_vocab
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import MSSAN

    torch.manual_seed(0)
    tok = Tokenizer(build_vocab([" ".join(WORDS)] * 4, threshold=4), max_len=32)
    cfg = ModelConfig(vocab_size=len(tok), word_dim=16, embed_size=32, img_dim=24, max_len=32)
    model = MSSAN(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, tok, state={"epoch": 0})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported to a verified bundle with fp32 and fp16 graphs.

    Shared by the whole session: treat it as read-only (copy it before changing a file).
    """
    from export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny", fp16=True)
