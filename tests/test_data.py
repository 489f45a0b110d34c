"""training.data: precomp loading (memmap, typed errors), batching with masks, Karpathy JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mssan_infer.errors import InputError  # noqa: E402
from mssan_infer.text.words import Tokenizer, build_vocab  # noqa: E402
from training.data import (  # noqa: E402
    PairDataset,
    PrecompSplit,
    collate,
    iterate_captions,
    iterate_images,
    load_split,
    read_karpathy,
    vocab_from_split,
)

WORDS = "a red blue dog ball on the beach and".split()


def _write_split(
    d: Path, split: str, n: int = 4, r: int = 3, dv: int = 5, caps: list[str] | None = None
) -> np.ndarray:
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((n, r, dv)).astype(np.float32)
    np.save(d / f"{split}_ims.npy", ims)
    if caps is None:
        caps = [" ".join(WORDS[: 1 + (k % len(WORDS))]) for k in range(5 * n)]
    (d / f"{split}_caps.txt").write_text("".join(c + "\n" for c in caps), encoding="utf-8")
    return ims


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer(build_vocab([" ".join(WORDS)] * 4), max_len=16)


def test_load_split_round_trips_features_and_captions_through_a_memmap(tmp_path: Path) -> None:
    ims = _write_split(tmp_path, "train", n=4)
    caps = (tmp_path / "train_caps.txt").read_text().splitlines()
    s = load_split(tmp_path, "train")
    assert isinstance(s.images, np.memmap)
    assert np.array_equal(np.asarray(s.images), ims)
    assert s.captions == caps
    assert (s.n_images, s.caps_per_image, s.regions, s.feat_dim) == (4, 5, 3, 5)
    assert s.region_mask is None


def test_load_split_reads_optional_masks_and_utf8_without_final_newline(tmp_path: Path) -> None:
    _write_split(tmp_path, "dev", n=1, caps=["ein Hund", "un chien é", "犬", "x", "y"])
    (tmp_path / "dev_caps.txt").write_bytes("ein Hund\nun chien é\n犬\nx\ny".encode("utf-8"))
    np.save(tmp_path / "dev_masks.npy", np.array([[1, 1, 0]], np.float32))
    s = load_split(tmp_path, "dev")
    assert s.captions == ["ein Hund", "un chien é", "犬", "x", "y"]
    assert s.region_mask is not None and s.region_mask.tolist() == [[1, 1, 0]]


def test_caption_count_mismatch_raises_typed_error(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", n=4, caps=["a dog"] * 19)
    with pytest.raises(InputError, match="19 captions for 4 images"):
        load_split(tmp_path, "train")


def test_missing_files_and_wrong_ndim_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing"):
        load_split(tmp_path, "test")
    _write_split(tmp_path, "test", n=2)
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(InputError, match=r"\[N, R, Dv\]"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="pickle"):
        load_split(tmp_path, "test")


def test_wrong_mask_shape_raises_typed_error(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", n=2, r=3)
    np.save(tmp_path / "train_masks.npy", np.ones((2, 4), np.float32))
    with pytest.raises(InputError, match="region mask"):
        load_split(tmp_path, "train")


def test_pair_dataset_maps_caption_k_to_image_k_div_5(tmp_path: Path, tok: Tokenizer) -> None:
    ims = _write_split(tmp_path, "train", n=3)
    s = load_split(tmp_path, "train")
    ds = PairDataset(s, tok)
    assert len(ds) == 15
    regions, mask, ids, img, cap = ds[12]
    assert (img, cap) == (2, 12)
    assert regions.dtype == np.float32 and np.array_equal(regions, ims[2])
    assert mask.tolist() == [1.0, 1.0, 1.0]
    assert ids == tok.encode(s.captions[12])
    with pytest.raises(IndexError):
        ds[15]


def test_collate_pads_to_longest_and_masks_padding(tok: Tokenizer) -> None:
    r = np.ones((2, 4), np.float32)
    items = [
        (r, np.array([1, 0], np.float32), [5, 6, 7], 0, 1),
        (r * 2, np.array([1, 1], np.float32), [8], 3, 17),
    ]
    b = collate(items)
    assert b["regions"].shape == (2, 2, 4) and b["regions"].dtype == torch.float32
    assert b["region_mask"].tolist() == [[1, 0], [1, 1]]
    assert b["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]] and b["tokens"].dtype == torch.int64
    assert b["token_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and b["token_mask"].dtype == torch.float32
    assert b["img_ids"].tolist() == [0, 3] and b["cap_ids"].tolist() == [1, 17]


def test_collate_of_empty_captions_keeps_one_masked_position() -> None:
    r = np.ones((2, 4), np.float32)
    b = collate([(r, np.ones(2, np.float32), [], 0, 0)])
    assert b["tokens"].shape == (1, 1) and b["token_mask"].tolist() == [[0.0]]


def test_iterators_cover_every_item_in_order(tmp_path: Path, tok: Tokenizer) -> None:
    ims = _write_split(tmp_path, "test", n=5)
    np.save(tmp_path / "test_masks.npy", np.tile(np.array([[1, 1, 0]], np.float32), (5, 1)))
    s = load_split(tmp_path, "test")
    got = list(iterate_images(s, 2))
    assert [g[0].shape[0] for g in got] == [2, 2, 1]
    assert np.array_equal(torch.cat([g[0] for g in got]).numpy(), ims)
    assert torch.cat([g[1] for g in got]).tolist() == [[1, 1, 0]] * 5
    caps = list(iterate_captions(s, tok, 10))
    assert [c[0].shape[0] for c in caps] == [10, 10, 5]
    tokens, mask = tok.encode_batch(s.captions[10:20])
    assert np.array_equal(caps[1][0].numpy(), tokens) and np.array_equal(caps[1][1].numpy(), mask)
    with pytest.raises(InputError):
        next(iterate_images(s, 0))


def test_in_memory_split_is_validated_like_a_loaded_one() -> None:
    with pytest.raises(InputError, match="expected exactly 5 per image"):
        PrecompSplit(np.zeros((2, 3, 4), np.float32), None, ["a"] * 9)
    with pytest.raises(InputError, match="floating"):
        PrecompSplit(np.zeros((1, 3, 4), np.int64), None, ["a"] * 5)


def test_vocab_from_split_counts_training_captions(tok: Tokenizer) -> None:
    caps = ["a red dog", "a red dog", "a red ball", "a red cat", "a dog"]
    s = PrecompSplit(np.zeros((1, 2, 3), np.float32), None, caps)
    v = vocab_from_split(s, threshold=3)
    assert list(v)[:6] == ["<pad>", "<start>", "<end>", "<unk>", "a", "red"]
    assert "dog" in vocab_from_split(s, threshold=3) and "ball" not in v


def test_read_karpathy_groups_images_by_split(tmp_path: Path) -> None:
    doc = {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": "1.jpg",
                "imgid": 0,
                "split": "train",
                "sentences": [
                    {"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]},
                    {"raw": "A brown dog."},
                ],
            },
            {
                "filename": "2.jpg",
                "filepath": "val2014",
                "imgid": 1,
                "split": "restval",
                "sentences": [{"raw": "Two cats."}],
            },
            {"filename": "3.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A bird."}]},
        ],
    }
    p = tmp_path / "dataset_flickr8k.json"
    p.write_text(json.dumps(doc))
    out = read_karpathy(p)
    assert set(out) == {"train", "val", "test", "restval"}
    assert out["val"] == []
    assert out["train"][0].captions == ["A dog runs.", "A brown dog."]
    assert out["train"][0].filepath == "" and out["restval"][0].filepath == "val2014"
    assert (out["test"][0].filename, out["test"][0].imgid) == ("3.jpg", 2)


def test_read_karpathy_rejects_other_json_with_typed_error(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"images": [{"filename": "1.jpg"}]}))
    with pytest.raises(InputError, match="Karpathy"):
        read_karpathy(p)
    p.write_text("{not json")
    with pytest.raises(InputError):
        read_karpathy(p)
    with pytest.raises(InputError, match="not found"):
        read_karpathy(tmp_path / "missing.json")
