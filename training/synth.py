"""Seeded synthetic image-text data in the precomp layout (DESIGN §4).

A *world* (fixed by the seed and the world knobs) has object, attribute and
scene concepts, each with a unit-norm region prototype and one or more words.
An image is a noisy set of regions:

- each of its 2-4 objects covers ``m`` regions (the same ``m`` for every object
  of the image), each ``object prototype + attr_scale * attribute prototype + noise``;
- a few unnamed distractor objects (one region each, with an attribute);
- the rest are background regions (noise only);
- every region also carries ``scene_scale * scene prototype``: the setting is a weak,
  spread-out signal that pooling over all regions recovers best (global alignment's job).

Region order is shuffled.

Attributes are *bound* to objects only inside a region: an image of "a red dog
and a blue ball" and one of "a blue dog and a red ball" have the same mean of
regions (exactly, without noise), so global pooling cannot tell them apart,
while matching each word in context against each region can. Such twins (same
objects, scene and distractors, attributes rotated) are generated on purpose
(``twin_prob``) and are the hard negatives of every split.

Each image has five templated captions; each names a random subset of its
objects (with or without their attribute, through synonyms), sometimes the
scene, never the distractors.

Generation is vectorised per chunk of images and seeded per chunk, so a split
is the same bytes however it is written (in memory or memory-mapped to disk).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mssan_infer.errors import InputError

__all__ = [
    "SYNTH_KNOBS",
    "FORMAT_VERSION",
    "generate",
    "generate_split",
    "eval_split_size",
    "split_twins",
    "resolve_knobs",
    "World",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 512  # images per vectorised (and separately seeded) chunk

# name -> (default, help). Every knob is an int or a float (so a CLI can derive its flags).
SYNTH_KNOBS: dict[str, tuple[int | float, str]] = {
    "regions": (36, "regions per image (R)"),
    "feat_dim": (256, "region feature size Dv (BUTD features have 2048; 256 keeps CPU training cheap)"),
    "eval_images": (0, "images in dev and in test each; 0 = max(200, images // 10)"),
    "objects": (40, "object concepts"),
    "attributes": (12, "attribute (colour) concepts, bound to objects"),
    "scenes": (10, "scene concepts (a global component of every region, optional caption phrase)"),
    "synonyms": (2, "at most this many words per concept (1 = no synonyms)"),
    "min_objects": (2, "fewest objects per image"),
    "max_objects": (4, "most objects per image"),
    "min_object_regions": (2, "fewest regions an object covers"),
    "max_object_regions": (5, "most regions an object covers"),
    "distractors": (2, "unnamed objects per image (one region each, with an attribute)"),
    "attr_scale": (0.7, "norm of the attribute part of an object's region (object prototype: 1)"),
    "scene_scale": (
        0.4,
        "norm of the scene part added to EVERY region: weak in one region, clear in "
        "the mean (a global signal)",
    ),
    "noise": (0.8, "norm of the Gaussian noise added to every region"),
    "twin_prob": (
        0.35,
        "chance an image is a twin of the previous one: same objects, scene and "
        "distractors, attributes rotated among its objects",
    ),
    "max_mentions": (3, "most objects one caption names (each names a random non-empty subset)"),
    "attr_prob": (0.85, "chance a named object is named with its attribute"),
    "scene_prob": (0.5, "chance a caption names the scene"),
    "holdout_synonym": (
        0,
        "1: hold each concept's last synonym out of the train and dev captions and name the "
        "concept only by it in the test captions (unseen words); 2: the same train and dev "
        "captions, test captions with the seen words (the control of 1); 0: off",
    ),
    "stuff": (
        0,
        "stuff concepts (sand, sky, grass...); 0 = none. With stuff, every background region "
        "shows one, drawn from its scene's mix: a region fits several scenes, the mix names one",
    ),
    "scene_stuff": (3, "stuff concepts in each scene's mix (with stuff > 0)"),
    "salience": (
        0.0,
        "0: an image's objects share one size and captions name them uniformly; > 0: each "
        "object has its own size (regions) and captions name it with weight size**salience",
    ),
}

_OBJECTS = [
    ("dog", "puppy", "hound"),
    ("cat", "kitten"),
    ("ball",),
    ("car", "automobile"),
    ("bird", "sparrow"),
    ("boat", "ship"),
    ("house", "cottage"),
    ("tree",),
    ("horse", "pony"),
    ("bicycle", "bike"),
    ("bus",),
    ("truck", "lorry"),
    ("chair", "seat"),
    ("table", "desk"),
    ("cup", "mug"),
    ("bottle",),
    ("umbrella", "parasol"),
    ("kite",),
    ("airplane", "plane"),
    ("train",),
    ("bench",),
    ("lamp",),
    ("clock",),
    ("book",),
    ("phone", "cellphone"),
    ("backpack", "bag"),
    ("hat", "cap"),
    ("shirt", "tshirt"),
    ("shoe", "sneaker"),
    ("flower", "blossom"),
    ("fence",),
    ("door",),
    ("window",),
    ("sign", "signboard"),
    ("vase",),
    ("pillow", "cushion"),
    ("sheep", "lamb"),
    ("cow",),
    ("bear",),
    ("elephant",),
]
_ATTRIBUTES = [
    ("red", "crimson"),
    ("blue", "azure"),
    ("green", "emerald"),
    ("yellow", "golden"),
    ("black", "dark"),
    ("white", "pale"),
    ("orange",),
    ("purple", "violet"),
    ("pink",),
    ("brown",),
    ("gray", "grey"),
    ("silver",),
]
_SCENES = [
    ("on the beach", "at the beach"),
    ("in a park", "in the park"),
    ("on a street", "on the road"),
    ("in a kitchen",),
    ("in a field", "on a meadow"),
    ("in a bedroom",),
    ("in the snow",),
    ("at the lake", "by the water"),
    ("in an office",),
    ("in a garden",),
]
_TEMPLATES = (
    "{}{}",
    "a photo of {}{}",
    "there is {}{}",
    "an image showing {}{}",
    "{}{} in this picture",
    "a picture of {}{}",
    "we can see {}{}",
)
_RELATIONS = ("next to", "near", "beside", "with")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "du", "fa", "go", "pe", "si")


def _pseudo_word(i: int, prefix: str) -> str:
    """A pronounceable made-up word for concepts beyond the built-in lists."""
    s = prefix
    i += 1
    while i:
        i, r = divmod(i, len(_SYLLABLES))
        s += _SYLLABLES[r]
    return s


def _surfaces(
    builtin: Sequence[tuple[str, ...]], n: int, synonyms: int, prefix: str
) -> list[tuple[str, ...]]:
    out = []
    for i in range(n):
        forms = builtin[i] if i < len(builtin) else (_pseudo_word(i, prefix),)
        out.append(tuple(forms[:synonyms]))
    return out


def resolve_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, types coerced and the combination checked.

    Raises:
        InputError: an unknown knob or an impossible combination.
    """
    unknown = set(knobs) - set(SYNTH_KNOBS)
    if unknown:
        raise InputError(f"unknown synth knobs {sorted(unknown)}; known: {sorted(SYNTH_KNOBS)}")
    k: dict[str, Any] = {}
    for name, (default, _) in SYNTH_KNOBS.items():
        v = knobs.get(name, default)
        if v is None:
            v = default
        k[name] = int(v) if isinstance(default, int) else float(v)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise InputError(f"synth knobs: {msg} (got {k})")

    for name in (
        "regions",
        "feat_dim",
        "objects",
        "attributes",
        "scenes",
        "synonyms",
        "min_objects",
        "min_object_regions",
        "max_mentions",
    ):
        need(k[name] >= 1, f"{name} must be >= 1")
    need(k["eval_images"] >= 0, "eval_images must be >= 0")
    need(k["distractors"] >= 0, "distractors must be >= 0")
    need(k["min_objects"] <= k["max_objects"], "min_objects must be <= max_objects")
    need(
        k["min_object_regions"] <= k["max_object_regions"], "min_object_regions must be <= max_object_regions"
    )
    need(
        k["max_objects"] * k["max_object_regions"] + k["distractors"] < k["regions"],
        "max_objects * max_object_regions + distractors must leave at least one background region",
    )
    need(
        k["attributes"] >= k["max_objects"],
        "attributes must be >= max_objects (an image's objects differ in attribute)",
    )
    need(k["objects"] >= k["max_objects"] + k["distractors"], "objects must be >= max_objects + distractors")
    need(k["stuff"] >= 0 and k["salience"] >= 0, "stuff and salience must be >= 0")
    need(k["stuff"] == 0 or 1 <= k["scene_stuff"] <= k["stuff"], "scene_stuff must be in [1, stuff]")
    for name in ("twin_prob", "attr_prob", "scene_prob"):
        need(0.0 <= k[name] <= 1.0, f"{name} must be in [0, 1]")
    need(k["holdout_synonym"] in (0, 1, 2), "holdout_synonym must be 0, 1 or 2")
    need(
        k["attr_scale"] >= 0 and k["noise"] >= 0 and k["scene_scale"] >= 0,
        "attr_scale, scene_scale and noise must be >= 0",
    )
    return k


