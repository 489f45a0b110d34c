"""training.synth: seeded, precomp-layout synthetic data that needs local (bound) alignment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mssan_infer.errors import InputError  # noqa: E402
from mssan_infer.text.words import tokenize  # noqa: E402
from training import synth  # noqa: E402
from training.data import load_split  # noqa: E402

SMALL = dict(feat_dim=32, regions=24)


def test_generate_writes_precomp_splits_that_load_split_reads(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "s", images=40, seed=3, eval_images=10, **SMALL)
    for split, n in (("train", 40), ("dev", 10), ("test", 10)):
        s = load_split(out, split)
        assert isinstance(s.images, np.memmap) and s.images.dtype == np.float32
        assert (s.n_images, s.regions, s.feat_dim, len(s.captions)) == (n, 24, 32, 5 * n)
        assert s.region_mask is None
        assert np.isfinite(np.asarray(s.images)).all()
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_meta_json_records_seed_sizes_and_every_knob(tmp_path: Path) -> None:
    out = synth.generate(tmp_path, images=30, seed=7, noise=0.5, eval_images=6, **SMALL)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["images"] == 30
    assert meta["splits"] == {"train": 30, "dev": 6, "test": 6}
    assert set(meta["knobs"]) == set(synth.SYNTH_KNOBS)
    assert meta["knobs"]["noise"] == 0.5 and meta["knobs"]["feat_dim"] == 32
    assert meta["knobs"]["objects"] == synth.SYNTH_KNOBS["objects"][0]
    assert meta["words"]["objects"][0][0] == "dog"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", images=20, seed=1, eval_images=5, **SMALL)
    b = synth.generate(tmp_path / "b", images=20, seed=1, eval_images=5, **SMALL)
    c = synth.generate(tmp_path / "c", images=20, seed=2, eval_images=5, **SMALL)
    for name in ("train_ims.npy", "train_caps.txt", "test_ims.npy", "test_caps.txt", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train_ims.npy").read_bytes() != (c / "train_ims.npy").read_bytes()
    assert (a / "train_caps.txt").read_bytes() != (c / "train_caps.txt").read_bytes()


def test_generate_split_in_memory_equals_the_written_split(tmp_path: Path) -> None:
    out = synth.generate(tmp_path, images=20, seed=5, eval_images=600, **SMALL)  # > one chunk
    ims, caps = synth.generate_split(600, seed=5, split="test", **SMALL)
    s = load_split(out, "test")
    assert np.array_equal(ims, np.asarray(s.images)) and caps == s.captions
    train_ims, _ = synth.generate_split(20, seed=5, split="train", **SMALL)
    assert not np.array_equal(train_ims[:5], ims[:5])  # splits draw different images


def test_twins_have_the_same_mean_pooled_features_but_different_regions() -> None:
    # twin_prob=1: images (0,1), (2,3)... are twins: same objects, attributes rotated.
    ims, caps = synth.generate_split(8, seed=0, split="x", twin_prob=1.0, noise=0.0, **SMALL)
    for a in range(0, 8, 2):
        x, y = ims[a].astype(np.float64), ims[a + 1].astype(np.float64)
        assert np.abs(x.mean(0) - y.mean(0)).max() < 1e-5
        # every object region of x has no exact counterpart in y
        dist = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1).min(1)  # [R]
        assert (dist > 0.3).sum() >= 4


def test_twins_differ_only_by_binding_in_their_captions_words() -> None:
    _, caps = synth.generate_split(40, seed=1, split="x", twin_prob=1.0, synonyms=1, attr_prob=1.0, **SMALL)
    colours = {w[0] for w in synth._ATTRIBUTES}
    for a in range(0, 40, 2):
        words_a = {w for c in caps[5 * a : 5 * a + 5] for w in tokenize(c)}
        words_b = {w for c in caps[5 * a + 5 : 5 * a + 10] for w in tokenize(c)}
        nouns_a, nouns_b = words_a - colours, words_b - colours
        # both images are captioned from the same objects and colours
        assert nouns_a & nouns_b and words_a & words_b & colours


def test_with_noise_twins_are_closer_in_mean_than_in_regions() -> None:
    ims, _ = synth.generate_split(20, seed=2, split="x", twin_prob=1.0, **SMALL)
    mean_gap = [np.linalg.norm(ims[a].mean(0) - ims[a + 1].mean(0)) for a in range(0, 20, 2)]
    other_gap = [np.linalg.norm(ims[a].mean(0) - ims[a + 2].mean(0)) for a in range(0, 18, 2)]
    assert np.mean(mean_gap) < 0.5 * np.mean(other_gap)


def test_default_test_split_has_hard_negative_twins_and_partial_captions() -> None:
    n = synth.eval_split_size(2000)
    assert n >= 200
    _, caps = synth.generate_split(n, seed=0, split="test", feat_dim=8)
    twins = synth.split_twins(n, seed=0, split="test", feat_dim=8)
    assert (twins >= 0).sum() >= 0.15 * n
    assert all(twins[i] == i - 1 for i in np.flatnonzero(twins >= 0))
    n_and = sum(
        " and " in c or " next to " in c or " near " in c or " beside " in c or " with " in c for c in caps
    )
    assert 0.2 * len(caps) < n_and < 0.9 * len(caps)  # some captions name one object only


def test_generation_is_vectorised_enough_for_big_galleries() -> None:
    import time

    t = time.perf_counter()
    ims, caps = synth.generate_split(5000, seed=0, split="bench", feat_dim=64)
    assert ims.shape == (5000, 36, 64) and len(caps) == 25000
    assert time.perf_counter() - t < 10.0


def test_bad_knobs_raise_typed_errors() -> None:
    with pytest.raises(InputError, match="unknown synth knobs"):
        synth.generate_split(2, colour_count=3)
    with pytest.raises(InputError, match="background region"):
        synth.generate_split(2, regions=10)
    with pytest.raises(InputError):
        synth.generate_split(0)


def test_knob_table_has_typed_defaults_and_help() -> None:
    for name, (default, help_) in synth.SYNTH_KNOBS.items():
        assert isinstance(default, (int, float)) and not isinstance(default, bool), name
        assert help_ and isinstance(help_, str)
    assert synth.resolve_knobs({}) == {k: v[0] for k, v in synth.SYNTH_KNOBS.items()}


def test_stuff_scene_is_ambiguous_in_one_region_but_clear_in_the_mean() -> None:
    import random

    k = synth.resolve_knobs(dict(stuff=6, scene_stuff=3, scene_scale=0.0, noise=0.0, feat_dim=32))
    world = synth.World(0, k)
    mix = np.full((k["scenes"], k["stuff"]), 1e-9)
    for s, (kinds, weights) in enumerate(world.scene_mix):
        mix[s, kinds] = weights
    lays = world.layouts(400, random.Random(0))
    feats = world.render(lays, np.random.default_rng(0))
    stuff_protos = world.table[k["objects"] + 1 :]  # [St, Dv]
    per_region, pooled = [], []
    for lay, f in zip(lays, feats):
        sims = f @ stuff_protos.T  # [R, St]
        seen = sims.argmax(1)[np.isclose(sims.max(1), 1.0, atol=1e-4)]  # the stuff regions
        assert sorted(seen.tolist()) == sorted(lay.stuff)
        per_region.append((np.log(mix[:, seen]).argmax(0) == lay.scene).mean())
        pooled.append(np.log(mix[:, seen]).sum(1).argmax() == lay.scene)
    assert np.mean(per_region) < 0.5 and np.mean(pooled) > 0.95, (np.mean(per_region), np.mean(pooled))


def test_salience_names_big_objects_more_often_than_small_ones() -> None:
    import random

    k = synth.resolve_knobs(
        dict(
            salience=2.0,
            synonyms=1,
            min_object_regions=1,
            max_object_regions=5,
            max_objects=3,
            min_objects=3,
            max_mentions=1,
            **SMALL,
        )
    )
    world = synth.World(0, k)
    rnd = random.Random(0)
    named = {m: [0, 0] for m in range(1, 6)}  # size -> [named, seen]
    for lay in world.layouts(600, rnd):
        words = set(tokenize(world.caption(lay, rnd)))
        for o, m in zip(lay.objs, lay.m):
            named[m][0] += world.objects[o][0] in words
            named[m][1] += 1
    rate = [named[m][0] / named[m][1] for m in range(1, 6)]
    assert rate == sorted(rate) and rate[-1] > 3 * rate[0], rate
    off = synth.World(0, synth.resolve_knobs(dict(**SMALL)))
    assert all(
        len(set(lay.m)) == 1 for lay in off.layouts(50, random.Random(0))
    )  # knob off: one size per image
