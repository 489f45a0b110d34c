"""The shared search core (mssan_infer.search) on its own: scorer batching and limits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mssan_infer.errors import InputError
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.search import Encoded, ScorerLimits, pairs_score_fn, search

D = 4


def _items(n: int, length: int, seed: int) -> Encoded:
    rng = np.random.default_rng(seed)
    local = rng.normal(size=(n, length, D)).astype(np.float32)
    return Encoded(
        rng.normal(size=(n, 2 * D)).astype(np.float32),
        local,
        np.ones((n, length), np.float32),
        local @ local.transpose(0, 2, 1),
    )


def _scorer(calls: list[dict[str, tuple[int, ...]]]) -> Any:
    """A stand-in scorer: s_ll = sum of the two sides' first local coordinates, recording each
    call's shapes."""

    def score(feeds: dict[str, np.ndarray]) -> np.ndarray:
        calls.append({k: v.shape for k, v in feeds.items()})
        img = feeds["img_local"][:, :, 0].sum(1)  # [Ni]
        txt = feeds["txt_local"][:, :, 0].sum(1)  # [Nt]
        return (img[:, None] + txt[None, :]).astype(np.float32)  # [Ni, Nt]

    return pairs_score_fn(score, query_is_text=True)


@pytest.fixture()
def gallery() -> MemoryGallery:
    g = MemoryGallery(2 * D, D)
    items = _items(20, 5, seed=1)
    g.add(items.stage1, items.local, items.mask, items.gram)
    return g


def test_scorer_calls_are_split_to_the_scorers_candidate_limit_and_rank_the_same(
    gallery: MemoryGallery,
) -> None:
    q = _items(2, 3, seed=2)
    free: list[dict[str, tuple[int, ...]]] = []
    bounded: list[dict[str, tuple[int, ...]]] = []
    want = search(q, gallery.view(), _scorer(free), query_is_text=True, k=5, rerank=20)
    got = search(
        q, gallery.view(), _scorer(bounded), query_is_text=True, k=5, rerank=20, limits=ScorerLimits(items=3)
    )
    assert max(c["img_local"][0] for c in bounded) == 3 and len(bounded) == 2 * 7  # ceil(20 / 3) per query
    assert len(free) == 2
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.score, b.score, atol=1e-6)


def test_items_longer_than_the_scorers_limit_are_an_input_error_naming_the_profile(
    gallery: MemoryGallery,
) -> None:
    with pytest.raises(InputError, match="at most L=2.*--trt-profile L="):
        search(
            _items(1, 3, seed=3),
            gallery.view(),
            _scorer([]),
            query_is_text=True,
            k=2,
            rerank=5,
            limits=ScorerLimits(words=2),
        )
    with pytest.raises(InputError, match="at most R=4"):
        search(
            _items(1, 3, seed=3),
            gallery.view(),
            _scorer([]),
            query_is_text=True,
            k=2,
            rerank=5,
            limits=ScorerLimits(regions=4),
        )
    assert ScorerLimits.from_axes({"Ni": 7, "Nt": 9, "R": 36, "L": 16}, query_is_text=False) == ScorerLimits(
        9, 36, 16
    )
    assert ScorerLimits.from_axes({}, query_is_text=True) == ScorerLimits()


def test_an_exhaustive_search_scores_shards_of_at_least_exhaustive_shard_items_within_the_limit() -> None:
    from mssan_infer.search import EXHAUSTIVE_SHARD

    n = EXHAUSTIVE_SHARD + 300
    g = MemoryGallery(2 * D, D)
    items = _items(n, 2, seed=5)
    g.add(items.stage1, items.local, items.mask, items.gram)
    q = _items(1, 3, seed=6)
    calls: list[dict[str, tuple[int, ...]]] = []
    full = search(q, g.view(), _scorer(calls), query_is_text=True, k=5, rerank=n, batch=16)[0]
    assert [c["img_local"][0] for c in calls] == [EXHAUSTIVE_SHARD, 300]  # not n / 16 calls of 16
    calls.clear()
    capped = search(
        q,
        g.view(),
        _scorer(calls),
        query_is_text=True,
        k=5,
        rerank=n,
        batch=16,
        limits=ScorerLimits(items=500),
    )[0]
    assert max(c["img_local"][0] for c in calls) == 500  # the scorer's limit still holds
    rerank = search(q, g.view(), _scorer(calls), query_is_text=True, k=5, rerank=n - 1, batch=16)[0]
    np.testing.assert_array_equal(full.rows, capped.rows)
    np.testing.assert_array_equal(full.rows, rerank.rows)  # the same ranking as a gathered rerank
