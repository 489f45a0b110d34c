"""The subword tokenizer of transformer bundles: ids identical to Hugging Face ``tokenizers`` everywhere.

Runtime (``mssan_infer.text.subword``), the training data path and the Triton repository's tokenizer
file give the same ids as ``tokenizers``' own encoding of the model folder's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mssan_infer.errors import BackendUnavailableError, BundleError, InputError

TRICKY = [
    "A crimson puppy, next to the Ship's bow — naïve café",
    "two  dogs\trun\non the BEACH!!",
    "un-seen-words like zyxwvut and 12345 or 3.14",
    "emoji 🐶 and CJK 狗 and Ελληνικά",
    "",
    " ".join(["a long caption with many words"] * 30),  # > 128 subwords: past the file's own truncation
]


def _reference_ids(tokenizer_json: Path, text: str) -> list[int]:
    """``tokenizers``' own encoding of the model folder's file, special tokens and padding removed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    e = tok.encode(text)
    return [i for i, s, m in zip(e.ids, e.special_tokens_mask, e.attention_mask) if m and not s]


@pytest.mark.slow
def test_minilm_ids_equal_tokenizers_own_encoding(minilm_folder: Path, tmp_path: Path) -> None:
    from mssan_infer.text.subword import SubwordTokenizer
    from training.text_transformer import hf_tokenizer_json

    tok = SubwordTokenizer(hf_tokenizer_json(minilm_folder), max_len=512)
    saved = tmp_path / "tokenizer.json"
    tok.save(saved)
    again = SubwordTokenizer.from_file(saved, max_len=512)
    for text in TRICKY:
        want = _reference_ids(minilm_folder / "tokenizer.json", text)
        assert tok.encode(text) == want == again.encode(text), text
    assert tok.unk_id == 100 and len(tok) == 30522
    assert (
        json.loads(saved.read_text())["padding"] is None
        and json.loads(saved.read_text())["truncation"] is None
    )


def test_truncation_keeps_the_first_max_len_subwords_and_warns(
    tiny_bert_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mssan_infer.text.subword import SubwordTokenizer

    text = (tiny_bert_folder / "tokenizer.json").read_text()
    long_tok, short_tok = SubwordTokenizer(text, max_len=512), SubwordTokenizer(text, max_len=4)
    cap = "a red dog near the blue ball and a green tree"
    with caplog.at_level(logging.WARNING, logger="mssan_infer.text.subword"):
        assert short_tok.encode(cap) == long_tok.encode(cap)[:4]
    assert "truncated to max_len=4" in caplog.text
    tokens, mask = short_tok.encode_batch([cap, "a cat", ""])
    assert tokens.shape == (3, 4) and tokens.dtype == np.int64 and mask.dtype == np.float32
    assert mask.sum(1).tolist() == [4, 2, 0] and not tokens[mask == 0].any()


def test_bad_input_and_bad_files_give_typed_errors(
    tiny_bert_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.text.subword import SubwordTokenizer

    tok = SubwordTokenizer.from_file(tiny_bert_folder / "tokenizer.json")
    with pytest.raises(InputError, match="decode bytes"):
        tok.encode(b"a dog")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="caption 1 must be str"):
        tok.encode_batch(["a dog", 3])  # type: ignore[list-item]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleError, match="tokenizer.json"):
        SubwordTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(BundleError, match="cannot read"):
        SubwordTokenizer.from_file(tmp_path / "missing.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(BackendUnavailableError, match="pip install 'mssan\\[subword\\]'"):
        SubwordTokenizer.from_file(tiny_bert_folder / "tokenizer.json")


def test_runtime_training_and_triton_repository_give_identical_ids(
    tiny_bert_bundle: Path, tiny_bert_checkpoint: Path, tiny_bert_folder: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from export.triton import TritonSettings, write_repository
    from mssan_infer import Retriever
    from training.checkpoint import load_checkpoint
    from training.data import PairDataset, PrecompSplit

    caps = ["a red dog near the blue ball", "The GREEN tree, a car!", "a cat on the beach with a ball"]
    r = Retriever.load(tiny_bert_bundle)
    runtime = r.tokenize(caps)
    ck = load_checkpoint(tiny_bert_checkpoint)
    split = PrecompSplit(np.zeros((1, 2, 24), np.float32), None, caps + caps[:2], name="t")
    ds = PairDataset(split, ck.tokenizer)
    training = [ds.tokens(k) for k in range(3)]
    repo = write_repository(tiny_bert_bundle, TritonSettings(), out=tmp_path / "repo")["triton"]
    spec = json.loads((tmp_path / "repo" / "retriever" / "1" / "tokenizer.json").read_text())
    assert spec["kind"] == "subword" and repo["models"]["retriever"]
    triton_tok = Tokenizer.from_file(
        str(tmp_path / "repo" / "retriever" / "1" / spec["file"])
    )  # the BLS recipe
    triton = [triton_tok.encode(c, add_special_tokens=False).ids[: spec["max_len"]] for c in caps]
    reference = [_reference_ids(tiny_bert_folder / "tokenizer.json", c) for c in caps]
    assert runtime == training == triton == reference
    m = json.loads((tiny_bert_bundle / "manifest.json").read_text())["tokenizer"]
    assert (
        m["kind"] == "subword"
        and m["file"] == "tokenizer.json"
        and m["prefix_ids"] == [2]
        and m["suffix_ids"] == [3]
    )
    assert (
        spec["sha256"] == m["sha256"]
        and spec["prefix_ids"] == m["prefix_ids"]
        and spec["unk_id"] == m["unk_id"]
    )


def test_a_caption_of_unknown_subwords_only_is_refused(tiny_bert_bundle: Path) -> None:
    from mssan_infer import Retriever

    r = Retriever.load(tiny_bert_bundle)
    with pytest.raises(InputError, match="none of its words"):
        r.encode_texts(["🐶 狗"])
    with pytest.raises(InputError, match="no words"):
        r.encode_texts(["   "])
    assert len(r.encode_texts(["a 🐶 dog"])) == 1  # some unknown subwords are fine


def test_a_tampered_tokenizer_file_is_refused(tiny_bert_bundle: Path, tmp_path: Path) -> None:
    from mssan_infer import Retriever

    b = tmp_path / "b"
    shutil.copytree(tiny_bert_bundle, b)
    doc = json.loads((b / "tokenizer.json").read_text())
    doc["normalizer"]["lowercase"] = False
    (b / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="tokenizer.json"):
        Retriever.load(b)
