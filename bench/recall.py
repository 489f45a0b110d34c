"""Section 3: recall@1/5/10 of two-stage retrieval at each rerank depth, relative to exhaustive.

A tiny model trained on synthetic data (or ``--checkpoint``) is exported and
searched through the runtime on a synthetic split of the same world
(``generate_split(n, seed, split="bench")``): text->image over ``n`` images
and image->text over their ``5n`` captions, with a seeded subsample of queries.
Exhaustive = rerank depth equal to the gallery size (ranking equals the full
``score``, DESIGN §2).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

__all__ = ["run_recall"]

log = logging.getLogger(__name__)
CAPS = 5


def _recall(hit_rank: np.ndarray) -> dict[str, float]:
    return {f"r{k}": float(100.0 * np.mean(hit_rank < k)) for k in (1, 5, 10)}


def run_recall(retriever: Any, n_images: int, depths: list[int], queries: int, seed: int = 0,
               split: str = "bench") -> dict[str, Any]:
    """Recall per depth for both directions. ``retriever`` is a fresh Retriever of the trained bundle."""
    from training.synth import generate_split

    ims, caps = generate_split(n_images, seed=seed, split=split)
    t0 = time.perf_counter()
    retriever.add_images(ims, ids=list(range(n_images)))
    retriever.add_texts(caps, ids=list(range(len(caps))))
    encode_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    q_caps = np.sort(rng.choice(len(caps), size=min(queries, len(caps)), replace=False))
    q_ims = np.sort(rng.choice(n_images, size=min(queries, n_images), replace=False))
    out: dict[str, Any] = {"images": n_images, "captions": len(caps), "queries_t2i": len(q_caps),
                           "queries_i2t": len(q_ims), "encode_s": encode_s, "t2i": {}, "i2t": {}}
    all_depths = [*depths, "exhaustive"]
    for depth in all_depths:
        d_t2i = n_images if depth == "exhaustive" else int(depth)
        d_i2t = len(caps) if depth == "exhaustive" else int(depth)
        t0 = time.perf_counter()
        hits = retriever.search_batch(texts=[caps[i] for i in q_caps], k=10, rerank=d_t2i)
        ranks = np.array([next((j for j, h in enumerate(hs) if h.id == int(c) // CAPS), 10)
                          for c, hs in zip(q_caps, hits)])
        t_t2i = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = retriever.search_batch(images=ims[q_ims], k=10, rerank=d_i2t)
        ranks_i = np.array([next((j for j, h in enumerate(hs) if int(h.id) // CAPS == int(i)), 10)
                            for i, hs in zip(q_ims, hits)])
        t_i2t = time.perf_counter() - t0
        out["t2i"][str(depth)] = {**_recall(ranks), "seconds": t_t2i}
        out["i2t"][str(depth)] = {**_recall(ranks_i), "seconds": t_i2t}
        log.info("recall depth %s: t2i %s i2t %s", depth, out["t2i"][str(depth)], out["i2t"][str(depth)])
    for direction in ("t2i", "i2t"):
        ex = out[direction]["exhaustive"]
        for depth in all_depths:
            row = out[direction][str(depth)]
            # 0/0 (an untrained model finds nothing either way) counts as equal recall
            row["r1_ratio"] = row["r1"] / ex["r1"] if ex["r1"] > 0 else (1.0 if row["r1"] == 0 else float("inf"))
    return out
