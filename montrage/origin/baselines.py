"""The baselines origin attribution must beat (Tracing the Roots, Section 5):

- `ThresholdAttack` (Matsumoto et al. 2023): "member" iff the loss at one timestep is below a threshold; t and the
  threshold are chosen on training data. Shows failure 1: a model's own generations have the lowest loss of all.
- PIA (Kong et al. 2024): the same rule on losses computed with the deterministic noise ε_θ(x, 0) (`pia_spec`).
- GSA-style gradients (Pang et al. 2025, GSA₂): per parameter tensor, the squared gradient norm averaged over t
  (`gsa_spec` + `gsa_features`), fed to the same logistic model.
- CLiD (Zhai et al. 2024): the same rule on the conditional likelihood discrepancy (`clid_spec` + `clid_losses`):
  an image's loss under its own caption minus its loss under the null and a perturbed caption.
- Model-blind (`pixel_features`): the logistic model on raw pixels, which says how much of a result is dataset
  shift rather than anything the model knows.
"""

from __future__ import annotations

import numpy as np
import torch

from montrage.origin.errors import OriginError
from montrage.origin.feature_set import CLID_FAMILIES, FeatureSet, FeatureSpec
from montrage.origin.metrics import best_threshold, roc_auc


class ThresholdAttack:
    """Member iff loss_t <= τ at one timestep t. `fit` picks t by training AUC (members vs the rest) and τ by
    training balanced accuracy; scores are -loss_t (higher = more member-like)."""

    def __init__(self):
        self.index: int | None = None
        self.t: int | None = None
        self.threshold: float | None = None
        self.train_auc: dict[int, float] = {}

    def fit(self, losses: np.ndarray, is_member, timesteps) -> "ThresholdAttack":
        losses = np.asarray(losses, np.float64)
        y = np.asarray(is_member, bool)
        timesteps = [int(t) for t in timesteps]
        if losses.shape != (len(y), len(timesteps)):
            raise OriginError(f"losses {losses.shape} do not fit {len(y)} labels x {len(timesteps)} timesteps.")
        self.train_auc = {t: roc_auc(-losses[:, j], y) for j, t in enumerate(timesteps)}
        aucs = np.nan_to_num(np.array(list(self.train_auc.values())), nan=-1.0)
        self.index = int(np.argmax(aucs))
        self.t = timesteps[self.index]
        self.threshold = best_threshold(-losses[:, self.index], y)
        return self

    def score(self, losses: np.ndarray) -> np.ndarray:
        if self.index is None:
            raise OriginError("the threshold attack is not fitted: call fit() first.")
        return -np.asarray(losses, np.float64)[:, self.index]

    def predict(self, losses: np.ndarray) -> np.ndarray:
        return self.score(losses) >= self.threshold


def pia_spec(timesteps, prompt: str = "") -> FeatureSpec:
    """Losses with PIA's deterministic noise ε = ε_θ(x, 0), at each of `timesteps`."""
    return FeatureSpec(tuple(timesteps), families=("loss",), noise="pia", prompt=prompt)


def clid_spec(timesteps, draws: int = 1) -> FeatureSpec:
    """CLiD's discrepancies under the null and a perturbed caption at each of `timesteps` (needs captions)."""
    return FeatureSpec(tuple(timesteps), families=CLID_FAMILIES, draws=draws)


def clid_losses(fs: FeatureSet) -> np.ndarray:
    """(N, T) the mean of the CLiD discrepancies present: lower = the caption helps more = more member-like, so it
    takes `ThresholdAttack`'s place of the loss."""
    present = [f for f in CLID_FAMILIES if f in fs.values]
    if not present:
        raise OriginError(
            f"these features hold no CLiD family ({', '.join(CLID_FAMILIES)}): compute them with "
            "`clid_spec` and the images' captions."
        )
    return np.mean([fs.values[f].astype(np.float64) for f in present], axis=0)


def gsa_spec(timesteps, params="all", prompt: str = "") -> FeatureSpec:
    """Per-parameter-tensor squared gradient norms (and the totals) at each of `timesteps`."""
    return FeatureSpec(
        tuple(timesteps), families=("loss", "grad_theta"), params=params, prompt=prompt, layer_norms=True
    )


def gsa_features(fs: FeatureSet) -> tuple[np.ndarray, list[str]]:
    """GSA₂'s features: log of the per-tensor squared gradient norm averaged over the timesteps, (N, G)."""
    if fs.layer_norms is None:
        raise OriginError(
            "these features hold no per-tensor gradient norms: compute them with layer_norms=True (`gsa_spec`)."
        )
    return np.log(np.maximum(fs.layer_norms.astype(np.float64).mean(axis=1), 1e-30)), list(fs.layer_names or [])


def pixel_features(images: torch.Tensor) -> np.ndarray:
    """Flattened pixels (N, C*H*W): the model-blind baseline's input."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        raise OriginError("pixel_features needs a non-empty (N, C, H, W) tensor of images.")
    return images.detach().float().reshape(len(images), -1).cpu().numpy().astype(np.float64)
