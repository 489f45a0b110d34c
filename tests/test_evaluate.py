"""Recall metrics on hand-made similarity matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training.evaluate import ranks_i2t, ranks_t2i, recall_report, twostage_scores


def _perfect(n: int) -> np.ndarray:
    s = np.zeros((n, 5 * n), dtype=np.float32)
    for i in range(n):
        s[i, 5 * i : 5 * i + 5] = 1.0
    return s


def test_perfect_scores_give_full_recall() -> None:
    rep = recall_report(_perfect(4))
    assert rep["i2t"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0}
    assert rep["t2i"]["r1"] == 100.0 and rep["rsum"] == 600.0


def test_constant_scores_give_zero_r1_ties_are_pessimistic() -> None:
    rep = recall_report(np.ones((4, 20), dtype=np.float32))
    assert rep["i2t"]["r1"] == 0.0 and rep["t2i"]["r1"] == 0.0


def test_i2t_uses_the_best_of_five_captions() -> None:
    s = np.zeros((2, 10), dtype=np.float32)
    s[0, 4] = 0.9  # only the 5th caption of image 0 ranks first
    s[0, 5:] = 0.5  # captions of image 1 beat the other four
    s[1, 5] = 0.2
    s[1, 0] = 0.3  # image 1: a caption of image 0 ranks first
    r = ranks_i2t(s)
    assert r.tolist() == [0, 1]


def test_t2i_rank_counts_images_above_the_ground_truth() -> None:
    s = np.zeros((3, 15), dtype=np.float32)
    s[0, :5] = 0.5
    s[1, :5] = 0.6  # image 1 beats image 0 on image 0's captions
    s[1, 5:10] = 0.9
    s[2, 10:] = 0.1
    s[0, 10:] = 0.2  # ... and image 0 beats image 2 on image 2's
    s[1, 10:] = 0.05
    r = ranks_t2i(s)
    assert r.tolist() == [1] * 5 + [0] * 5 + [1] * 5


def test_twostage_reorders_only_the_top_k() -> None:
    stage1 = np.array([[0.9, 0.8, 0.7, 0.1]])
    full = np.array([[0.1, 0.5, 0.9, 2.0]])
    eff = twostage_scores(stage1, full, k=2, axis=1)
    assert list(np.argsort(-eff[0])) == [1, 0, 2, 3]  # item 3 is outside the top 2: stays last
    eff_all = twostage_scores(stage1, full, k=4, axis=1)
    assert list(np.argsort(-eff_all[0])) == [3, 2, 1, 0]  # K = gallery size: exhaustive order


def test_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        ranks_i2t(np.zeros((3, 14)))


def _levels(n: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """gg: right up to a shared offset with loud noise; ll: right but quiet. Only a small gg weight
    ranks well."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 5 * n), np.float32)
    for i in range(n):
        truth[i, 5 * i : 5 * i + 5] = 1.0
    ll = 0.05 * truth + 0.02 * rng.standard_normal(truth.shape).astype(np.float32)
    gg = 0.3 * truth + 0.5 * rng.standard_normal(truth.shape).astype(np.float32)
    return {"gg": gg, "ll": ll}


def test_select_level_weights_turns_down_a_loud_noisy_level() -> None:
    from training.evaluate import select_level_weights

    levels = _levels()
    w, rep = select_level_weights(levels, {"gg": 1.0, "gl": 0.0, "ll": 1.0})
    assert w["ll"] == 1.0 and w["gl"] == 0.0  # reference level keeps 1; an absent level stays absent
    assert 0 < w["gg"] <= 0.1, w
    at_start = recall_report(levels["gg"] + levels["ll"])["rsum"]
    assert rep["rsum"] > at_start + 20
    assert rep["rsum"] == recall_report(np.float32(w["gg"]) * levels["gg"] + levels["ll"])["rsum"]


