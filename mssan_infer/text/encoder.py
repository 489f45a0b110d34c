"""Captions into the encoder graph: token ids through ``text_encoder``, batched by length."""

from __future__ import annotations

import numpy as np

from mssan_infer.backends.base import Backend
from mssan_infer.progress import batches
from mssan_infer.search import Encoded

__all__ = ["encode_token_ids"]


def encode_token_ids(
    backend: Backend, ids: list[list[int]], embed_size: int, batch_size: int, *, progress: bool = False
) -> Encoded:
    """Checked token ids of each caption through ``text_encoder`` on ``backend``: captions sorted by length,
    ``batch_size`` a run, each batch as wide as its longest; the result in the callers' order, padded to the
    longest caption."""
    n = len(ids)
    if n == 1:  # one caption (a query): the encoder's outputs are the result, no copy
        mask = np.ones((1, len(ids[0])), np.float32)
        res = backend.run_prepared("text_encoder", {"tokens": np.asarray(ids, np.int64), "token_mask": mask})
        return Encoded(res["txt_stage1"], res["txt_local"], mask, res["txt_gram"])
    d = embed_size
    lmax = max([1] + [len(x) for x in ids])
    out = Encoded(
        np.zeros((n, 2 * d), np.float32),
        np.zeros((n, lmax, d), np.float32),
        np.zeros((n, lmax), np.float32),
        np.zeros((n, lmax, lmax), np.float32),
    )
    order = np.argsort([len(x) for x in ids], kind="stable")
    for a, b in batches(n, batch_size, "encode texts", progress):
        rows = order[a:b]
        w = max(len(ids[i]) for i in rows)
        tokens = np.zeros((len(rows), w), np.int64)
        mask = np.zeros((len(rows), w), np.float32)
        for j, i in enumerate(rows):
            tokens[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1.0
        res = backend.run_prepared("text_encoder", {"tokens": tokens, "token_mask": mask})
        out.stage1[rows] = res["txt_stage1"]
        out.local[rows, :w] = res["txt_local"]
        out.mask[rows, :w] = mask
        out.gram[rows, :w, :w] = res["txt_gram"]
    return out
