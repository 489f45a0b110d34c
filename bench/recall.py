"""Section 3: recall@1/5/10 of two-stage retrieval at each rerank depth, relative to exhaustive.

A tiny model trained on synthetic data (or ``--checkpoint``) is exported and
searched through the runtime on a synthetic split of the same world
(``generate_split(n, seed, split="bench")``): text->image over ``n`` images
and image->text over their ``5n`` captions, with a seeded subsample of queries.
Exhaustive = rerank depth equal to the gallery size (ranking equals the full
``score``, DESIGN §2). Depth 0 is stage 1 alone; its rows also hold R@100 (``r100``): the share
of queries with a right answer among the candidates a rerank of 100 sees.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from mssan_infer import GalleryOptions

__all__ = ["run_recall"]

log = logging.getLogger(__name__)
CAPS = 5
STAGE1_K = 100  # the stage-1 row's deepest recall: the candidates of the headline rerank depth


def _recall(hit_rank: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"r{k}": float(100.0 * np.mean(hit_rank < k)) for k in ks}


def _ranks_t2i(q_caps: np.ndarray, hits: Sequence[Sequence[Any]], miss: int) -> np.ndarray:
    """Rank of each caption query's image in its hits (``miss`` when absent)."""
    return np.array(
        [next((j for j, h in enumerate(hs) if h.id == int(c) // CAPS), miss) for c, hs in zip(q_caps, hits)]
    )


def _ranks_i2t(q_ims: np.ndarray, hits: Sequence[Sequence[Any]], miss: int) -> np.ndarray:
    """Rank of each image query's first right caption in its hits (``miss`` when absent)."""
    return np.array(
        [
            next((j for j, h in enumerate(hs) if int(h.id) // CAPS == int(i)), miss)
            for i, hs in zip(q_ims, hits)
        ]
    )


def run_recall(
    retriever: Any,
    n_images: int,
    depths: list[int],
    queries: int,
    seed: int = 0,
    split: str = "bench",
    ivf: bool = False,
    layouts: Sequence[str] = (),
) -> dict[str, Any]:
    """Recall per depth for both directions. ``retriever`` is a fresh Retriever of the trained bundle.

    ``ivf``: also rerank 100 over an IVF stage 1 (FAISS, ``retrieval.ivf_options``), as row ``ivf_100``.
    ``layouts``: also rerank 100 over galleries of these layouts (``mssan_infer.gallery.storage.LAYOUTS``),
    as rows ``layout_<name>`` with the R@1 ratio against the float32 layout at rerank 100
    (``r1_ratio_vs_fp32``) and the largest difference of a returned hit's final score from its float32
    one (``score_err_max``).
    """
    from training.synth import generate_split

    ims, caps = generate_split(n_images, seed=seed, split=split)
    t0 = time.perf_counter()
    enc_ims, enc_caps = retriever.encode_images(ims), retriever.encode_texts(caps)
    retriever.add_images(enc_ims, ids=list(range(n_images)))
    retriever.add_texts(enc_caps, ids=list(range(len(caps))))
    encode_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    q_caps = np.sort(rng.choice(len(caps), size=min(queries, len(caps)), replace=False))
    q_ims = np.sort(rng.choice(n_images, size=min(queries, n_images), replace=False))
    out: dict[str, Any] = {
        "images": n_images,
        "captions": len(caps),
        "queries_t2i": len(q_caps),
        "queries_i2t": len(q_ims),
        "encode_s": encode_s,
        "t2i": {},
        "i2t": {},
    }
    all_depths: list[Any] = [*depths, "exhaustive"]
    runs: list[tuple[str, Any, int | None]] = [(str(d), retriever, None) for d in all_depths]
    if ivf:
        from .retrieval import ivf_options, stage1_variant

        variant = stage1_variant(retriever, "faiss-ivf", ivf_options)
        out["ivf_options"] = {"images": ivf_options(n_images), "texts": ivf_options(len(caps))}
        runs.append(("ivf_100", variant, 100))
    lay_rs = []
    for name in layouts:
        from mssan_infer import Retriever
        from mssan_infer.gallery.memory import MemoryGallery

        d = retriever.embed_size
        lr = Retriever(
            retriever.bundle,
            retriever.backend,
            retriever.tokenizer,
            MemoryGallery(2 * d, d, GalleryOptions(layout=name)),
            MemoryGallery(2 * d, d, GalleryOptions(layout=name)),
            retriever.search_options,
        )
        lr.add_images(enc_ims, ids=list(range(n_images)))
        lr.add_texts(enc_caps, ids=list(range(len(caps))))
        lay_rs.append(lr)
        runs.append((f"layout_{name}", lr, 100))
    scores: dict[str, tuple[Any, Any]] = {}
    for name, r, fixed in runs:
        depth = fixed if fixed is not None else name
        d_t2i = n_images if depth == "exhaustive" else int(depth)
        d_i2t = len(caps) if depth == "exhaustive" else int(depth)
        t0 = time.perf_counter()
        hits = r.search_batch(texts=[caps[i] for i in q_caps], k=10, rerank=d_t2i)
        ranks = _ranks_t2i(q_caps, hits, 10)
        hits_t2i = hits
        t_t2i = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = r.search_batch(images=ims[q_ims], k=10, rerank=d_i2t)
        ranks_i = _ranks_i2t(q_ims, hits, 10)
        t_i2t = time.perf_counter() - t0
        scores[name] = (hits_t2i, hits)
        out["t2i"][name] = {**_recall(ranks), "seconds": t_t2i}
        out["i2t"][name] = {**_recall(ranks_i), "seconds": t_i2t}
        if name == "0":  # stage 1 alone: R@100, the recall a rerank of 100 can reach (not timed)
            deep = r.search_batch(texts=[caps[i] for i in q_caps], k=min(STAGE1_K, n_images), rerank=0)
            out["t2i"][name].update(_recall(_ranks_t2i(q_caps, deep, STAGE1_K), (STAGE1_K,)))
            deep = r.search_batch(images=ims[q_ims], k=min(STAGE1_K, len(caps)), rerank=0)
            out["i2t"][name].update(_recall(_ranks_i2t(q_ims, deep, STAGE1_K), (STAGE1_K,)))
        log.info("recall %s: t2i %s i2t %s", name, out["t2i"][name], out["i2t"][name])
    if ivf:
        variant.close()
    for lr in lay_rs:
        if lr._gather_pool is not None:
            lr._gather_pool.shutdown()  # the backend is the caller's
    for name in layouts:
        for di, direction in enumerate(("t2i", "i2t")):
            ref = {(qi, h.id): h.score for qi, hs in enumerate(scores["100"][di]) for h in hs}
            errs = [
                abs(h.score - ref[(qi, h.id)])
                for qi, hs in enumerate(scores[f"layout_{name}"][di])
                for h in hs
                if (qi, h.id) in ref
            ]
            out[direction][f"layout_{name}"]["score_err_max"] = float(max(errs)) if errs else float("nan")
    for direction in ("t2i", "i2t"):
        ex = out[direction]["exhaustive"]
        for name, _, _ in runs:
            row = out[direction][name]
            # 0/0 (an untrained model finds nothing either way) counts as equal recall
            row["r1_ratio"] = (
                row["r1"] / ex["r1"] if ex["r1"] > 0 else (1.0 if row["r1"] == 0 else float("inf"))
            )
            if name.startswith("layout_"):
                base = out[direction]["100"]
                for r_ in ("r1", "r5", "r10"):
                    row[f"{r_}_ratio_vs_fp32"] = (
                        row[r_] / base[r_] if base[r_] > 0 else (1.0 if row[r_] == 0 else float("inf"))
                    )
    return out
