"""The quickstart's last line: the runtime's recall, measured as the table above it measures it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .conftest import WORDS


def test_the_quickstart_runtime_recall_is_the_tables_two_stage_row(
    tiny_bundle: Path, tiny_checkpoint: Path
) -> None:
    from mssan_infer import Retriever
    from quickstart import recall_line, runtime_recall
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate_split

    rng = np.random.default_rng(5)
    n, rerank = 16, 6
    images = np.abs(rng.standard_normal((n, 7, 24))).astype(np.float32)
    mask = np.ones((n, 7), np.float32)
    mask[::3, 5:] = 0  # some images with fewer regions
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(5 * n)]
    ck = load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        table = evaluate_split(ck.model, images, mask, captions, ck.tokenizer, rerank=rerank)
    img_ids = [f"img{i:04d}" for i in range(n)]
    cap_ids = [f"cap{j:05d}" for j in range(5 * n)]
    r = Retriever.load(tiny_bundle)
    r.add_images(images, ids=img_ids, mask=mask)
    r.add_texts(captions, ids=cap_ids)
    got = runtime_recall(r, images, mask, captions, img_ids, cap_ids, rerank=rerank, batch=7)
    row = table[f"twostage@{rerank}"]
    # the same protocol: every caption and every image a query, two-stage at the same depth
    assert abs(got["t2i"] - row["t2i"]["r1"]) <= 100.0 / (5 * n) + 1e-9  # at most one query apart
    assert abs(got["i2t"] - row["i2t"]["r1"]) <= 100.0 / n + 1e-9
    assert got["t2i"] > 0 or row["t2i"]["r1"] == 0
    line = recall_line(got, table, rerank, n, 5 * n)
    assert f"two-stage@{rerank} R@1, all {n} images / {5 * n} captions as queries" in line
    assert f"i2t {got['i2t']:.1f}, t2i {got['t2i']:.1f}" in line
    assert f"(the table's twostage@{rerank} row: {row['i2t']['r1']:.1f} / {row['t2i']['r1']:.1f})" in line