def eval_split_size(images: int, eval_images: int = 0) -> int:
    """Images in dev and in test: ``eval_images``, or ``max(200, images // 10)`` when it is 0."""
    return int(eval_images) if eval_images > 0 else max(200, images // 10)


@dataclass
class _Layout:
    objs: tuple[int, ...]  # object concepts
    attrs: tuple[int, ...]  # attribute of each object
    m: tuple[int, ...]  # regions of each object
    scene: int
    distractors: tuple[tuple[int, int], ...]  # (object, attribute)
    twin_of: int  # index of the image this is a twin of, -1 if none
    stuff: tuple[int, ...] = ()  # stuff concept of each background region (knob stuff > 0)


class World:
    """Concept prototypes and words, fixed by the seed and the world knobs."""

    def __init__(self, seed: int, k: dict[str, Any]) -> None:
        self.k = k
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
        dv = k["feat_dim"]

        def protos(n: int) -> np.ndarray:
            x = rng.standard_normal((n, dv))
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

        obj, attr, scene = protos(k["objects"]), protos(k["attributes"]), protos(k["scenes"])
        # Drawn after the others, so a world without stuff is the same as before the knob existed.
        stuff = protos(k["stuff"]) if k["stuff"] else np.zeros((0, dv), np.float32)
        # each scene's stuff mix: scene_stuff distinct concepts with Dirichlet(1) proportions
        self.scene_mix: list[tuple[list[int], list[float]]] = (
            [
                (
                    rng.choice(k["stuff"], k["scene_stuff"], replace=False).tolist(),
                    rng.dirichlet(np.ones(k["scene_stuff"])).tolist(),
                )
                for _ in range(k["scenes"])
            ]
            if k["stuff"]
            else []
        )
        # Region = table[base] + attr_table[attr] + scene_table[scene]: bases are objects, one
        # zero row (background), then stuff; the last attribute row is zero (no attribute).
        self.table = np.concatenate([obj, np.zeros((1, dv), np.float32), stuff])  # [O+1+St, Dv]
        self.scene_table = scene * np.float32(k["scene_scale"])  # [S, Dv]
        self.attr_table = np.concatenate(
            [attr * np.float32(k["attr_scale"]), np.zeros((1, dv), np.float32)]
        )  # [A+1, Dv]
        self.no_attr = k["attributes"]
        self.objects = _surfaces(_OBJECTS, k["objects"], k["synonyms"], "ob")
        self.attributes = _surfaces(_ATTRIBUTES, k["attributes"], k["synonyms"], "at")
        self.scenes = _surfaces(_SCENES, k["scenes"], k["synonyms"], "in ")

    # ---- layouts and captions (plain Python, one stream per split) --------
    def layouts(self, n: int, rnd: random.Random) -> list[_Layout]:
        k = self.k
        out: list[_Layout] = []
        for i in range(n):
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.twin_of < 0
                and len(prev.objs) >= 2
                and rnd.random() < k["twin_prob"]
            ):
                attrs = prev.attrs[1:] + prev.attrs[:1]  # rotate: every object changes attribute
                out.append(_Layout(prev.objs, attrs, prev.m, prev.scene, prev.distractors, i - 1, prev.stuff))
                continue
            nobj = rnd.randint(k["min_objects"], k["max_objects"])
            picked = rnd.sample(range(k["objects"]), nobj + k["distractors"])
            objs, dis = tuple(picked[:nobj]), picked[nobj:]
            attrs = tuple(rnd.sample(range(k["attributes"]), nobj))
            lo, hi = k["min_object_regions"], k["max_object_regions"]
            m = (
                tuple(rnd.randint(lo, hi) for _ in objs)
                if k["salience"] > 0
                else (rnd.randint(lo, hi),) * nobj
            )
            scene = rnd.randrange(k["scenes"])
            dis_attr = tuple((o, rnd.randrange(k["attributes"])) for o in dis)
            stuff: tuple[int, ...] = ()
            if k["stuff"]:
                kinds, weights = self.scene_mix[scene]
                stuff = tuple(rnd.choices(kinds, weights, k=k["regions"] - sum(m) - len(dis)))
            out.append(_Layout(objs, attrs, m, scene, dis_attr, -1, stuff))
        return out

    def caption(self, lay: _Layout, rnd: random.Random, unseen: bool = False) -> str:
        """One caption of ``lay``. With the ``holdout_synonym`` knob, words are drawn from each
        concept's seen synonyms; ``unseen`` then swaps each for the concept's held-out synonym
        (same random draws, so the seen and unseen captions of a split differ only in words)."""
        k = self.k
        hold = k["holdout_synonym"] > 0

        def word(forms: tuple[str, ...]) -> str:
            if not hold or len(forms) < 2:
                return rnd.choice(forms)
            w = rnd.choice(forms[:-1])
            return forms[-1] if unseen else w

        n = rnd.randint(1, min(len(lay.objs), k["max_mentions"]))
        if k["salience"] > 0:
            named = _weighted_sample([mi ** k["salience"] for mi in lay.m], n, rnd)
        else:
            named = rnd.sample(range(len(lay.objs)), n)
        nps = []
        for i in named:
            phrase = word(self.objects[lay.objs[i]])
            if rnd.random() < k["attr_prob"]:
                phrase = f"{word(self.attributes[lay.attrs[i]])} {phrase}"
            nps.append(("an " if phrase[0] in "aeiou" else "a ") + phrase)
        if n == 2 and rnd.random() < 0.3:
            body = f"{nps[0]} {rnd.choice(_RELATIONS)} {nps[1]}"
        elif n >= 2:
            body = ", ".join(nps[:-1]) + " and " + nps[-1]
        else:
            body = nps[0]
        scene = " " + word(self.scenes[lay.scene]) if rnd.random() < k["scene_prob"] else ""
        return rnd.choice(_TEMPLATES).format(body, scene)

    # ---- region features (vectorised per chunk) ---------------------------
    def region_ids(self, lays: Sequence[_Layout]) -> tuple[np.ndarray, np.ndarray]:
        """``base [c,R]`` and ``attr [c,R]`` indices into ``table`` / ``attr_table`` (unshuffled)."""
        r = self.k["regions"]
        background = self.k["objects"]
        base = np.empty((len(lays), r), np.int64)
        attr = np.full((len(lays), r), self.no_attr, np.int64)
        for row, lay in enumerate(lays):
            b: list[int] = []
            a: list[int] = []
            for o, at, m in zip(lay.objs, lay.attrs, lay.m):
                b += [o] * m
                a += [at] * m
            for o, at in lay.distractors:
                b.append(o)
                a.append(at)
            n_obj = len(b)
            base[row, :n_obj] = b
            attr[row, :n_obj] = a
            base[row, n_obj:] = background
            if lay.stuff:
                base[row, n_obj:] = background + 1 + np.asarray(lay.stuff, np.int64)
        return base, attr

    def render(self, lays: Sequence[_Layout], rng: np.random.Generator) -> np.ndarray:
        """Region features ``[c,R,Dv]`` float32 of a chunk of layouts."""
        k = self.k
        base, attr = self.region_ids(lays)
        perm = np.argsort(rng.random(base.shape), axis=1)  # shuffle regions per image
        base = np.take_along_axis(base, perm, 1)
        attr = np.take_along_axis(attr, perm, 1)
        feats = self.table[base]  # [c,R,Dv]
        feats += self.attr_table[attr]
        scenes = np.array([lay.scene for lay in lays], np.int64)
        feats += self.scene_table[scenes][:, None, :]
        if k["noise"] > 0:
            noise = rng.standard_normal(feats.shape, dtype=np.float32)
            noise *= np.float32(k["noise"] / math.sqrt(k["feat_dim"]))
            feats += noise
        return feats


