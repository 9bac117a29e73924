"""Near-copy detection: how close each probe generation comes to its nearest training image.

Two measures, both read from what the store already holds (no extra model calls):
  pixel          Pearson correlation of the probe thumbnail and the training image at thumbnail size (all
                 channels); 1 = the same picture up to brightness and contrast.
  representation cosine of the probe's and the training image's stored features (one layer, all timesteps side by
                 side), centred on the epoch's mean training representation when there are >= 2 training images,
                 so that what every image shares does not count as similarity.
A probe is flagged when the enabled measures pass their thresholds for one training image. The memorization guard
(`montrage.callbacks.MemorizationGuard`) applies this each snapshot; `montrage report` shows its alerts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np

from montrage.errors import MontrageError
from montrage.similarity import flatten_features

Require = Literal["any", "all"]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pixel_similarity(probe_thumbs: np.ndarray, train_thumbs: np.ndarray) -> np.ndarray:
    """(P, N) Pearson correlation between probe and training thumbnails of equal size (uint8 or float)."""
    if probe_thumbs.shape[1:] != train_thumbs.shape[1:]:
        raise ValueError(
            f"thumbnail shapes differ: probes {probe_thumbs.shape[1:]}, training {train_thumbs.shape[1:]}."
        )
    a = probe_thumbs.reshape(len(probe_thumbs), -1).astype(np.float64)
    b = train_thumbs.reshape(len(train_thumbs), -1).astype(np.float64)
    return _unit_rows(a - a.mean(1, keepdims=True)) @ _unit_rows(b - b.mean(1, keepdims=True)).T


def representation_similarity(probe: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(P, N) cosine of one epoch's features, probe (P, T, F) and train (N, T, F), centred on the training mean."""
    p, t = flatten_features(probe).astype(np.float64), flatten_features(train).astype(np.float64)
    if len(t) >= 2:
        mu = t.mean(0, keepdims=True)
        p, t = p - mu, t - mu
    return _unit_rows(p) @ _unit_rows(t).T


@dataclass
class Alert:
    """One probe generation that came too close to one training image at one snapshot."""

    epoch: int
    global_step: int
    probe: int
    prompt: str
    seed: int
    train_index: int
    train_id: str
    train_concept: str
    pixel: Optional[float]
    representation: Optional[float]
    origin: Optional[dict] = None  # the probe generation's origin probabilities {class: p}, when a classifier is given

    def describe(self) -> str:
        return describe_alert(asdict(self))


def describe_alert(alert: dict) -> str:
    """One line for an alert (an `Alert` or a row of the guard's JSON record)."""
    parts = [f"{k} {alert[k]:.3f}" for k in ("pixel", "representation") if alert.get(k) is not None]
    text = (
        f"epoch {alert['epoch']}: probe {alert['probe']} ({alert['prompt']!r}, seed {alert['seed']}) is a near-copy "
        f"of training image {alert['train_id']!r} ({alert['train_concept']}): {', '.join(parts)} similarity"
    )
    return text + (f"; origin {format_origin(alert['origin'])}" if alert.get("origin") else "")


def format_origin(probabilities: dict) -> str:
    """'member 0.71 (generated 0.20, external 0.09)': the most likely class first."""
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
    rest = ", ".join(f"{c} {p:.2f}" for c, p in ranked[1:])
    return f"{ranked[0][0]} {ranked[0][1]:.2f}" + (f" ({rest})" if rest else "")


def near_copies(
    pixel: Optional[np.ndarray],
    representation: Optional[np.ndarray],
    pixel_threshold: Optional[float],
    representation_threshold: Optional[float],
    require: Require = "all",
) -> list[tuple[int, int]]:
    """(probe, training image) pairs over the enabled thresholds; per probe only its most similar flagged image.

    `require="all"`: every enabled measure must pass for the same training image; "any": one is enough.
    """
    checks = [
        (s, th)
        for s, th in ((pixel, pixel_threshold), (representation, representation_threshold))
        if th is not None and s is not None
    ]
    if not checks:
        return []
    passed = [s >= th for s, th in checks]
    hit = np.logical_and.reduce(passed) if require == "all" else np.logical_or.reduce(passed)
    rank = checks[0][0]  # order candidates by the first enabled measure
    out = []
    for p in np.flatnonzero(hit.any(axis=1)):
        cand = np.flatnonzero(hit[p])
        out.append((int(p), int(cand[np.argmax(rank[p, cand])])))
    return out


def default_alerts_path(store_path: str) -> str:
    return os.path.splitext(store_path)[0] + "_memorization.json"


def write_alerts(path: str, record: dict) -> None:
    """Atomically replace the guard's JSON record (alerts plus the per-snapshot maxima)."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, path)


def read_alerts(path: str) -> dict:
    """The guard's record at `path` ({'alerts': [...], 'history': [...], 'config': {...}})."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError) as err:
        raise MontrageError(
            f"memorization record {path!r} cannot be read ({type(err).__name__}: {err}); delete it or "
            "re-run training with the MemorizationGuard."
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("alerts"), list):
        raise MontrageError(
            f"memorization record {path!r} has no 'alerts' list; it was not written by the MemorizationGuard."
        )
    return record


def alert_dicts(alerts: list[Alert]) -> list[dict]:
    return [asdict(a) for a in alerts]
