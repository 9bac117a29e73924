"""Model attribution: which of K candidate models generated an image (or none of them)?

Each image is scored under every candidate with the same feature spec; a model is "at home" on its own samples
along the whole trajectory, so the concatenation [features under model 1 | ... | model K] feeds one linear softmax
whose classes are the candidates' names (plus, optionally, a class for real / other images). A training-free
rule, `lowest_loss_attribution`, picks the candidate with the lowest mean log-loss (and "none" above a threshold
fit on labelled images, `fit_none_threshold`).
"""

from __future__ import annotations

import os

import numpy as np

from montrage.origin.classifier import JSON_NAME, LogisticModel, feature_matrix, load_logistic, save_logistic
from montrage.origin.errors import OriginError
from montrage.origin.feature_set import FAMILIES, FeatureSet, FeatureSpec
from montrage.origin.model import check_same_model


def _check_aligned(per_candidate: list[FeatureSet], n_candidates: int) -> None:
    if len(per_candidate) != n_candidates:
        raise OriginError(
            f"{len(per_candidate)} feature sets for {n_candidates} candidate models: give the images' "
            "features under every candidate, in the candidates' order."
        )
    ids = per_candidate[0].ids
    for fs in per_candidate[1:]:
        if fs.ids != ids:
            raise OriginError(
                "the candidates' feature sets hold different images (ids differ): compute them on the "
                "same images in the same order."
            )


def candidate_losses(per_candidate: list[FeatureSet]) -> np.ndarray:
    """(N, K) mean log-loss of each image over the timestep grid under each candidate."""
    _check_aligned(per_candidate, len(per_candidate))
    return np.stack([np.log(np.maximum(fs.values["loss"], 1e-30)).mean(axis=1) for fs in per_candidate], axis=1)


def lowest_loss_attribution(per_candidate: list[FeatureSet], none_above: float | None = None) -> np.ndarray:
    """Index of the candidate with the lowest mean log-loss over the timestep grid, per image (no training); with
    `none_above`, -1 ("none of them") where even the lowest is above it (see `fit_none_threshold`)."""
    scores = candidate_losses(per_candidate)
    pick = np.argmin(scores, axis=1)
    if none_above is not None:
        pick = np.where(scores.min(axis=1) > none_above, -1, pick)
    return pick


def fit_none_threshold(per_candidate: list[FeatureSet], labels, candidates: list[str]) -> float:
    """The `none_above` of `lowest_loss_attribution` with the best balanced accuracy on labelled images (a
    candidate's name for its generations, anything else for "none")."""
    from montrage.origin.metrics import balanced_accuracy

    labels = np.asarray([str(v) if str(v) in candidates else "none" for v in labels])
    scores = candidate_losses(per_candidate)
    names = np.asarray(list(candidates) + ["none"])
    pick, low = np.argmin(scores, axis=1), scores.min(axis=1)
    best, best_tau = -1.0, float(np.max(low))
    for tau in np.unique(low):
        acc = balanced_accuracy(labels, names[np.where(low > tau, -1, pick)])
        if acc > best:
            best, best_tau = acc, float(tau)
    return best_tau


