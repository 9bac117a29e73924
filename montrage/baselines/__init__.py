"""Data-attribution baselines that score query images against training images: (Q, N), higher = more influential.

`pixel_cosine` compares pixels; `lora_gradient_features` + `trak_scores` / `tracin_scores` / `datainf_scores`
compare projected per-sample gradients of the LoRA parameters (TRAK, D-TRAK, TracIn, DataInf).
"""

from montrage.baselines.gradients import (
    GaussianProjection,
    datainf_scores,
    lora_gradient_features,
    tracin_scores,
    trainable_parameters,
    trak_scores,
)
from montrage.baselines.pixel import pixel_cosine

__all__ = [
    "GaussianProjection",
    "datainf_scores",
    "lora_gradient_features",
    "pixel_cosine",
    "tracin_scores",
    "trainable_parameters",
    "trak_scores",
]
