"""The in-memory gallery's filter index answers every filter as :func:`matches` does, per item."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mssan_infer.errors import InputError
from mssan_infer.gallery.filters import MetaIndex, check_metadata, matches, parse_where
from mssan_infer.gallery.memory import MemoryGallery

VALUES: list[Any] = [
    "a",
    "b",
    "",
    0,
    1,
    2,
    -3,
    1.0,
    2.5,
    True,
    False,
    None,
    2**60,
    2**60 + 1,
    -(2**60),
    ["a", 1],
    [["b"], [2, True]],
    [],
    {"x": 1},
]
FILTERS: list[dict[str, Any]] = [
    {"k": "a"},
    {"k": 1},
    {"k": True},
    {"k": False},
    {"k": 0},
    {"k": ["a", "b"]},
    {"k": [1, 2]},
    {"k": {"gte": 1}},
    {"k": {"gt": 1, "lte": 2.5}},
    {"k": {"lt": 0}},
    {"k": {"gt": 2.0**60}},
    {"k": {"gte": 2.0**60, "lte": 2.0**60}},
    {"k": "a", "j": {"gte": 0}},
    {"k": [1, 2], "j": "b"},
    {"missing": "a"},
]


def random_metas(n: int, seed: int) -> list[dict[str, Any] | None]:
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any] | None] = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(None)
            continue
        m = {key: VALUES[int(rng.integers(len(VALUES)))] for key in ("k", "j") if rng.random() < 0.8}
        out.append(m)
    return out


@pytest.mark.parametrize("where", FILTERS, ids=[str(f) for f in FILTERS])
def test_the_index_passes_exactly_the_items_that_match(where: dict[str, Any]) -> None:
    metas = random_metas(400, seed=0)
    conds = parse_where(where)
    index = MetaIndex(metas)
    for n in (0, 37, 400):  # a view of the first n items, then later ones
        want = [r for r in range(n) if matches(metas[r], conds)]
        got = index.rows(conds, n)
        assert got.dtype == np.int64 and got.tolist() == want


def test_the_index_follows_appends_and_older_views_keep_their_rows() -> None:
    metas = random_metas(50, seed=1)
    index = MetaIndex(metas)
    conds = parse_where({"k": {"gte": 0}})
    before = index.rows(conds, 50).tolist()
    metas.extend(random_metas(30, seed=2))  # a gallery appends in place
    assert index.rows(conds, 50).tolist() == before
    assert index.rows(conds, 80).tolist() == [r for r in range(80) if matches(metas[r], conds)]


def test_a_gallery_filters_through_its_index_and_a_removal_starts_a_new_one() -> None:
    rng = np.random.default_rng(0)
    g = MemoryGallery(8, 4)
    n = 60
    metas = [{"album": ["x", "y", "z"][i % 3], "year": 2000 + i} for i in range(n)]
    g.add(
        rng.normal(size=(n, 8)).astype(np.float32),
        np.zeros((n, 2, 4), np.float32),
        np.ones((n, 2), np.float32),
        np.zeros((n, 2, 2), np.float32),
        ids=[f"i{i}" for i in range(n)],
        metadata=metas,
    )
    old = g.view()
    q = rng.normal(size=(1, 8)).astype(np.float32)
    where = {"album": "y", "year": {"lt": 2030}}
    rows, _ = old.topk(q, 100, where)
    assert sorted(rows[0].tolist()) == [i for i in range(n) if i % 3 == 1 and i < 30]
    g.remove([f"i{i}" for i in range(0, n, 2)])
    new = g.view()
    assert new.meta_index is not old.meta_index
    assert sorted(old.topk(q, 100, where)[0][0].tolist()) == sorted(rows[0].tolist())  # a snapshot
    got = {new.ids[int(r)] for r in new.topk(q, 100, where)[0][0]}
    assert got == {f"i{i}" for i in range(n) if i % 3 == 1 and i < 30 and i % 2 == 1}


def test_huge_ints_bounded_caches_and_copied_metadata() -> None:
    # an int past float64's range is metadata like any other: filters on other keys still work, and a
    # range on its key compares it exactly
    metas: list[dict[str, Any] | None] = [{"a": "x", "big": 10**400}, {"a": "y", "big": 5}]
    index = MetaIndex(metas)
    assert index.rows(parse_where({"a": "x"}), 2).tolist() == [0]
    assert index.rows(parse_where({"big": {"gt": 1e300}}), 2).tolist() == [0]
    with pytest.raises(InputError, match="float64"):
        parse_where({"big": {"gt": 10**400}})
    # values no item has are not cached; the cache stays bounded
    for i in range(3000):
        index.rows(parse_where({"a": f"u{i}"}), 2)
    assert len(index._arrays) <= 1024
    # the gallery keeps its own copy of the metadata
    tags = ["a"]
    (kept,) = check_metadata([{"tags": tags}], 1)
    tags.append("b")
    assert kept == {"tags": ["a"]}
