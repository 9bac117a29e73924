"""Shifted cosine similarity and the per-concept similarity curves drawn during and after a run."""

from __future__ import annotations

import numpy as np


def shifted_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(1 + cos) / 2 between rows of a (n, d) and b (m, d) -> (n, m) in [0, 1]."""
    a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + eps)
    b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + eps)
    return (1.0 + a @ b.T) / 2.0


def flatten_features(x: np.ndarray) -> np.ndarray:
    """(..., T, F) -> (..., T*F): all timesteps of one layer side by side."""
    return x.reshape(*x.shape[:-2], -1)


def concept_similarity(
    probe: np.ndarray, train: np.ndarray, train_concepts: list[str], concepts: list[str]
) -> np.ndarray:
    """Mean shifted cosine of each probe (P, D) to the training images (N, D) of each concept -> (P, len(concepts))."""
    sim = shifted_cosine(probe, train)
    labels = np.asarray(train_concepts)
    out = np.full((len(probe), len(concepts)), np.nan, dtype=np.float64)
    for j, c in enumerate(concepts):
        mask = labels == c
        if mask.any():
            out[:, j] = sim[:, mask].mean(axis=1)
    return out


def concept_curves(
    probe_feats: np.ndarray,
    train_feats: np.ndarray,
    probe_concepts: list[str],
    train_concepts: list[str],
    concepts: list[str],
    centre: bool = False,
) -> np.ndarray:
    """Curves (E, probe concept, train concept): per epoch, mean over a concept's probes of `concept_similarity`.

    probe_feats (E, P, T, F) and train_feats (E, N, T, F) of one layer. `centre` subtracts the epoch's mean
    training feature first, which removes the component all images share and makes concepts stand apart.
    """
    E = probe_feats.shape[0]
    pc = np.asarray(probe_concepts)
    out = np.full((E, len(concepts), len(concepts)), np.nan)
    for e in range(E):
        p, t = flatten_features(probe_feats[e]), flatten_features(train_feats[e])
        if centre:
            mu = t.mean(axis=0, keepdims=True)
            p, t = p - mu, t - mu
        sim = concept_similarity(p, t, train_concepts, concepts)
        for i, c in enumerate(concepts):
            if (pc == c).any():
                out[e, i] = sim[pc == c].mean(axis=0)
    return out