def _weighted_sample(weights: Sequence[float], n: int, rnd: random.Random) -> list[int]:
    """``n`` distinct indices, each draw with probability proportional to the remaining weights."""
    left = list(range(len(weights)))
    out = []
    for _ in range(n):
        i = rnd.choices(range(len(left)), [weights[j] for j in left])[0]
        out.append(left.pop(i))
    return out


def _split_seed(seed: int, split: str) -> list[int]:
    return [int(seed), zlib.crc32(split.encode("utf-8"))]


def _split_random(seed: int, split: str) -> random.Random:
    return random.Random(int(np.random.SeedSequence(_split_seed(seed, split) + [1]).generate_state(1)[0]))


def split_twins(n: int, seed: int = 0, split: str = "test", **knobs: Any) -> np.ndarray:
    """``[n]`` int64: for each image of the split, the image it is a twin of (same objects,
    attributes rotated), or -1. Cheap: no features are drawn."""
    world = World(seed, resolve_knobs(knobs))
    return np.array([lay.twin_of for lay in world.layouts(n, _split_random(seed, split))], np.int64)


def _generate_into(
    out: np.ndarray,
    seed: int,
    split: str,
    world: World,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], list[_Layout]]:
    n = out.shape[0]
    ss = _split_seed(seed, split)
    rnd = _split_random(seed, split)
    lays = world.layouts(n, rnd)
    unseen = split == "test" and world.k["holdout_synonym"] == 1
    captions = [world.caption(lay, rnd, unseen) for lay in lays for _ in range(5)]
    for c, start in enumerate(range(0, n, CHUNK)):
        stop = min(start + CHUNK, n)
        rng = np.random.default_rng(np.random.SeedSequence(ss + [2, c]))
        out[start:stop] = world.render(lays[start:stop], rng)
        if progress is not None:
            progress(stop - start)
    return captions, lays


