"""Two-stage search, written once: stage-1 top-k from a gallery view, then the scorer over the candidates.

Used by :class:`mssan_infer.Retriever` (the scorer is ONNX Runtime's query scorers, or a backend's
all-pairs ``scorer`` graph) and by the Triton ``retriever`` model (a BLS request to the ``scorer``
model): candidates come from the view's stage-1 top-k (ties by increasing row), the scorer sees them
in that order and in the same batches, and the final order is by decreasing final score, ties by
increasing row. The same scorer graph therefore ranks identically, ties included; the query scorers
and the all-pairs scorer agree to float32 rounding (near-ties may swap).
"""

from __future__ import annotations

import functools
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from mssan_infer.backends.base import one_thread
from mssan_infer.errors import InputError
from mssan_infer.gallery.base import Candidates, GalleryView, extent
from mssan_infer.parts import part_bounds, run_parts
from mssan_infer.spec import QUERY_SCORERS, SIMILARITY, query_scorer

__all__ = [
    "Encoded",
    "Ranked",
    "ScorerLimits",
    "ScoreFn",
    "EXHAUSTIVE_SHARD",
    "scorer_feeds",
    "pairs_score_fn",
    "backend_score_fn",
    "query_score_fn",
    "uses_query_scorers",
    "holds_query_scorers",
    "search",
    "rerank_scores",
    "MIN_SHARE",
]

# (query locals [Q, D], mask [Q], Gram [Q, Q], candidates) -> s_ll [K] float32
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Candidates], np.ndarray]

# Items per scorer call of an exhaustive search (at least ``batch``; at most the scorer's ``limits.items``).
# Its shards are consecutive rows that a float32 block hands over without a copy, so a larger shard
# costs no gather memory there and fewer scorer calls (the study: docs/design.md §10).
EXHAUSTIVE_SHARD = 1024

# Fewest candidates in one share of a rerank split over threads (``search(..., shares=)``): each share
# costs a hand-off and a graph launch (docs/experiments/2026-12-07-rerank-shares.md).
MIN_SHARE = 32


