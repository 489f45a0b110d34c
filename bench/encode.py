"""Section 4: encoder throughput (images/s, captions/s) through the runtime, batched and single-query."""

from __future__ import annotations

import logging
from typing import Any

from .fixtures import random_captions, random_regions
from .timing import side_by_side

__all__ = ["run_encode"]

log = logging.getLogger(__name__)


def run_encode(
    retriever: Any, regions: int, dv: int, words: int, batch: int, repeats: int, max_seconds: float
) -> dict[str, Any]:
    """Time ``encode_images`` / ``encode_texts`` on ``batch`` items and on one item, interleaved."""
    ims = random_regions(batch, regions, dv, seed=1)
    caps = random_captions(batch, words, seed=1)
    fns = {
        f"images_b{batch}": lambda: retriever.encode_images(ims),
        "images_b1": lambda: retriever.encode_images(ims[:1]),
        f"captions_b{batch}": lambda: retriever.encode_texts(caps),
        "captions_b1": lambda: retriever.encode_texts(caps[:1]),
    }
    res = side_by_side(fns, repeats=repeats, warmup=2, max_seconds=max_seconds)
    out: dict[str, Any] = {"batch": batch, "encoder_batch_size": retriever.batch_size, "timings": res}
    out["images_per_s"] = batch / (res[f"images_b{batch}"]["p50_ms"] / 1e3)
    out["captions_per_s"] = batch / (res[f"captions_b{batch}"]["p50_ms"] / 1e3)
    out["image_query_ms"] = res["images_b1"]["p50_ms"]
    out["caption_query_ms"] = res["captions_b1"]["p50_ms"]
    return out
