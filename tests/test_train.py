"""A short training run on synthetic data learns; resume continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

    res = train(
        data,
        tmp_path / "ck",
        preset="tiny",
        text_encoder="bigru",  # the fast tower: these tests are about the loop, not the tower
        epochs=5,
        progress=False,
        model_overrides=MODEL,
        train_overrides=TRAIN,
    )
    hardest = [h["loss"] for h in res["history"] if h["negatives"] == "hardest"]
    assert hardest[-1] < hardest[0]  # same loss form after the warm-up epoch
    ck = load_checkpoint(tmp_path / "ck")
    test = load_split(data, "test")
    rep = evaluate_split(ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=10)
    n = test.n_images  # a random ranking: R@K = 100 K / N both ways (i2t: 5 of 5N captions)
    chance_rsum = 2 * sum(min(100.0, 100.0 * k / n) for k in (1, 5, 10))
    ex = rep["exhaustive"]
    assert ex["t2i"]["r1"] > 3 * 100.0 / n and ex["i2t"]["r1"] > 3 * 100.0 / n, ex
    assert ex["rsum"] > 2.5 * chance_rsum, ex
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["best_epoch"] == max(range(len(res["history"])), key=lambda e: res["history"][e]["dev_rsum"])


def test_resume_continues_from_the_last_epoch(data: Path, tmp_path: Path) -> None:
    from training.train import train

    train(
        data,
        tmp_path / "ck",
        preset="tiny",
        text_encoder="bigru",
        epochs=1,
        progress=False,
        model_overrides=MODEL,
        train_overrides=TRAIN,
    )
    from mssan_infer.errors import InputError

    with pytest.raises(InputError, match=r"ask for lr=0.1 \(the run has 0.003\).*new --out"):
        train(data, tmp_path / "ck", epochs=2, resume=True, progress=False, train_overrides={"lr": 0.1})
    with pytest.raises(InputError, match=r"embed_size=4 \(the run has 48\)"):
        train(data, tmp_path / "ck", epochs=2, resume=True, progress=False, model_overrides={"embed_size": 4})
    with pytest.raises(InputError, match=r"--text-encoder transformer \(the run has bigru\)"):
        train(data, tmp_path / "ck", epochs=2, resume=True, progress=False, text_encoder="transformer")
    with pytest.raises(InputError, match=r"--set no_such_field: no such field"):
        train(
            data, tmp_path / "ck", epochs=2, resume=True, progress=False, model_overrides={"no_such_field": 1}
        )
    assert json.loads((tmp_path / "ck" / "last" / "state.json").read_text())["epoch"] == 0  # untouched
    # a run saved before the two-stage choice: its best is an exhaustive rSum, which does not compare
    last_state = tmp_path / "ck" / "last" / "state.json"
    old = json.loads(last_state.read_text())
    del old["best_rsum_mode"]
    last_state.write_text(json.dumps({**old, "best_rsum": 600.0}))
    # no flags: the run continues with the recipe saved in last/, not the tiny preset's (batch 128, lr 5e-4)
    kept = {"device": "cpu"}  # where it runs may change
    res = train(data, tmp_path / "ck", epochs=2, resume=True, progress=False, train_overrides=kept)
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    last = json.loads((tmp_path / "ck" / "last" / "state.json").read_text())
    assert last["epoch"] == 1 and len(last["margins"]) == 2
    saved = json.loads((tmp_path / "ck" / "last" / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["lr"], saved["epochs"]) == (64, 3e-3, 2)
    best = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert best["best_epoch"] == 1 and best["best_rsum_mode"] == "twostage@20"  # replaced the old best


def _toy_batch(seed: int) -> dict[str, Any]:
    """A batch of 6 pairs (images 0 and 1 share an image id) for a model with img_dim 20, vocab 40."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "regions": torch.randn(6, 5, 20, generator=g),
        "region_mask": torch.ones(6, 5),
        "tokens": torch.randint(4, 40, (6, 7), generator=g),
        "token_mask": torch.ones(6, 7),
        "img_ids": torch.tensor([0, 0, 1, 2, 3, 4]),
    }


