"""Origin attribution: is an image a training member, a generation of this model, or external? Which model made it?

Following Floros et al., "Tracing the Roots" (NeurIPS 2025): per-timestep loss and gradient norms along the whole
diffusion trajectory (`features`; montrage adds PIA-noise losses and, for adapters, the same measures under the
base model), standardised and fed to a linear softmax classifier (`classifier`); the same
features under several candidate models attribute a generation to its model (`model_attribution`). The paper's
baselines (`baselines`) and metrics (`metrics`) come with it; `cli` holds the `montrage origin` commands.

Names are imported lazily, so `montrage --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OriginError": "montrage.origin.errors",
    "DiffusionModel": "montrage.components",
    "load_diffusion_model": "montrage.origin.model",
    "same_model": "montrage.origin.model",
    "load_images": "montrage.origin.images",
    "FeatureSpec": "montrage.origin.feature_set",
    "FeatureSet": "montrage.origin.feature_set",
    "default_timesteps": "montrage.origin.feature_set",
    "default_families": "montrage.origin.feature_set",
    "trajectory_features": "montrage.origin.features",
    "write_features": "montrage.origin.featurefile",
    "read_features": "montrage.origin.featurefile",
    "LogisticModel": "montrage.origin.classifier",
    "OriginClassifier": "montrage.origin.classifier",
    "ModelAttributor": "montrage.origin.model_attribution",
    "predict_images": "montrage.origin.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'montrage.origin' has no attribute {name!r}")
