"""Attribution metrics: how well per-image or per-concept scores recover the ground truth.

AUC, average precision and ROC points are scikit-learn's; what it lacks (top-k masks, per-query means, concept
aggregation, recall and mAP among a query's candidates) is here. Conventions: `scores` are "higher = more
influential"; Q = queries, N = training images, C = concepts. Top-k breaks ties by index (a stable sort); the AUCs
count ties half, average precision takes tied scores together (scikit-learn). Queries a metric is undefined for
(no positives, constant scores, ...) are skipped; a metric with no valid query is NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k highest scores of a 1-D array (ties broken by index, so exactly min(k, n) are set)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:k]] = True
    return mask


def concept_scores_from_images(
    image_scores: np.ndarray, train_concepts: list[str], concepts: list[str], how: str = "mean", k: int = 3
) -> np.ndarray:
    """Per-concept scores (Q, C) from per-image scores (Q, N), so image-level methods compete at concept level.

    `how="mean"` averages a concept's images; `how="topk"` averages its k best images (a concept that influenced a
    generation through a few images is not drowned by its other images). Concepts without images get NaN.
    """
    s = np.asarray(image_scores, dtype=np.float64)
    labels = np.asarray(train_concepts)
    out = np.full((s.shape[0], len(concepts)), np.nan)
    for j, c in enumerate(concepts):
        cols = s[:, labels == c]
        if cols.shape[1] == 0:
            continue
        if how == "mean":
            out[:, j] = cols.mean(axis=1)
        elif how == "topk":
            out[:, j] = -np.sort(-cols, axis=1)[:, :k].mean(axis=1)
        else:
            raise ValueError(f"how must be 'mean' or 'topk', not {how!r}")
    return out


def top1_accuracy(concept_scores: np.ndarray, true_concept: np.ndarray) -> float:
    """Share of queries whose best-scored concept (NaN = never chosen) is the true one."""
    s = np.where(np.isnan(concept_scores), -np.inf, np.asarray(concept_scores, dtype=np.float64))
    return float(np.mean(np.argmax(s, axis=1) == np.asarray(true_concept)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC (ties count half); NaN if one class is empty."""
    y = np.asarray(labels, dtype=bool).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64).ravel()))


def mean_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mean over queries of the ROC AUC of a query's positive training images against its negatives."""
    aucs = [roc_auc(s, p) for s, p in zip(np.asarray(scores), np.asarray(positives, dtype=bool))]
    return _mean_or_nan([a for a in aucs if not np.isnan(a)])


def recall_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Mean over queries with positives of (#positives in top k) / min(k, #positives); 1 = the best possible top k."""
    vals = []
    for s, p in zip(np.asarray(scores), np.asarray(positives, dtype=bool)):
        if p.any():
            vals.append((_top_k_mask(s, k) & p).sum() / min(k, int(p.sum())))
    return _mean_or_nan(vals)


def mixture_spearman(concept_scores: np.ndarray, weights: np.ndarray) -> float:
    """Mean Spearman correlation between predicted concept scores and the true mixture weights of each query.

    Measures whether a method orders the concepts of a mixed generation by their share; queries where either side
    is constant (correlation undefined) are skipped.
    """
    vals = []
    for s, w in zip(np.asarray(concept_scores, dtype=np.float64), np.asarray(weights, dtype=np.float64)):
        if np.ptp(s) == 0 or np.ptp(w) == 0:
            continue
        vals.append(float(spearmanr(s, w).statistic))
    return _mean_or_nan(vals)


def within_recall_at_k(scores: np.ndarray, exemplar: np.ndarray, candidates: np.ndarray, k: int) -> float:
    """Recall@k of a query's exemplar image(s) when only its candidates (e.g. its concept's images) are ranked.

    Tests image-level attribution after the concept is known: per query, #exemplars in the top k of the candidates
    / min(k, #exemplars) (1 or 0 for a single exemplar); exemplars always count as candidates.
    """
    vals = []
    for s, e, c in zip(np.asarray(scores), np.asarray(exemplar, dtype=bool), np.asarray(candidates, dtype=bool)):
        if not e.any():
            continue
        cand = c | e
        top = _top_k_mask(s[cand], k)
        vals.append((top & e[cand]).sum() / min(k, int(e.sum())))
    return _mean_or_nan(vals)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of the relevant items (scikit-learn's); NaN if none is relevant."""
    rel = np.asarray(relevant, dtype=bool).ravel()
    if not rel.any():
        return float("nan")
    return float(average_precision_score(rel, np.asarray(scores, dtype=np.float64).ravel()))


def within_map(scores: np.ndarray, exemplar: np.ndarray, candidates: np.ndarray) -> float:
    """Mean average precision of each query's exemplar(s) ranked among its candidates (exemplars are candidates)."""
    vals = []
    for s, e, c in zip(np.asarray(scores), np.asarray(exemplar, dtype=bool), np.asarray(candidates, dtype=bool)):
        if e.any():
            cand = c | e
            vals.append(average_precision(s[cand], e[cand]))
    return _mean_or_nan(vals)


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Highest true-positive rate of a threshold rule `score >= thr` whose false-positive rate is <= `fpr`.

    The low-FPR operating point used for membership / origin inference (an attack must be right when it says yes).
    NaN if one class is empty.
    """
    y = np.asarray(labels, dtype=bool).ravel()
    if y.all() or not y.any():
        return float("nan")
    fprs, tprs, _ = roc_curve(y, np.asarray(scores, dtype=np.float64).ravel(), drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())
