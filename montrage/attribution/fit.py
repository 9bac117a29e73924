"""Fit the attribution model on the store's probes (ground truth known by construction).

The probes' final generations are regenerated from the final adapter snapshot and re-encoded with every stored
epoch's weights, so that probes, training images and later queries all live in one representation space: a fixed
image seen through the model's changing weights.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from montrage.attribution.model import AttributionModel, AttributionModelError, Loss, ensemble_loss
from montrage.attribution.pairs import (
    Mode,
    feature_names,
    iter_train_blocks,
    pair_features,
    per_query_standardize,
    train_centre,
)
from montrage.encode import stable_seed
from montrage.probes import probe_noise_key
from montrage.store import StoreError, StoreReader
from montrage.store_model import StoreModel

MODES: tuple[Mode, ...] = ("trajectory", "final")
STREAM_PAIRS = 1 << 17  # (probe, image) pairs above which the fit streams mini-batches
LOSS: Loss = "scos+rank"
MEMBERS = 5


def default_model_dir(store_path: str) -> str:
    return os.path.splitext(store_path)[0] + "_attribution"


def model_meta(store: StoreReader, mode: Mode, **extra) -> dict:
    """What an attribution model records about the store it was fitted on (checked by `check_model_meta`)."""
    return {
        "mode": mode,
        "feature_names": feature_names(store.layers, store.timesteps, store.num_epochs, mode),
        "store_identity": store.spec["identity"],
        "num_epochs": store.num_epochs,
        **extra,
    }


def check_model_meta(meta: dict, store: StoreReader, where: str) -> None:
    """Refuse a model fitted on another store, or on an earlier state of this one."""
    if meta.get("store_identity") != store.spec["identity"] or meta.get("num_epochs") != store.num_epochs:
        raise AttributionModelError(
            f"attribution model {where!r} was fitted on another store or an earlier state of {store.path!r}; "
            f"re-run `montrage attribute fit {store.path}`."
        )


def probe_trajectories(sm: StoreModel) -> dict[str, np.ndarray]:
    """{layer: (E, P, T, F)}: the final probe generations encoded at every stored epoch."""
    probes = sm.store.probes
    images = sm.generate(probes, sm.num_epochs - 1)
    items = probes.items()
    return sm.trajectory(images, [stable_seed(probe_noise_key(p, s)) for p, s in items], prompts=[p for p, _ in items])


def table(store: StoreReader, queries: dict[str, np.ndarray], centre: dict, mode: Mode) -> np.ndarray:
    """(Q, N, 2D) model inputs for queries against all training images (in memory; for fitting)."""
    parts = [pair_features(queries, t, centre, mode) for _, t in iter_train_blocks(store)]
    return per_query_standardize(np.concatenate(parts, axis=1))


def check_fittable(store: StoreReader) -> None:
    if store.num_epochs < 2:
        raise StoreError(
            f"store {store.path!r} holds {store.num_epochs} complete epoch(s); attribution needs at least 2 "
            "(epoch 0 and one monitored epoch). Train longer or lower every_n_epochs."
        )


def fit_model(
    x: np.ndarray,
    y: np.ndarray,
    loss: Loss = LOSS,
    steps: int = 400,
    lr: float = 3e-3,
    hidden: int = 64,
    seed: int = 0,
    members: int = MEMBERS,
) -> tuple[AttributionModel, list[float]]:
    """Full-batch Adam on (Q, N, D) inputs against (Q, N) ground truth; deterministic for a seed."""
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    model = AttributionModel(xt.shape[-1], hidden=hidden, members=members)
    model.set_normalization(xt)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for _ in range(steps):
        value = ensemble_loss(model, xt, yt, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    return model.eval(), history


def fit_streaming(
    index,
    queries: dict,
    centre: dict,
    y: np.ndarray,
    mode: Mode,
    loss: Loss = LOSS,
    steps: int = 400,
    lr: float = 3e-3,
    hidden: int = 64,
    seed: int = 0,
    batch: int = 1024,
    block: int = 4096,
    progress: bool = True,
    members: int = MEMBERS,
) -> tuple[AttributionModel, list[float]]:
    """Adam on mini-batches of training images (every probe against `batch` images per step), the pair features
    computed from the index as needed: memory O(probes x batch), not O(probes x images).

    A first pass gathers each probe's standardization statistics over all images; the model's input normalization
    follows from them (the raw half from their pooled moments; the standardized half is 0-mean, unit-variance)."""
    from tqdm.auto import tqdm

    from montrage.attribution.index import _mode_q, mode_centre

    n = y.shape[1]
    qm, cm = _mode_q(queries, mode), mode_centre(centre, mode)

    def x_of(rows):
        return index.pair_features(qm, rows, cm, mode).astype(np.float64)

    s1 = s2 = 0.0
    for start in range(0, n, block):
        x = x_of(np.arange(start, min(n, start + block)))
        s1, s2 = s1 + x.sum(axis=1, keepdims=True), s2 + (x**2).sum(axis=1, keepdims=True)
    mean, var = s1 / n, np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
    stats = (mean, np.sqrt(var))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    D = mean.shape[-1]
    model = AttributionModel(2 * D, hidden=hidden, members=members)
    pooled_mean = mean.mean(axis=(0, 1))
    pooled_var = (var + (mean - pooled_mean) ** 2).mean(axis=(0, 1))
    model.mu.copy_(torch.as_tensor(np.concatenate([pooled_mean, np.zeros(D)]), dtype=torch.float32))
    model.sigma.copy_(
        torch.as_tensor(np.concatenate([np.sqrt(pooled_var), np.ones(D)]), dtype=torch.float32).clamp_min(1e-6)
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for _ in tqdm(range(steps), desc=f"montrage: fit ({mode})", disable=not progress, leave=False):
        rows = np.sort(rng.choice(n, min(batch, n), replace=False))
        xt = torch.as_tensor(per_query_standardize(x_of(rows), stats), dtype=torch.float32)
        value = ensemble_loss(model, xt, torch.as_tensor(y[:, rows], dtype=torch.float32), loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    return model.eval(), history


def fit_attribution(
    store_path: str,
    out_dir: str | None = None,
    loss: Loss = LOSS,
    steps: int = 400,
    lr: float = 3e-3,
    hidden: int = 64,
    seed: int = 0,
    members: int = MEMBERS,
    model_path: str | None = None,
    modes: tuple[Mode, ...] = MODES,
    within: float = 0.5,
    probes: str = "regenerate",
    progress: bool = True,
    memory_bytes: int = 1 << 30,
    probe_features: dict[str, np.ndarray] | None = None,
) -> dict:
    """Fit one model per mode ('trajectory' = all epochs; 'final' = the final-epoch-only ablation) and save them.

    The training-side index (`<out>/index`) is built for the queries; beyond `STREAM_PAIRS` (probe, image) pairs, or
    when the whole table would not fit in `memory_bytes`, the fit streams mini-batches from it (a full-batch step
    costs O(pairs); a streamed one O(probes x batch)). `probes="stored"` uses the probe features the
    store holds instead of regenerating the final probes (no model needed; for synthetic stores); `probe_features`
    passes trajectories already computed by `probe_trajectories` (a refit of the same store with another seed)."""
    from montrage.attribution.index import TrainIndex, build_index

    t0 = time.time()
    out_dir = out_dir or default_model_dir(store_path)
    with StoreReader(store_path) as store:
        check_fittable(store)
        if probe_features is not None:
            queries = probe_features
        elif probes == "stored":
            queries = {layer: store.probe_features(layer) for layer in store.layers}
        else:
            queries = probe_trajectories(StoreModel(store, model_path))
        centre = train_centre(store)
        t = time.time()
        build_index(store, centre, os.path.join(out_dir, "index"), progress=progress)
        index = TrainIndex(os.path.join(out_dir, "index"), store)
        index_seconds = time.time() - t
        train = store.train
        y = np.array(store.probes.ground_truth([e.concept for e in train], [e.id for e in train], within), np.float32)
        report = {
            "store": store_path,
            "num_probes": len(store.probes),
            "num_train_images": len(train),
            "epochs": [int(e) for e in store.epochs],
            "loss": loss,
            "steps": steps,
            "seed": seed,
            "models": {},
        }
        for mode in modes:
            names = feature_names(store.layers, store.timesteps, store.num_epochs, mode)
            pairs = len(store.probes) * store.num_train
            streaming = pairs > STREAM_PAIRS or pairs * 2 * len(names) * 4 > memory_bytes
            if streaming:
                model, history = fit_streaming(
                    index, queries, centre, y, mode, loss, steps, lr, hidden, seed, progress=progress, members=members
                )
            else:
                model, history = fit_model(
                    table(store, queries, centre, mode), y, loss, steps, lr, hidden, seed, members=members
                )
            meta = model_meta(
                store,
                mode,
                loss=loss,
                seed=seed,
                members=members,
                within=within,
                final_loss=history[-1],
                initial_loss=history[0],
            )
            model.save(os.path.join(out_dir, mode), meta)
            report["models"][mode] = {
                "path": os.path.join(out_dir, mode),
                "features": len(names),
                "streaming": streaming,
                "initial_loss": round(history[0], 5),
                "final_loss": round(history[-1], 5),
            }
    report["seconds"] = round(time.time() - t0, 2)
    report["index_seconds"] = round(index_seconds, 2)
    return report
