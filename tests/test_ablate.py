"""``python -m training ablate``: every subset of the levels retrained, fixed-margin and fixed-weight rows,
eval-time rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SMALL = dict(feat_dim=24, eval_images=30, regions=12, max_object_regions=2, max_objects=3, distractors=1)
SETS = ["embed_size=32", "word_dim=16", "batch_size=50", "lr=3e-3"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:  # type: ignore[type-arg]
    from training.__main__ import main
    from training.synth import generate

    root = tmp_path_factory.mktemp("ablate")
    data = generate(root / "data", images=80, seed=2, **SMALL)
    args = [
        "ablate",
        "--data",
        str(data),
        "--out",
        str(root / "runs"),
        "--epochs",
        "1",
        "--rerank",
        "5",
        "--text-encoder",
        "bigru",  # the fast tower (the tiny preset's default is MiniLM)
        "--no-progress",
    ]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    return data, root / "runs", json.loads((root / "runs" / "ablation.json").read_text())


def test_ablation_retrains_seven_subsets_a_fixed_margin_and_scores_each_level_alone(ablation) -> None:  # type: ignore[no-untyped-def]
    _, runs, res = ablation
    names = [r["name"] for r in res["rows"]]
    assert names == [
        "gg",
        "gl",
        "ll",
        "gg+gl",
        "gg+ll",
        "gl+ll",
        "gg+gl+ll",
        "gg+gl+ll fixed margin",
        "gg+gl+ll fixed weights",
        "gg+gl+ll scored with gg only",
        "gg+gl+ll scored with gl only",
        "gg+gl+ll scored with ll only",
    ]
    for r in res["rows"][:7]:
        present = set(r["name"].split("+"))
        # absent levels are weighted 0 in the retrained model; present ones are not
        assert {t for t, w in r["level_weights"].items() if w} == present, r
        assert r["epochs"] == 1 and r["train_s"] > 0 and len(r["epoch_s"]) == 1
        assert r["load_average"] and len(r["load_average"]["start"]) == 3
    for r in res["rows"]:
        for d in ("i2t", "t2i"):
            assert 0 <= r[d]["r1"] <= r[d]["r5"] <= r[d]["r10"] <= 100
        assert r["rsum"] == pytest.approx(sum(r["i2t"].values()) + sum(r["t2i"].values()))
    fixed = json.loads((runs / "gg+gl+ll-fixed-margin" / "config.json").read_text())["train"]
    assert fixed["adaptive"] is False
    full_train = json.loads((runs / "gg+gl+ll" / "config.json").read_text())["train"]
    assert full_train["adaptive"] is True and full_train["level_weights"] == "dev"
    weights = json.loads((runs / "gg+gl+ll-fixed-weights" / "config.json").read_text())
    assert weights["train"]["level_weights"] == "fixed"
    # the lever the row shows: saved at its training weights (1:1:1), not re-weighted on dev
    assert [weights["model"][f"lam_{t}"] for t in ("gg", "gl", "ll")] == [1.0, 1.0, 1.0]
    # the full model is trained first (the row a user waits for), the table keeps its order
    first = min(runs.glob("*/train_log.json"), key=lambda f: f.stat().st_mtime_ns)
    assert first.parent.name == "gg+gl+ll"
    assert set(res["full_model"]) == {"stage1", "twostage@5", "exhaustive"}
    md = (runs / "ablation.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "R@10" in md
    assert res["text_encoder"] == "bigru" and "text tower `bigru`" in md
    assert json.loads((runs / "gg+gl+ll" / "config.json").read_text())["model"]["text_encoder"] == "bigru"


def test_eval_time_rows_equal_the_full_checkpoint_scored_with_one_term(ablation) -> None:  # type: ignore[no-untyped-def]
    import torch

    from training.checkpoint import load_checkpoint
    from training.data import load_split
    from training.evaluate import evaluate_split

    data, runs, res = ablation
    ck = load_checkpoint(runs / "gg+gl+ll")
    test = load_split(data, "test")
    rows = {r["name"]: r for r in res["rows"]}
    with torch.inference_mode():
        for t in ("gg", "ll"):
            rep = evaluate_split(
                ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=0, terms=(t,)
            )["exhaustive"]
            assert rows[f"gg+gl+ll scored with {t} only"]["rsum"] == pytest.approx(rep["rsum"])
        full = evaluate_split(ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=5)
    assert rows["gg+gl+ll"]["rsum"] == pytest.approx(full["exhaustive"]["rsum"])


def test_a_second_ablation_reuses_finished_runs_and_retrains_changed_ones(ablation, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import training.train
    from training.ablate import ablate

    data, runs, first = ablation
    calls: list[str] = []
    real = training.train.train

    def counting(data_dir, out_dir, **kw):  # type: ignore[no-untyped-def]
        calls.append(Path(out_dir).name)
        return real(data_dir, out_dir, **kw)

    monkeypatch.setattr(training.train, "train", counting)
    spec_file = runs / "gl" / "ablate_run.json"
    spec = json.loads(spec_file.read_text())
    spec["epochs"] = 7  # as if gl had been run with other settings
    spec_file.write_text(json.dumps(spec))
    again = ablate(
        data,
        runs,
        epochs=1,
        rerank=5,
        model_overrides=dict(embed_size=32, word_dim=16),
        train_overrides=dict(batch_size=50, lr=3e-3),
        progress=False,
        text_encoder="bigru",
    )
    assert calls == ["gl"]
    same = [r["rsum"] for r in again["rows"] if r["name"] != "gl"]
    assert same == [r["rsum"] for r in first["rows"] if r["name"] != "gl"]