class ModelAttributor:
    """Linear softmax over the concatenated features under K candidates; classes are candidate names and any other
    labels seen in training (e.g. "external" for real images).

    `relative=True` feeds [mean over candidates | each candidate minus that mean | each candidate's mean log-loss
    over t minus the mean of those] instead: an image's own difficulty, which every candidate sees, sits in the
    mean; the standardised, regularised logistic model reads "which candidate is at home" from the differences, and the last
    K columns are the lowest-loss rule's statistic, one strong column per candidate instead of one per t."""

    def __init__(
        self,
        candidates: list[str],
        families=FAMILIES,
        transform: str = "log",
        C: float | str = 1.0,
        relative: bool = False,
    ):
        if len(candidates) < 1 or len(set(candidates)) != len(candidates):
            raise OriginError(f"candidate names must be unique and non-empty, got {candidates}.")
        self.candidates = list(candidates)
        self.families, self.transform, self.relative = tuple(families), transform, bool(relative)
        if self.relative and "loss" not in self.families:
            raise OriginError("relative=True adds each candidate's relative mean log-loss: include the loss family.")
        self.logistic = LogisticModel(C=C)
        self.identities: list[dict] = []
        self.spec: FeatureSpec | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.logistic.classes)

    def _matrix(self, per_candidate: list[FeatureSet]) -> np.ndarray:
        _check_aligned(per_candidate, len(self.candidates))
        if self.identities:
            for name, ident, fs in zip(self.candidates, self.identities, per_candidate):
                check_same_model(
                    ident,
                    fs.identity,
                    f"the attributor's candidate {name!r}",
                    "Pass the features under the candidates in the order they were trained with.",
                )
                if not self.spec.compatible(fs.spec):
                    raise OriginError(
                        f"features under {name!r} use spec {fs.spec.to_dict()}, but the attributor "
                        f"expects {self.spec.to_dict()}."
                    )
        blocks = [feature_matrix(fs, self.families, self.transform)[0] for fs in per_candidate]
        if self.relative:
            mean = np.mean(blocks, axis=0)
            losses = candidate_losses(per_candidate)
            blocks = [mean] + [b - mean for b in blocks] + [losses - losses.mean(axis=1, keepdims=True)]
        return np.concatenate(blocks, axis=1)

    def fit(self, per_candidate: list[FeatureSet], labels) -> "ModelAttributor":
        """`per_candidate[k]`: features of the N training images under candidate k; `labels`: N names (a candidate's
        name for its generations, anything else for other images)."""
        X = self._matrix(per_candidate)
        labels = np.asarray([str(v) for v in labels])
        if len(labels) != len(X):
            raise OriginError(f"{len(labels)} labels for {len(X)} images.")
        self.logistic.fit(X, labels)
        self.identities = [dict(fs.identity) for fs in per_candidate]
        self.spec = per_candidate[0].spec
        return self

    def predict_proba(self, per_candidate: list[FeatureSet]) -> np.ndarray:
        return self.logistic.predict_proba(self._matrix(per_candidate))

    def predict(self, per_candidate: list[FeatureSet]) -> np.ndarray:
        return self.logistic.predict(self._matrix(per_candidate))

    def save(self, folder: str) -> str:
        if self.spec is None:
            raise OriginError("the attributor is not fitted: nothing to save.")
        meta = {
            "kind": "model_attribution",
            "candidates": self.candidates,
            "families": list(self.families),
            "transform": self.transform,
            "relative": self.relative,
            "spec": self.spec.to_dict(),
            "identities": self.identities,
        }
        return save_logistic(folder, meta, self.logistic)

    @classmethod
    def load(cls, folder: str) -> "ModelAttributor":
        meta, logistic = load_logistic(folder, "model_attribution")
        where = os.path.join(folder, JSON_NAME)
        try:
            att = cls(
                meta["candidates"],
                families=meta["families"],
                transform=meta["transform"],
                C=logistic.C,
                relative=meta.get("relative", False),
            )
            att.spec = FeatureSpec.from_dict(meta["spec"])
            att.identities = [dict(i) for i in meta["identities"]]
        except (KeyError, TypeError) as err:
            raise OriginError(f"attributor file {where!r}: field {err} is missing or invalid; refit it.") from err
        if len(att.identities) != len(att.candidates):
            raise OriginError(
                f"attributor file {where!r}: {len(att.identities)} identities for "
                f"{len(att.candidates)} candidates; refit it."
            )
        K = len(att.candidates)
        expected = (K + att.relative) * sum(len(att.spec.columns(f)) for f in att.families) + K * att.relative
        if len(logistic.mean) != expected:
            raise OriginError(
                f"attributor file {where!r}: {len(logistic.mean)} features in the arrays, expected "
                f"{expected}; the files do not belong together, refit it."
            )
        att.logistic = logistic
        return att