@pytest.mark.parametrize("lams", [(1.0, 1.0, 1.0), (0.5, 0.0, 2.0)])
def test_deep_supervision_adds_each_weighted_levels_own_ranking_loss(
    lams: tuple[float, float, float],
) -> None:
    import torch

    from training.config import ModelConfig
    from training.loss import AdaptiveMarginLoss
    from training.model import MSSAN
    from training.train import EncodeBoth, train_step

    batch = _toy_batch(0)
    losses = {}
    for level_loss in (0.0, 0.7):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=40,
            word_dim=12,
            embed_size=24,
            img_dim=20,
            lam_gg=lams[0],
            lam_gl=lams[1],
            lam_ll=lams[2],
        )
        model, loss_fn = MSSAN(cfg), AdaptiveMarginLoss()
        with torch.no_grad():
            img = model.encode_image(batch["regions"], batch["region_mask"])
            txt = model.encode_text(batch["tokens"], batch["token_mask"])
            fused = loss_fn(model.score(img, txt), batch["img_ids"])[0]
            own = {
                t: loss_fn(getattr(model, f"s_{t}")(img, txt), batch["img_ids"])[0]
                for t in ("gg", "gl", "ll")
            }
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses[level_loss], _ = train_step(
            EncodeBoth(model), model, loss_fn, opt, batch, "hardest", level_loss=level_loss
        )
        weighted = [t for t, lam in zip(("gg", "gl", "ll"), lams) if lam]
        expect = fused + level_loss * sum(own[t] for t in weighted)
        assert losses[level_loss] == pytest.approx(float(expect), rel=1e-5)
    assert losses[0.7] > losses[0.0]


def test_stage1_loss_adds_the_ranking_loss_of_the_stage1_score_alone() -> None:
    import torch

    from training.config import ModelConfig
    from training.loss import AdaptiveMarginLoss
    from training.model import MSSAN
    from training.train import EncodeBoth, train_step

    batch = _toy_batch(1)
    for stage1_loss, level_loss in ((0.0, 0.0), (1.5, 0.0), (1.5, 0.7)):
        torch.manual_seed(0)
        model = MSSAN(
            ModelConfig(vocab_size=40, word_dim=12, embed_size=24, img_dim=20, lam_gg=0.3, lam_gl=0.5)
        )
        loss_fn = AdaptiveMarginLoss()
        with torch.no_grad():
            img = model.encode_image(batch["regions"], batch["region_mask"])
            txt = model.encode_text(batch["tokens"], batch["token_mask"])
            fused = loss_fn(model.score(img, txt), batch["img_ids"])[0]
            levels = sum(loss_fn(s, batch["img_ids"])[0] for s in model.level_scores(img, txt).values())
            stage1 = model.stage1_score(img, txt)  # lam_gg S_gg + lam_gl S_gl
            assert torch.allclose(stage1, 0.3 * model.s_gg(img, txt) + 0.5 * model.s_gl(img, txt), atol=1e-6)
            own = loss_fn(stage1, batch["img_ids"])[0]
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        got, _ = train_step(
            EncodeBoth(model),
            model,
            loss_fn,
            opt,
            batch,
            "hardest",
            level_loss=level_loss,
            stage1_loss=stage1_loss,
        )
        assert got == pytest.approx(float(fused + level_loss * levels + stage1_loss * own), rel=1e-5)
        assert stage1_loss == 0 or float(own) > 0  # the term is there to be added


def test_dev_selected_level_weights_are_saved_with_the_best_model_and_give_its_dev_recall(
    data: Path, tmp_path: Path
) -> None:
    from training.checkpoint import load_checkpoint
    from training.data import load_split
    from training.evaluate import evaluate_split
    from training.train import train

    res = train(
        data,
        tmp_path / "ck",
        preset="tiny",
        text_encoder="bigru",
        epochs=2,
        progress=False,
        model_overrides=MODEL,
        train_overrides={**TRAIN, "level_weights": "dev", "level_loss": 1.0},
    )
    ck = load_checkpoint(tmp_path / "ck")
    best = res["history"][ck.state["best_epoch"]]
    cfg = ck.model.cfg
    assert {"gg": cfg.lam_gg, "gl": cfg.lam_gl, "ll": cfg.lam_ll} == best["level_weights"]
    assert best["dev_rsum"] == max(h["dev_rsum"] for h in res["history"]) == res["best_dev_rsum"]
    last = load_checkpoint(tmp_path / "ck" / "last").model.cfg  # training goes on at 1:1:1
    assert (last.lam_gg, last.lam_gl, last.lam_ll) == (1.0, 1.0, 1.0)
    dev = load_split(data, "dev")
    k = ck.train_config.eval_rerank if ck.train_config else 0  # chosen by two-stage recall at that depth
    assert best["dev_rsum_mode"] == f"twostage@{k}" and 0 < k < dev.n_images
    rep = evaluate_split(ck.model, dev.images, dev.region_mask, dev.captions, ck.tokenizer, rerank=k)
    assert rep[f"twostage@{k}"]["rsum"] == pytest.approx(
        best["dev_rsum"], abs=1.0
    )  # the saved weights give it


