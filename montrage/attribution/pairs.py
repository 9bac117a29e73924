"""The attribution table: features of (query, training image) pairs over the monitored epochs.

For each layer and timestep (and for all timesteps of a layer side by side), with representations centred on the
epoch's mean training representation:
  level_e   = (1 + cos(h_e(q), h_e(x))) / 2                  for every stored epoch e
  change_e  = (1 + cos(dh_e(q), dh_e(x))) / 2,  dh_e = h_e - h_{e-1}
  spearman  = rank correlation of the two change trajectories (all epochs and features flattened)
The final-epoch-only table (the post-hoc baseline that monitoring must beat) keeps level_E alone.
Training images are streamed from the store in blocks, so memory stays bounded for large runs.
"""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
from scipy.stats import rankdata

Mode = Literal["trajectory", "final"]


def _unit(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _scos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shifted cosine of unit rows: a (E, Q, F), b (E, N, F) -> (E, Q, N)."""
    return (1.0 + np.stack([x @ y.T for x, y in zip(a, b)])) / 2.0  # one BLAS product per epoch: 5x einsum


def _ranked(x: np.ndarray) -> np.ndarray:
    """Rows of x (n, D) replaced by their centred, unit-norm ranks (so dot products are Spearman correlations)."""
    r = rankdata(x, axis=1).astype(np.float32)
    return _unit(r - r.mean(axis=1, keepdims=True))


def _views(feats: np.ndarray) -> list[np.ndarray]:
    """(E, n, T, F) -> per-timestep views (E, n, F) plus all timesteps concatenated."""
    E, n, T, F = feats.shape
    return [feats[:, :, t] for t in range(T)] + ([feats.reshape(E, n, T * F)] if T > 1 else [])


def final_side(final: dict[str, np.ndarray], centre: dict[str, np.ndarray]) -> dict:
    """{(layer, view): centred unit rows (n, F_v)} of one side of the final-epoch table, from final-snapshot features
    {layer: (n, T, F)} (`centre`'s last epoch is subtracted). Preparing a side once lets many queries reuse it (the
    index keeps every image's)."""
    out = {}
    for layer, x in final.items():
        c = x.astype(np.float32) - centre[layer][-1]
        for v, cv in enumerate(_views(c[None])):
            out[(layer, v)] = _unit(cv[0])
    return out


def final_features(q: dict, t: dict) -> np.ndarray:
    """(Q, N, V) the final-epoch table (level_final per view) of two prepared sides (`final_side`)."""
    return np.stack([(1.0 + q[k] @ t[k].T) / 2.0 for k in q], axis=-1).astype(np.float32)


def _ranked_changes(d: np.ndarray) -> np.ndarray:
    """(E-1, n, F) changes -> (n, (E-1) F) ranked change trajectories (`_ranked`)."""
    return _ranked(d.transpose(1, 0, 2).reshape(d.shape[1], -1))


def feature_names(layers: list[str], timesteps: list[int], num_epochs: int, mode: Mode) -> list[str]:
    names = []
    for layer in layers:
        views = [f"t{t}" for t in timesteps] + (["tall"] if len(timesteps) > 1 else [])
        for v in views:
            if mode == "final":
                names.append(f"{layer}/{v}/level_final")
                continue
            names += [f"{layer}/{v}/level_e{e}" for e in range(num_epochs)]
            names += [f"{layer}/{v}/change_e{e}" for e in range(1, num_epochs)]
            names.append(f"{layer}/{v}/spearman")
    return names


def train_ranks(train: dict[str, np.ndarray], centre: dict[str, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """{(layer, view): (n, D)} the training side's ranked change trajectories, the costly part of `pair_features`
    (computed once per training image at fit time for large stores)."""
    out = {}
    for layer, x in train.items():
        t = x.astype(np.float32) - centre[layer][:, None]
        for v, tv in enumerate(_views(t)):
            dt = np.diff(tv, axis=0)
            out[(layer, v)] = _ranked_changes(dt) if len(dt) else None
    return out


def trajectory_side(feats: dict[str, np.ndarray], centre: dict[str, np.ndarray], ranks: dict | None = None) -> dict:
    """{(layer, view): (unit levels (E, n, F), unit changes (E-1, n, F), ranked changes (n, D) or None)} of one side
    of the trajectory table, from trajectories {layer: (E, n, T, F)}; `ranks`: the side's `train_ranks`, if known.
    Preparing a side once lets many queries reuse it (the index keeps its reference sample's)."""
    out = {}
    for layer, x in feats.items():
        c = x.astype(np.float32) - centre[layer][:, None]
        for v, cv in enumerate(_views(c)):
            d = np.diff(cv, axis=0)
            if not len(d):
                r = None
            else:
                r = ranks[(layer, v)].astype(np.float32) if ranks is not None else _ranked_changes(d)
            out[(layer, v)] = (_unit(cv), _unit(d), r)
    return out


def side_features(q: dict, t: dict) -> np.ndarray:
    """(Q, N, D) trajectory pair features of two prepared sides (`trajectory_side`)."""
    blocks = []
    for key, (ql, qc, qr) in q.items():
        tl, tc, tr = t[key]
        level = _scos(ql, tl)  # (E, Q, N)
        Q, N = level.shape[1:]
        change = _scos(qc, tc) if len(qc) else np.zeros((0, Q, N), np.float32)
        spear = qr @ tr.T if qr is not None else np.zeros((Q, N), np.float32)
        blocks += [level.transpose(1, 2, 0), change.transpose(1, 2, 0), spear[..., None]]
    return np.concatenate(blocks, axis=-1).astype(np.float32)


def pair_features(
    queries: dict[str, np.ndarray],
    train: dict[str, np.ndarray],
    centre: dict[str, np.ndarray],
    mode: Mode = "trajectory",
    ranks: dict | None = None,
) -> np.ndarray:
    """(Q, N, D) pair features from query and training trajectories {layer: (E, n, T, F)}.

    `centre` {layer: (E, T, F)} is subtracted from both sides (the mean training representation per epoch).
    `ranks`: the training side's `train_ranks`, if already computed.
    """
    if mode == "final":
        return final_features(
            final_side({k: v[-1] for k, v in queries.items()}, centre),
            final_side({k: train[k][-1] for k in queries}, centre),
        )
    return side_features(
        trajectory_side(queries, centre), trajectory_side({k: train[k] for k in queries}, centre, ranks)
    )


def iter_train_blocks(store, block: int = 4096, layers: list[str] | None = None) -> Iterator[tuple[slice, dict]]:
    """Training trajectories {layer: (E, rows, T, F)} read from the store `block` images at a time."""
    layers = layers or store.layers
    n = store.num_train
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        yield rows, {layer: store.train_features(layer, rows) for layer in layers}


def train_centre(store, block: int = 4096) -> dict[str, np.ndarray]:
    """Mean training representation per epoch {layer: (E, T, F)}, accumulated block by block."""
    total, count = {}, 0
    for rows, feats in iter_train_blocks(store, block):
        for layer, x in feats.items():
            total[layer] = total.get(layer, 0.0) + x.sum(axis=1, dtype=np.float64)
        count += rows.stop - rows.start
    return {layer: (v / max(count, 1)).astype(np.float32) for layer, v in total.items()}


def per_query_standardize(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Append features standardized over the training images of each query (Q, N, D) -> (Q, N, 2D).

    Relative features ("this image is unusually similar *for this query*") transfer across queries whose overall
    similarity level differs. `stats` (mean, std) of shape (Q, 1, D) may come from an earlier pass over all blocks.
    """
    mean, std = stats if stats is not None else (x.mean(axis=1, keepdims=True), x.std(axis=1, keepdims=True))
    return np.concatenate([x, (x - mean) / (std + 1e-6)], axis=-1)