def generate_split(n: int, seed: int = 0, split: str = "test", **knobs: Any) -> tuple[np.ndarray, list[str]]:
    """One split in memory: region features ``[n,R,Dv]`` float32 and ``5*n`` captions.

    The same ``(seed, split, knobs)`` gives the same bytes as ``generate`` writes for that
    split (with ``n`` images), and the world (prototypes, words) depends on ``seed`` and
    the knobs only, so a model trained on ``generate(..., seed=s)`` data can be
    evaluated on ``generate_split(25000, seed=s, split="bench")``.

    Raises:
        InputError: ``n < 1`` or bad knobs.
    """
    if n < 1:
        raise InputError(f"a split needs at least one image, got n={n}")
    k = resolve_knobs(knobs)
    world = World(seed, k)
    ims = np.empty((n, k["regions"], k["feat_dim"]), np.float32)
    captions, _ = _generate_into(ims, seed, split, world)
    return ims, captions


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike[str], images: int = 2000, seed: int = 0, **knobs: Any) -> Path:
    """Write a synthetic precomp folder: ``{train,dev,test}_ims.npy`` (float32 ``[N,R,Dv]``),
    ``{train,dev,test}_caps.txt`` (5 captions per image) and ``meta.json`` (seed, knobs,
    sizes, words).

    ``train`` has ``images`` images; ``dev`` and ``test`` ``eval_images`` each
    (``max(200, images // 10)`` by default). Features are written chunk by chunk into a
    memory-mapped file, so memory stays flat however many images are asked for.

    Raises:
        InputError: ``images < 1`` or bad knobs.
    """
    if images < 1:
        raise InputError(f"images must be >= 1, got {images}")
    k = resolve_knobs(knobs)
    world = World(seed, k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_eval = eval_split_size(images, k["eval_images"])
    sizes = {"train": int(images), "dev": n_eval, "test": n_eval}
    twins: dict[str, int] = {}
    try:
        from tqdm import tqdm

        bar: Any = tqdm(total=sum(sizes.values()), unit="img", desc="synth", disable=None)
    except ImportError:  # pragma: no cover - tqdm comes with the train extra
        bar = None
    for split, n in sizes.items():
        ims_path = out / f"{split}_ims.npy"
        tmp = out / f".{split}_ims.npy.tmp"
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(n, k["regions"], k["feat_dim"])
        )
        try:
            captions, lays = _generate_into(arr, seed, split, world, bar.update if bar is not None else None)
            arr.flush()
        finally:
            del arr
        os.replace(tmp, ims_path)
        _atomic_write_text(out / f"{split}_caps.txt", "".join(c + "\n" for c in captions))
        twins[split] = sum(1 for lay in lays if lay.twin_of >= 0)
    if bar is not None:
        bar.close()
    meta = {
        "generator": "training.synth",
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "images": int(images),
        "knobs": k,
        "splits": sizes,
        "twins": twins,
        "caps_per_image": 5,
        "words": {
            "objects": [list(w) for w in world.objects],
            "attributes": [list(w) for w in world.attributes],
            "scenes": [list(w) for w in world.scenes],
        },
        "held_out_words": sorted(
            {f[-1] for forms in (world.objects, world.attributes, world.scenes) for f in forms if len(f) > 1}
        )
        if k["holdout_synonym"]
        else [],
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("wrote synthetic data to %s (%s)", out, sizes)
    return out