@dataclass(frozen=True)
class Encoded:
    """Encoded items of one modality (numpy, float32), padded to the longest item.

    Attributes:
        stage1: ``[N, 2D]`` stage-1 vectors.
        local: ``[N, P, D]`` unfused locals, zero at padding.
        mask: ``[N, P]`` 1 for real regions/words.
        gram: ``[N, P, P]`` ``local @ local^T``.
    """

    stage1: np.ndarray
    local: np.ndarray
    mask: np.ndarray
    gram: np.ndarray

    def __len__(self) -> int:
        return int(self.stage1.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """``[N]`` number of real regions/words per item."""
        return (self.mask > 0).sum(1)


@dataclass(frozen=True)
class Ranked:
    """One query's results: gallery rows best first, their final and stage-1 scores (float32)."""

    rows: np.ndarray  # [k'] int64
    score: np.ndarray  # [k'] stage-1 + s_ll (stage-1 alone when not reranked)
    stage1: np.ndarray  # [k']


@dataclass(frozen=True)
class ScorerLimits:
    """The most a scorer call may take: gallery items per call, regions ``R`` and words ``L`` per item.

    ``None`` means unlimited. A TensorRT scorer engine has limits (its profile's maxima); the
    search splits the candidates to stay within ``items`` and refuses items longer than
    ``regions``/``words`` with an :class:`InputError` naming the engine's limit.
    """

    items: int | None = None
    regions: int | None = None
    words: int | None = None

    @classmethod
    def from_axes(cls, axes: Mapping[str, Any] | None, *, query_is_text: bool) -> "ScorerLimits":
        """From the scorer's per-axis maxima ``{"Ni", "Nt", "R", "L"}`` (missing axes are unlimited)."""
        axes = axes or {}

        def get(name: str) -> int | None:
            v = axes.get(name)
            return int(v) if v is not None else None

        return cls(get("Ni" if query_is_text else "Nt"), get("R"), get("L"))


def scorer_feeds(
    q_local: np.ndarray,
    q_mask: np.ndarray,
    q_gram: np.ndarray,
    c_local: np.ndarray,
    c_mask: np.ndarray,
    c_gram: np.ndarray,
    *,
    query_is_text: bool,
) -> dict[str, np.ndarray]:
    """The scorer graph's feeds for a query (one item) and candidates (``K`` items) of the other modality."""
    if query_is_text:
        return {
            "img_local": c_local,
            "region_mask": c_mask,
            "img_gram": c_gram,
            "txt_local": q_local,
            "token_mask": q_mask,
            "txt_gram": q_gram,
        }
    return {
        "img_local": q_local,
        "region_mask": q_mask,
        "img_gram": q_gram,
        "txt_local": c_local,
        "token_mask": c_mask,
        "txt_gram": c_gram,
    }


def pairs_score_fn(run: Callable[[dict[str, np.ndarray]], np.ndarray], *, query_is_text: bool) -> ScoreFn:
    """A :data:`ScoreFn` over the all-pairs ``scorer`` graph (``run``: its feeds -> ``s_ll [Ni, Nt]``): what
    TensorRT engines and Triton models run. Stored int8 candidates are dequantized for it."""

    def score(q_local: np.ndarray, q_mask: np.ndarray, q_gram: np.ndarray, c: Candidates) -> np.ndarray:
        local, gram = c.dequantized()
        s_ll = run(
            scorer_feeds(
                q_local[None], q_mask[None], q_gram[None], local, c.mask, gram, query_is_text=query_is_text
            )
        )
        return np.asarray(s_ll[:, 0] if query_is_text else s_ll[0, :], np.float32)  # [K, 1] or [1, K]

    return score


def query_score_fn(
    run: Callable[[str, dict[str, np.ndarray]], np.ndarray],
    pairs: Callable[[dict[str, np.ndarray]], np.ndarray],
    *,
    query_is_text: bool,
    int8: bool = True,
) -> ScoreFn:
    """A :data:`ScoreFn` over the query scorers (``run``: graph name, feeds -> ``s_ll [K]``): candidates
    gathered as their similarities to the query (float32 layouts, ``search(..., similarity=True)``) go to
    ``scorer_t2i``/``scorer_i2t``, the ``int8`` layout's stored codes to their ``*_int8`` graphs as they
    are (no float copy), and float32 locals in hand (a run of consecutive rows handed over without a
    copy, a view that copies its rows) to the all-pairs ``scorer`` (``pairs``: its feeds -> ``s_ll``), one
    GEMM over them; so do int8 codes, dequantized, when ``int8`` is false (no ``*_int8`` graphs)."""
    c_side, q_side = (
        (("img", "region"), ("txt", "token")) if query_is_text else (("txt", "token"), ("img", "region"))
    )
    fp32_graph, int8_graph = query_scorer(query_is_text, False), query_scorer(query_is_text, True)
    c_codes, c_scale = f"{c_side[0]}_codes", f"{c_side[0]}_scale"
    c_mask, c_gram = f"{c_side[1]}_mask", f"{c_side[0]}_gram"
    q_local_n, q_mask_n, q_gram_n = f"{q_side[0]}_local", f"{q_side[1]}_mask", f"{q_side[0]}_gram"
    locals_in_hand = pairs_score_fn(pairs, query_is_text=query_is_text)

    def score(q_local: np.ndarray, q_mask: np.ndarray, q_gram: np.ndarray, c: Candidates) -> np.ndarray:
        feeds = {c_mask: c.mask, c_gram: c.gram, q_mask_n: q_mask, q_gram_n: q_gram}
        if c.similarity is not None:
            feeds[SIMILARITY] = c.similarity
            return run(fp32_graph, feeds)
        if c.scale is not None and int8:
            assert c.local is not None
            feeds[c_codes], feeds[c_scale], feeds[q_local_n] = c.local, c.scale, q_local
            return run(int8_graph, feeds)
        return locals_in_hand(q_local, q_mask, q_gram, c)

    return score


def holds_query_scorers(backend: Any, *, int8: bool) -> bool:
    """Whether ``backend`` (a :class:`~mssan_infer.backends.base.Backend`) runs both query scorers of
    ``int8`` candidates (else of float32 ones)."""
    return all(query_scorer(t, int8) in backend.graphs for t in (True, False))


def uses_query_scorers(backend: Any) -> bool:
    """Whether ``backend`` runs the float32 query scorers (ONNX Runtime on a bundle of this version): then
    :func:`search` takes ``similarity=True``."""
    return holds_query_scorers(backend, int8=False)


def backend_score_fn(backend: Any, *, query_is_text: bool) -> ScoreFn:
    """The query scorers ``backend`` has (:func:`query_score_fn`), else the all-pairs ``scorer``
    (TensorRT, bundles exported before them)."""

    def run(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return backend.run_prepared(graph, feeds)["s_ll"]  # type: ignore[no-any-return]

    pairs = functools.partial(run, "scorer")

    if any(g in backend.graphs for g in QUERY_SCORERS):
        int8 = holds_query_scorers(backend, int8=True)
        return query_score_fn(run, pairs, query_is_text=query_is_text, int8=int8)
    return pairs_score_fn(pairs, query_is_text=query_is_text)


def _check_length(width: int, limit: int | None, what: str, axis: str) -> None:
    if limit is not None and width > limit:
        raise InputError(
            f"{what} has {width} {'regions' if axis == 'R' else 'words'}, but the scorer takes at most "
            f"{axis}={limit}; rebuild its engine with a larger profile (e.g. `--trt-profile "
            f"{axis}=1,{limit},{width}`)"
        )


def rerank_scores(
    query: Encoded,
    qi: int,
    view: GalleryView,
    rows: np.ndarray,
    score: ScoreFn,
    *,
    query_is_text: bool,
    batch: int,
    limits: ScorerLimits | None = None,
    executor: Executor | None = None,
    parts: int = 1,
    similarity: bool = False,
    shares: int = 1,
) -> np.ndarray:
    """``s_ll`` of query ``qi`` against gallery ``rows``, in batches of at most ``batch`` -> ``[K]``
    float32 (``similarity``: gather float32 candidates as their similarities to the query, what
    :func:`query_score_fn` takes). ``shares > 1`` (with an ``executor``): the rows are cut into that many
    equal shares of at least :data:`MIN_SHARE` (``mssan_infer.parts``), each gathered and scored on its own
    thread, the first on this one; ``executor`` and ``parts`` then split nothing else."""
    limits = limits or ScorerLimits()
    q_axis, c_axis = ("L", "R") if query_is_text else ("R", "L")
    q_limit, c_limit = (limits.words, limits.regions) if query_is_text else (limits.regions, limits.words)
    width = max(1, extent(query.mask[qi : qi + 1]))
    _check_length(width, q_limit, "the query", q_axis)
    q_local = query.local[qi, :width]  # [P, D]
    q_mask = query.mask[qi, :width]
    q_gram = query.gram[qi, :width, :width]
    step = max(1, min(batch, limits.items or batch))
    # the candidates are gathered in row order (grouped by gallery block, memory-mapped rows in file order:
    # each block's rows are one take) and their scores put back in the order asked for
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    scores = np.empty(len(rows), np.float32)
    out = np.empty(len(rows), np.float32)
    pool = executor
    cuts = part_bounds(len(rows), shares if pool is not None else 1, MIN_SHARE)
    if len(cuts) > 2:  # each share gathered on its own thread: the gathers' own split is not nested in it
        executor, parts = None, 1

    def rerank(lo: int, hi: int) -> None:
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            if similarity:  # a view without the keyword still serves searches that do not ask for it
                cands = view.gather(rows[a:b], executor, parts, query=q_local)
            else:
                cands = view.gather(rows[a:b], executor, parts)
            _check_length(cands.mask.shape[1], c_limit, "a gallery item", c_axis)
            out[a:b] = score(q_local, q_mask, q_gram, cands)

    if len(cuts) == 2:
        rerank(0, len(rows))
    else:

        def share(lo: int, hi: int) -> None:  # the backend runs its graphs on one thread here (one_thread)
            with one_thread():
                rerank(lo, hi)

        run_parts(share, cuts, pool)
    scores[order] = out
    return scores


def search(
    query: Encoded,
    view: GalleryView,
    score: ScoreFn,
    *,
    query_is_text: bool,
    k: int,
    rerank: int,
    batch: int = 256,
    limits: ScorerLimits | None = None,
    executor: Executor | None = None,
    parts: int = 1,
    where: Mapping[str, Any] | None = None,
    similarity: bool = False,
    shares: int = 1,
) -> list[Ranked]:
    """Two-stage search of ``view`` for every query in ``query``.

    Args:
        query: encoded queries (captions when ``query_is_text``, else images).
        view: a snapshot of the gallery of the other modality (not empty).
        score: ``s_ll`` of one query against gathered candidates (:func:`query_score_fn` or
            :func:`pairs_score_fn`).
        k: results per query (``>= 1``).
        rerank: stage-1 candidates rescored by the scorer; ``0`` = stage 1 only;
            ``0 < rerank < k`` reranks ``k``.
        batch: most candidates per scorer call (further bounded by ``limits.items``); an exhaustive
            search (every item reranked) scores shards of ``max(batch, EXHAUSTIVE_SHARD)`` items.
        limits: the scorer's limits (a TensorRT engine's profile maxima).
        executor, parts: parallel candidate gathers (see ``GalleryView.gather``).
        where: a metadata filter (:mod:`.filters`): only items that pass it are ranked.
        similarity: gather float32 candidates as their similarities to the query, computed where
            their rows lie (``score`` must take them: :func:`query_score_fn`).
        shares: rerank the candidates of a query in this many shares on ``executor``'s threads
            (:func:`rerank_scores`); an exhaustive search is not split.
    Returns:
        One :class:`Ranked` per query, at most ``k`` rows each.
    """
    depth = max(k, rerank) if rerank > 0 else k
    rows, s1 = view.topk(query.stage1, depth, where) if where else view.topk(query.stage1, depth)  # [Q, K]
    # Exhaustive (every item reranked): score the gallery in storage order, in shards of consecutive
    # rows that the view hands over without copying, then look the scores up in stage-1 order.
    exhaustive = rerank > 0 and depth >= view.n and not where
    storage_order = np.arange(view.n if exhaustive else 0, dtype=np.int64)  # used by exhaustive searches
    results: list[Ranked] = []
    for qi in range(len(query)):
        r, s = rows[qi], s1[qi]
        if rerank > 0 and len(r):
            if exhaustive:
                s_ll = rerank_scores(
                    query,
                    qi,
                    view,
                    storage_order,
                    score,
                    query_is_text=query_is_text,
                    batch=max(batch, EXHAUSTIVE_SHARD),
                    limits=limits,
                    executor=executor,
                    parts=parts,
                    similarity=False,  # shards of locals in hand: one GEMM over each (the all-pairs scorer)
                )[r]
            else:
                s_ll = rerank_scores(
                    query,
                    qi,
                    view,
                    r,
                    score,
                    query_is_text=query_is_text,
                    batch=batch,
                    limits=limits,
                    executor=executor,
                    parts=parts,
                    similarity=similarity,
                    shares=shares,
                )
            final = s + s_ll
            order = np.lexsort((r, -final))[:k]
        else:
            final = s
            order = np.arange(min(k, len(r)))
        results.append(Ranked(r[order], final[order].astype(np.float32), s[order].astype(np.float32)))
    return results
