"""Attribution metrics on hand-made cases with known values."""

import math

import numpy as np
import pytest

from montrage import metrics as M


def test_concept_scores_mean_and_topk():
    s = np.array([[1.0, 3.0, 2.0, 10.0, 0.0]])
    tc = ["a", "a", "a", "b", "b"]
    out = M.concept_scores_from_images(s, tc, ["a", "b", "c"], how="mean")
    assert out[0, :2].tolist() == [2.0, 5.0] and math.isnan(out[0, 2])
    top2 = M.concept_scores_from_images(s, tc, ["a", "b"], how="topk", k=2)
    assert top2.tolist() == [[2.5, 5.0]]
    top9 = M.concept_scores_from_images(s, tc, ["a"], how="topk", k=9)  # k beyond the concept's size: all its images
    assert top9.tolist() == [[2.0]]
    with pytest.raises(ValueError):
        M.concept_scores_from_images(s, tc, ["a"], how="median")


def test_top1_accuracy_ignores_nan():
    cs = np.array([[0.1, 0.9, np.nan], [0.8, 0.2, np.nan], [np.nan, 0.0, -1.0]])
    assert M.top1_accuracy(cs, np.array([1, 1, 1])) == pytest.approx(2 / 3)


def test_auc_perfect_reversed_ties():
    pos = np.array([[True, True, False, False]])
    assert M.mean_auc(np.array([[4.0, 3.0, 2.0, 1.0]]), pos) == 1.0
    assert M.mean_auc(np.array([[1.0, 2.0, 3.0, 4.0]]), pos) == 0.0
    assert M.mean_auc(np.ones((1, 4)), pos) == 0.5
    # one positive above one negative and tied with the other: (1 + 0.5) / 2
    assert M.roc_auc(np.array([2.0, 2.0, 1.0]), np.array([True, False, False])) == 0.75


def test_mean_auc_skips_degenerate_queries():
    s = np.array([[4.0, 3.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    pos = np.array([[True, False, False], [True, True, True], [False, False, False]])
    assert M.mean_auc(s, pos) == 1.0
    assert math.isnan(M.mean_auc(s[1:], pos[1:]))
    assert math.isnan(M.roc_auc(np.array([1.0]), np.array([True])))


def test_recall_at_k():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    pos = np.array([[True, False, True, False, False], [False, False, False, False, True]])
    # query 0: top-2 holds 1 of 2 positives -> 0.5; query 1: its single positive is last -> 0
    assert M.recall_at_k(s, pos, 2) == 0.25
    assert M.recall_at_k(s, pos, 3) == 0.5  # query 0: both positives in top 3 -> 1
    assert M.recall_at_k(s[:1], pos[:1], 1) == 1.0  # min(k, #pos) = 1
    assert math.isnan(M.recall_at_k(s[:1], np.zeros((1, 5), bool), 2))


def test_mixture_spearman():
    w = np.array([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    perfect = np.array([[2.0, 2.0, 1.0], [3.0, 2.0, 1.0], [9.0, 1.0, 1.0]])
    assert M.mixture_spearman(perfect, w) == pytest.approx(1.0)
    assert M.mixture_spearman(np.array([[1.0, 2.0, 3.0]]), w[1:2]) == pytest.approx(-1.0)
    # constant predictions or constant weights: skipped
    assert M.mixture_spearman(np.array([[1.0, 1.0, 1.0], [3.0, 2.0, 1.0]]), w[[1, 1]]) == pytest.approx(1.0)
    flat_w = np.array([[1.0, 1.0, 1.0], [0.7, 0.3, 0.0]])
    assert M.mixture_spearman(np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), flat_w) == pytest.approx(1.0)
    assert math.isnan(M.mixture_spearman(np.array([[1.0, 2.0]]), np.array([[0.5, 0.5]])))


def test_within_recall_at_k():
    s = np.array([[9.0, 1.0, 2.0, 3.0, 0.0], [9.0, 1.0, 2.0, 3.0, 0.0]])
    cand = np.array([[False, True, True, True, True]] * 2)  # image 0 is another concept's, outranking everything
    ex = np.array([[False, False, False, True, False], [False, False, True, False, False]])
    assert M.within_recall_at_k(s, ex, cand, 1) == 0.5  # query 0's exemplar is first among candidates; query 1's second
    assert M.within_recall_at_k(s, ex, cand, 2) == 1.0
    two = np.array([[False, True, False, True, False]])  # exemplars ranked 1st and 3rd among the candidates
    assert M.within_recall_at_k(s[:1], two, cand[:1], 2) == 0.5
    # an exemplar outside the candidate mask still counts as a candidate
    assert M.within_recall_at_k(s[:1], np.array([[True, False, False, False, False]]), cand[:1], 1) == 1.0


def test_within_map_known_ap():
    s = np.array([[9.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    cand = np.array([[False, True, True, True, True, True]])
    ex = np.array([[False, True, False, True, False, False]])  # ranks 1 and 3 among candidates
    assert M.within_map(s, ex, cand) == pytest.approx(0.5 * (1 / 1 + 2 / 3))
    assert M.average_precision(np.array([3.0, 2.0, 1.0]), np.array([False, False, True])) == pytest.approx(1 / 3)
    assert M.within_map(np.array([[1.0, 2.0]]), np.array([[True, True]]), np.array([[True, True]])) == 1.0
    assert math.isnan(M.within_map(s, np.zeros_like(ex), cand))


def test_tpr_at_fpr():
    y = np.array([True, True, True, True, False, False, False, False])
    assert M.tpr_at_fpr(np.arange(8.0)[::-1], y, 0.0) == 1.0  # perfect separation
    s = np.array([8.0, 7.0, 5.0, 3.0, 6.0, 4.0, 2.0, 1.0])  # order: P P N P N P N N
    assert M.tpr_at_fpr(s, y, 0.0) == 0.5
    assert M.tpr_at_fpr(s, y, 0.25) == 0.75
    assert M.tpr_at_fpr(s, y, 0.5) == 1.0
    # a positive tied with a negative cannot be taken without the negative
    assert M.tpr_at_fpr(np.array([2.0, 2.0, 1.0]), np.array([True, False, False]), 0.0) == 0.0
    assert M.tpr_at_fpr(np.array([2.0, 2.0, 1.0]), np.array([True, False, False]), 0.5) == 1.0
    assert math.isnan(M.tpr_at_fpr(np.array([1.0]), np.array([True]), 0.1))


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
