"""Metrics for membership / origin inference: AUC, TPR at a low FPR, balanced accuracy.

An attack is useful when it is right as it says "member" (TPR at 1 % and 0.1 % FPR), not only on average (AUC).
The ternary task is scored as the paper's Table 6 does: one-vs-rest curves with *member* and with *generated* as
the positive class, averaged; balanced accuracy of the predicted class. The AUC and TPR@FPR come from
`montrage.metrics` (scikit-learn's ROC, shared with the attribution benchmarks).
"""

from __future__ import annotations

import numpy as np

from montrage.metrics import roc_auc, tpr_at_fpr

__all__ = ["roc_auc", "tpr_at_fpr", "balanced_accuracy", "best_threshold", "binary_report", "ovr_report"]


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean over the classes present in y_true of the share of that class predicted correctly (chance = 1/K)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape.")
    classes = np.unique(y_true)
    if len(classes) == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def best_threshold(scores, labels) -> float:
    """The threshold of the rule `score >= thr` with the highest balanced accuracy on (scores, labels).

    For threshold attacks, chosen on the training split and then applied to the test split.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, bool).ravel()
    if y.all() or not y.any():
        raise ValueError("best_threshold needs both positives and negatives.")
    fpr, tpr, thresholds = roc_curve(y, np.asarray(scores, np.float64).ravel(), drop_intermediate=False)
    return float(thresholds[1:][int(np.argmax((tpr[1:] + 1 - fpr[1:]) / 2))])  # [0] is +inf: nobody flagged


def binary_report(scores, labels, predictions=None) -> dict:
    """{auc, tpr@1%fpr, tpr@0.1%fpr, balanced_accuracy}; higher score = positive. Without `predictions` the
    balanced accuracy is that of the best threshold on these very scores (an optimistic figure: pass predictions
    made with a threshold chosen on training data for an honest one)."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if predictions is None:
        predictions = s >= best_threshold(s, y)
    return {
        "auc": roc_auc(s, y),
        "tpr@1%fpr": tpr_at_fpr(s, y, 0.01),
        "tpr@0.1%fpr": tpr_at_fpr(s, y, 0.001),
        "balanced_accuracy": balanced_accuracy(y, np.asarray(predictions, bool).ravel()),
    }


def ovr_report(proba, y_true, classes, positives=("member", "generated")) -> dict:
    """Multi-class probabilities (N, K) -> one-vs-rest AUC / TPR@FPR averaged over the `positives` present in
    `classes`, balanced accuracy of the argmax, and the per-positive figures under `per_class`."""
    proba = np.asarray(proba, np.float64)
    classes = list(classes)
    y_true = np.asarray(y_true)
    pos = [c for c in positives if c in classes] or classes
    per = {}
    for c in pos:
        k = classes.index(c)
        per[c] = {
            "auc": roc_auc(proba[:, k], y_true == c),
            "tpr@1%fpr": tpr_at_fpr(proba[:, k], y_true == c, 0.01),
            "tpr@0.1%fpr": tpr_at_fpr(proba[:, k], y_true == c, 0.001),
        }
    pred = np.asarray(classes)[np.argmax(proba, axis=1)]
    out = {key: float(np.mean([per[c][key] for c in pos])) for key in ("auc", "tpr@1%fpr", "tpr@0.1%fpr")}
    out["balanced_accuracy"] = balanced_accuracy(y_true, pred)
    out["per_class"] = per
    return out
