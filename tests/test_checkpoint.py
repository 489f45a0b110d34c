"""Checkpoint folders: round trip, no pickle, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mssan_infer.errors import BundleError
from training.checkpoint import load_checkpoint, save_checkpoint


def _scores(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    reg = torch.randn(3, 5, model.cfg.img_dim, generator=g)
    tok = torch.randint(4, model.cfg.vocab_size, (4, 6), generator=g)
    with torch.inference_mode():
        return model(reg, torch.ones(3, 5), tok, torch.ones(4, 6))


def test_round_trip_gives_identical_scores(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_checkpoint)
    opt = torch.optim.Adam(ck.model.parameters(), lr=1e-3)
    out = save_checkpoint(
        tmp_path / "copy", ck.model, ck.tokenizer, state={"epoch": 3, "margins": [0.3, 0.25]}, optimizer=opt
    )
    back = load_checkpoint(out)
    assert torch.equal(_scores(ck.model), _scores(back.model))
    assert back.state["epoch"] == 3 and back.state["margins"] == [0.3, 0.25]
    assert back.tokenizer.vocab == ck.tokenizer.vocab
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "vocab.json",
    ]


def test_optimizer_state_survives_for_resume(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_checkpoint)
    opt = torch.optim.Adam(ck.model.parameters(), lr=1e-3)
    ck.model.train()
    reg = torch.randn(2, 5, ck.model.cfg.img_dim)
    ck.model(reg, torch.ones(2, 5), torch.tensor([[4, 5]]), torch.ones(1, 2)).sum().backward()
    opt.step()
    out = save_checkpoint(tmp_path / "r", ck.model, ck.tokenizer, optimizer=opt)
    back = load_checkpoint(out)
    assert back.optimizer_state is not None
    opt2 = torch.optim.Adam(back.model.parameters(), lr=1e-3)
    opt2.load_state_dict(back.optimizer_state)
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], opt2.state_dict()["state"][k]["exp_avg"])


def test_missing_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path)


def test_weights_are_safetensors_not_pickle(tiny_checkpoint: Path) -> None:
    head = (tiny_checkpoint / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # neither pickle nor torch zip
