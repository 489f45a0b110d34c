"""With a trained model: the runtime's recall equals training's evaluation in every mode
(stage 1, two-stage, exhaustive)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer import Retriever

pytestmark = pytest.mark.slow

CAPS = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model trained for one epoch on a small synthetic set (~10-30 s on 2 shared cores),
    and its bundle."""
    from export.api import export_bundle
    from training.synth import generate
    from training.train import train

    root = tmp_path_factory.mktemp("trained")
    generate(root / "data", images=300, seed=0, feat_dim=64, eval_images=60, regions=16, max_object_regions=3)
    train(
        root / "data",
        root / "ckpt",
        preset="tiny",
        text_encoder="bigru",  # the fast tower: the tower is not what this tests
        epochs=1,
        progress=False,
        model_overrides={"embed_size": 64, "word_dim": 32},
        train_overrides={"batch_size": 64, "lr": 2e-3, "warmup_all_epochs": 1},
    )
    return root / "data", export_bundle(root / "ckpt", root / "bundle")


def runtime_recall(r: Retriever, ims: np.ndarray, caps: list[str], rerank: int) -> dict[str, Any]:
    """R@1/5/10 both ways from the runtime's top-10 lists."""
    t2i = r.search_batch(texts=caps, k=10, rerank=rerank)
    t_ranks = np.array(
        [next((p for p, h in enumerate(hits) if h.id == c // CAPS), 10) for c, hits in enumerate(t2i)]
    )
    i2t = r.search_batch(images=ims, k=10, rerank=rerank)
    i_ranks = np.array(
        [
            next((p for p, h in enumerate(hits) if int(h.id) // CAPS == i), 10)  # type: ignore[arg-type]
            for i, hits in enumerate(i2t)
        ]
    )
    rec = {
        d: {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}
        for d, ranks in (("i2t", i_ranks), ("t2i", t_ranks))
    }
    return rec


def test_runtime_recall_equals_training_evaluation_in_every_mode(trained: tuple[Path, Path]) -> None:
    from training.checkpoint import load_model
    from training.data import load_split
    from training.evaluate import evaluate_split

    data, bundle = trained
    split = load_split(data, "test")
    ims = np.asarray(split.images, dtype=np.float32)
    caps = list(split.captions)
    model, tok = load_model(bundle.parent / "ckpt")
    ref = evaluate_split(model, ims, None, caps, tok, rerank=10)

    r = Retriever.load(bundle)
    r.add_images(ims)
    r.add_texts(caps)
    modes = {"stage1": 0, "twostage@10": 10, "exhaustive": len(caps)}  # rerank >= either gallery = exhaustive
    got = {mode: runtime_recall(r, ims, caps, depth) for mode, depth in modes.items()}
    one_query = {"i2t": 100.0 / len(ims), "t2i": 100.0 / len(caps)}  # a near-tie may flip one query
    for mode in modes:
        for d in ("i2t", "t2i"):
            for key, value in got[mode][d].items():
                assert abs(value - ref[mode][d][key]) <= one_query[d] + 1e-9, (
                    mode,
                    d,
                    key,
                    value,
                    ref[mode][d][key],
                )
    # the model learned something, and the local term matters on this set
    assert got["exhaustive"]["t2i"]["r10"] > 1.5 * 100.0 * 10 / len(ims)  # chance: 10/60
    rsum = {m: sum(v for d in got[m].values() for v in d.values()) for m in modes}
    assert rsum["exhaustive"] >= rsum["twostage@10"] - 2 * one_query["i2t"]