# ---- training that says what it did ----------------------------------------------------------------
@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training images = 120 captions: fewer than one batch of the tiny preset (128)."""
    from training.synth import generate

    return generate(
        tmp_path_factory.mktemp("few") / "data", images=24, seed=1, **{**SMALL, "eval_images": 10}
    )


def test_fewer_training_captions_than_a_batch_is_an_error_naming_both_numbers_and_the_flag(
    few: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.__main__ import main

    rc = main(["train", "--data", str(few), "--out", str(tmp_path / "ck"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "120 captions" in err and "--batch-size 128" in err and "--batch-size 120 or less" in err
    assert not (tmp_path / "ck").exists()  # no "best" checkpoint of an untrained model


def test_zero_epochs_is_an_error_before_anything_is_written(
    few: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.__main__ import main

    rc = main(
        ["train", "--data", str(few), "--out", str(tmp_path / "ck"), "--epochs", "0", "--batch-size", "32"]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err == "error: --epochs must be at least 1, got 0: training 0 epochs writes no " + (
        "checkpoint (to evaluate a checkpoint use `python -m training eval`)"
    )
    assert not (tmp_path / "ck").exists()


def test_a_checkpoint_records_its_training_data_and_the_steps_an_epoch_takes(
    few: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.train import train

    with caplog.at_level("INFO", logger="training.train"):
        train(
            few,
            tmp_path / "ck",
            epochs=1,
            max_steps=1,
            text_encoder="bigru",
            progress=False,
            model_overrides=MODEL,
            train_overrides={**TRAIN, "batch_size": 50},
        )
    assert "1 epochs of 2 steps (the last 20 captions of each shuffled epoch are left out" in caplog.text
    for ck in (tmp_path / "ck", tmp_path / "ck" / "last"):
        data = json.loads((ck / "state.json").read_text())["data"]
        assert data["path"] == str(few.resolve()) and data["splits"] == {"train": 24, "dev": 10, "test": 10}
        assert (
            data["feat_dim"] == 32 and data["synth"]["seed"] == 1 and data["synth"]["knobs"]["regions"] == 16
        )


@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_hardest_score_has_the_all_pairs_values_and_gradient(agg: str) -> None:
    import torch

    from training.config import ModelConfig
    from training.loss import AdaptiveMarginLoss
    from training.model import MSSAN
    from training.train import hardest_score

    g = torch.Generator().manual_seed(3)
    b = 16
    region_mask = (torch.rand(b, 6, generator=g) > 0.3).float()
    region_mask[:, 0] = 1
    token_mask = (torch.arange(9) < torch.randint(2, 10, (b, 1), generator=g)).float()
    regions, tokens = torch.randn(b, 6, 20, generator=g), torch.randint(4, 40, (b, 9), generator=g)
    img_ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, *range(4, 13)])
    cfg = ModelConfig(vocab_size=40, word_dim=12, embed_size=24, img_dim=20, agg=agg, lam_gg=0.3, lam_gl=0.5)
    torch.manual_seed(0)
    model = MSSAN(cfg)
    loss_fn = AdaptiveMarginLoss(m0=0.3)
    grads, values = [], []
    for sparse in (False, True):
        model.zero_grad()
        img, txt = model.encode_image(regions, region_mask), model.encode_text(tokens, token_mask)
        scores = hardest_score(model, loss_fn, img, txt, img_ids) if sparse else model.score(img, txt)
        loss, _ = loss_fn(scores, img_ids, "hardest")
        loss.backward()
        values.append(scores.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(values[0], values[1])  # the same scores, bit for bit: the same negatives
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)

    # the entries it rebuilds are all the loss differentiates
    scores = values[0].clone().requires_grad_()
    loss_fn(scores, img_ids, "hardest")[0].backward()
    rows, cols = loss_fn.hardest_entries(values[0], img_ids)
    kept = torch.zeros(b, b, dtype=torch.bool)
    kept[rows, cols] = True
    assert scores.grad is not None and scores.grad[~kept].abs().max() == 0
    assert len(rows) <= 3 * b and kept.diagonal().all()


@pytest.mark.parametrize("lams", [(0.3, 0.5, 1.0), (0.0, 0.5, 1.0)])
def test_a_hardest_negative_step_moves_the_weights_as_the_all_pairs_backward_does(
    lams: tuple[float, float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import training.train as train_module
    from training.config import ModelConfig
    from training.loss import AdaptiveMarginLoss
    from training.model import MSSAN
    from training.train import EncodeBoth, train_step

    batch = _toy_batch(2)
    batch["token_mask"][:, 5:] = 0  # padded words
    after = []
    for all_pairs in (False, True):
        if all_pairs:
            monkeypatch.setattr(
                train_module, "hardest_score", lambda model, _l, img, txt, _i: model.score(img, txt)
            )
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=40, word_dim=12, embed_size=24, img_dim=20, lam_gg=lams[0], lam_gl=lams[1]
        )
        model, loss_fn = MSSAN(cfg), AdaptiveMarginLoss(m0=0.4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        train_step(EncodeBoth(model), model, loss_fn, opt, batch, "hardest", stage1_loss=0.5)
        after.append([p.detach().clone() for p in model.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(after[-1], before))  # the step moved something
    for got, want in zip(*after):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
