"""Attribution curves: per stored epoch, how much each training concept influences each probe generation.

Uses the final-epoch ("fast") attribution model, whose inputs do not depend on how many epochs exist: at stored
epoch e it scores the probe generations of epoch e against the training images of epoch e, both as the callback
stored them (encoded with that epoch's weights). Nothing is re-encoded, so the curves are cheap enough to refresh
during training. The model comes from `montrage attribute fit` (`<store>_attribution/final`), from an earlier run
with the same layers and timesteps, or is fitted here on the store so far (`fit_live_model`).
"""

from __future__ import annotations

import os

import numpy as np

from montrage.attribution.fit import check_fittable, default_model_dir, fit_model
from montrage.attribution.model import AttributionModel, AttributionModelError
from montrage.attribution.pairs import feature_names, pair_features, per_query_standardize
from montrage.store import StoreError, StoreReader


def live_model_dir(store_path: str) -> str:
    """Where live fits (the AttributionCurves callback) keep their model, beside `<store>_attribution`."""
    return os.path.splitext(store_path)[0] + "_attribution_live"


def _features(store: StoreReader, epochs: slice = slice(None)) -> tuple[dict, dict]:
    """Probe and training features per layer, (E, P, T, F) and (E, N, T, F), of the stored epoch rows `epochs`."""
    return (
        {layer: store.probe_features(layer, epochs) for layer in store.layers},
        {layer: store.train_features(layer, epochs=epochs) for layer in store.layers},
    )


def _epoch_table(probe: dict, train: dict, row: int) -> np.ndarray:
    """(P, N, 2D) final-mode features of the probes of epoch row `row` of `probe` against that row's training images."""
    q = {layer: v[row : row + 1] for layer, v in probe.items()}
    t = {layer: v[row : row + 1] for layer, v in train.items()}
    centre = {layer: v.mean(axis=1) for layer, v in t.items()}
    return per_query_standardize(pair_features(q, t, centre, "final"))


def fit_live_model(store: StoreReader, steps: int = 200, seed: int = 0) -> AttributionModel:
    """The final-epoch attribution model fitted on the store's last epoch (probes against their ground truth).

    Same construction as `montrage attribute fit`'s final model, but on the probe features the callback stored
    instead of regenerated ones, so it needs no model and no re-encoding.
    """
    check_fittable(store)
    train = store.train
    y = np.array(store.probes.ground_truth([e.concept for e in train], [e.id for e in train]), np.float32)
    model, _ = fit_model(_epoch_table(*_features(store, slice(-1, None)), 0), y, steps=steps, seed=seed)
    return model


def load_final_model(store: StoreReader, model_dir: str | None = None) -> AttributionModel:
    """The final-epoch model in `model_dir` (default `<store>_attribution`), checked against the store's layout."""
    model_dir = model_dir or default_model_dir(store.path)
    path = os.path.join(model_dir, "final")
    model, meta = AttributionModel.load(path)
    want = feature_names(store.layers, store.timesteps, store.num_epochs, "final")
    if meta.get("feature_names") != want:
        raise AttributionModelError(
            f"attribution model {path!r} reads features {meta.get('feature_names')} but store {store.path!r} provides "
            f"{want} (layers {store.layers}, timesteps {store.timesteps}); fit it on a store monitored with the same "
            "layers and timesteps, or let montrage fit one on this store."
        )
    return model


def attribution_curves(store: StoreReader, model: AttributionModel, top_k: int = 5) -> dict:
    """Concept scores of every probe at every stored epoch, and each probe's top-K training images at the last.

    Returns `scores` (E, P, C) mean image score per concept, `concepts`, `epochs`, and `top` (P, K) training-image
    indices with `top_scores` (P, K) at the last stored epoch.
    """
    probe, train_feats = _features(store)
    train = store.train
    concepts = sorted({e.concept for e in train})
    labels = np.array([e.concept for e in train])
    E = store.num_epochs
    if E == 0:
        raise StoreError(f"store {store.path!r} holds no complete epoch yet.")
    scores = np.zeros((E, len(store.probes), len(concepts)), np.float32)
    for row in range(E):
        s = model.score(_epoch_table(probe, train_feats, row)).numpy()  # (P, N)
        scores[row] = np.stack([s[:, labels == c].mean(axis=1) for c in concepts], axis=1)
    k = min(top_k, len(train))
    top = np.argsort(-s, axis=1)[:, :k]
    return {
        "scores": scores,
        "concepts": concepts,
        "epochs": [int(e) for e in store.epochs],
        "top": top,
        "top_scores": np.take_along_axis(s, top, axis=1),
    }