def test_select_level_weights_with_a_rerank_depth_keeps_stage_1_able_to_find_the_answer() -> None:
    from training.evaluate import select_level_weights

    rng = np.random.default_rng(0)
    truth = _perfect(40)
    # S_ll ranks perfectly, so small global weights give a perfect exhaustive rSum whatever their
    # ratio; of the global levels only S_gg finds the right items (S_gl is loud noise), so only a
    # small gl:gg ratio lets stage 1 pass the right ones to a rerank of 3.
    levels = {
        "gg": truth + 0.3 * rng.standard_normal(truth.shape).astype(np.float32),
        "gl": 3.0 * rng.standard_normal(truth.shape).astype(np.float32),
        "ll": truth,
    }

    def twostage(w: dict[str, float]) -> dict[str, Any]:
        s1 = np.float32(w["gg"]) * levels["gg"] + np.float32(w["gl"]) * levels["gl"]
        full = s1 + levels["ll"]
        return recall_report(twostage_scores(s1, full, 3, axis=1), twostage_scores(s1, full, 3, axis=0))

    start = {"gg": 1.0, "gl": 1.0, "ll": 1.0}
    w_ex, rep = select_level_weights(levels, start)
    assert rep["mode"] == "exhaustive" and rep["rsum"] == 600.0
    w, rep = select_level_weights(levels, start, rerank=3)
    assert rep["mode"] == "twostage@3" and w["gl"] / w["gg"] <= 0.05 / 3.0 + 1e-9, w
    assert rep["rsum"] == twostage(w)["rsum"] > twostage(w_ex)["rsum"] + 20
    # a depth no smaller than either gallery is exhaustive
    assert select_level_weights(levels, start, rerank=200)[1]["mode"] == "exhaustive"


def test_select_level_weights_keeps_the_training_weights_on_a_tie() -> None:
    from training.evaluate import select_level_weights

    perfect = _perfect(6)
    w, rep = select_level_weights(
        {"gg": perfect, "gl": perfect, "ll": perfect}, {"gg": 0.7, "gl": 1.4, "ll": 0.7}
    )
    assert w == {"gg": 1.0, "gl": 2.0, "ll": 1.0} and rep["rsum"] == 600.0  # 0.7:1.4:0.7, scaled to ll = 1
    w, _ = select_level_weights({"gg": perfect}, {"gg": 2.0, "gl": 0.0, "ll": 0.0})
    assert w == {"gg": 1.0, "gl": 0.0, "ll": 0.0}
    with pytest.raises(ValueError, match="no level"):
        select_level_weights({}, {"gg": 0.0, "gl": 0.0, "ll": 0.0})


@pytest.mark.parametrize("k", [1, 10, 23, 60, 300])
def test_twostage_recall_equals_the_recall_of_the_reranked_matrices(k: int) -> None:
    from training.evaluate import twostage_recall

    rng = np.random.default_rng(k)
    truth = _perfect(60)
    # coarse values: many ties, in stage 1 (which items enter the top k) and in the full score
    stage1 = np.round(truth + rng.standard_normal(truth.shape), 1).astype(np.float32)
    full = np.round(stage1 + 2 * truth + rng.standard_normal(truth.shape), 1).astype(np.float32)
    want = recall_report(twostage_scores(stage1, full, k, axis=1), twostage_scores(stage1, full, k, axis=0))
    assert twostage_recall(stage1, full, k) == want


def test_select_level_weights_two_stage_choice_equals_a_brute_force_search() -> None:
    from training.evaluate import select_level_weights

    rng = np.random.default_rng(3)
    truth = _perfect(50)
    levels = {
        t: truth * a + rng.standard_normal(truth.shape).astype(np.float32)
        for t, a in (("gg", 1.0), ("gl", 0.6), ("ll", 2.0))
    }
    grid, start = (0.1, 0.5, 2.0), {"gg": 1.0, "gl": 1.0, "ll": 1.0}
    best = None
    for a, b in [(1.0, 1.0), *((a, b) for a in grid for b in grid)]:
        s1 = np.float32(a) * levels["gg"] + np.float32(b) * levels["gl"]
        full = s1 + levels["ll"]
        rsum = recall_report(twostage_scores(s1, full, 12, axis=1), twostage_scores(s1, full, 12, axis=0))[
            "rsum"
        ]
        if best is None or rsum > best[0]:
            best = (rsum, {"gg": a, "gl": b, "ll": 1.0})
    assert best is not None
    w, rep = select_level_weights(levels, start, grid=grid, rerank=12)
    assert (rep["rsum"], w) == best and rep["mode"] == "twostage@12"


def test_twostage_recall_refuses_scores_that_are_not_n_by_5n() -> None:
    from training.evaluate import twostage_recall

    s = np.zeros((20, 60), np.float32)
    with pytest.raises(ValueError, match=r"\[N, 5N\] scores, got \(20, 60\)"):
        twostage_recall(s, s, 12)
