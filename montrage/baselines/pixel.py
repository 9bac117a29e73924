"""Pixel-space baseline: how alike the query and training images look, with no model at all."""

from __future__ import annotations

import numpy as np
import torch


def _centred_unit_rows(pixels: torch.Tensor, eps: float) -> torch.Tensor:
    x = pixels.detach().reshape(len(pixels), -1).double().cpu()
    x = x - x.mean(dim=1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + eps)


def pixel_cosine(query_pixels: torch.Tensor, train_pixels: torch.Tensor, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity (Q, N) of flattened, per-image mean-centred pixels of images in [-1, 1].

    The floor every attribution method must beat: a training image that merely looks like the query scores high.
    Centring removes each image's overall brightness, so the score is about structure; a constant image scores 0.
    """
    if query_pixels.shape[1:] != train_pixels.shape[1:]:
        raise ValueError(
            f"query images {tuple(query_pixels.shape[1:])} and training images "
            f"{tuple(train_pixels.shape[1:])} differ in shape; resize them first."
        )
    return (_centred_unit_rows(query_pixels, eps) @ _centred_unit_rows(train_pixels, eps).T).numpy()
