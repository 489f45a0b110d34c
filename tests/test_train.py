"""A short training run on synthetic data learns; resume continues where it stopped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


SMALL = dict(feat_dim=32, eval_images=50, regions=16, max_object_regions=3)
MODEL = {"embed_size": 48, "word_dim": 24}
TRAIN = {"batch_size": 64, "lr": 3e-3, "warmup_all_epochs": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synth import generate

    return generate(tmp_path_factory.mktemp("train") / "data", images=150, seed=1, **SMALL)


def test_short_training_lowers_the_loss_and_beats_chance_by_a_wide_margin(data: Path, tmp_path: Path) -> None:
    from training.checkpoint import load_checkpoint
    from training.data import load_split
    from training.evaluate import evaluate_split
    from training.train import train

    res = train(data, tmp_path / "ck", preset="tiny", epochs=5, progress=False,
                model_overrides=MODEL, train_overrides=TRAIN)
    hardest = [h["loss"] for h in res["history"] if h["negatives"] == "hardest"]
    assert hardest[-1] < hardest[0]                          # same loss form after the warm-up epoch
    ck = load_checkpoint(tmp_path / "ck")
    test = load_split(data, "test")
    rep = evaluate_split(ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=10)
    n = test.n_images                  # a random ranking: R@K = 100 K / N both ways (i2t: 5 of 5N captions)
    chance_rsum = 2 * sum(min(100.0, 100.0 * k / n) for k in (1, 5, 10))
    ex = rep["exhaustive"]
    assert ex["t2i"]["r1"] > 3 * 100.0 / n and ex["i2t"]["r1"] > 3 * 100.0 / n, ex
    assert ex["rsum"] > 2.5 * chance_rsum, ex
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["best_epoch"] == max(range(len(res["history"])), key=lambda e: res["history"][e]["dev_rsum"])


def test_resume_continues_from_the_last_epoch(data: Path, tmp_path: Path) -> None:
    from training.train import train

    train(data, tmp_path / "ck", preset="tiny", epochs=1, progress=False, model_overrides=MODEL, train_overrides=TRAIN)
    res = train(data, tmp_path / "ck", preset="tiny", epochs=2, resume=True, progress=False,
                model_overrides=MODEL, train_overrides=TRAIN)
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    last = json.loads((tmp_path / "ck" / "last" / "state.json").read_text())
    assert last["epoch"] == 1 and len(last["margins"]) == 2
