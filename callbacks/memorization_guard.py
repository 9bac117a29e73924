"""MemorizationGuard: flag probe generations that become near-copies of a training image while training runs.

After each snapshot MontrageCallback writes, the guard compares every probe generation of that snapshot with every
training image (`montrage.memorization`: pixel correlation of the thumbnails, optionally the similarity of the
stored representations). A probe over the thresholds raises an alert: a Python warning, a W&B image of the probe
beside the training image, a row in `<store>_memorization.json` (read by `montrage report`), and with
`stop_training=True` the run stops at the end of that epoch on every rank. Given an origin classifier
(`montrage origin fit`), each alert also carries the probe generation's origin probabilities: a copy the classifier
calls a training "member" is one the model treats like its training data.

Place it after MontrageCallback in `callbacks=[...]`. It never stops or crashes training because of its own
failure: errors are logged as warnings.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from montrage.callbacks.monitor_store import monitor_store_path, snapshot_count, training_thumbnails, warn_if_deferred
from montrage.callbacks.montrage_callback import MontrageConfigError, wandb_loggers
from montrage.memorization import (
    Alert,
    alert_dicts,
    default_alerts_path,
    near_copies,
    pixel_similarity,
    representation_similarity,
    write_alerts,
)
from montrage.store import StoreReader

log = logging.getLogger(__name__)


class MemorizationGuard(Callback):
    """Alert (and optionally stop) when a probe generation becomes a near-copy of one training image.

    Args:
        pixel_threshold: Pearson correlation of probe and training thumbnails at or above which a probe counts as a
            copy (None: off). The default 0.97 lies between a normal run's maxima and over-trained runs' copies
            (docs/results.md, "Memorization guard").
        representation_threshold: centred cosine of the stored features (layer `layer`, all timesteps) at or above
            which a probe counts as a copy (None: off, the default: pooled features did not separate copies from
            ordinary same-concept generations in our measurements).
        require: "all" enabled measures must pass for the same training image, or "any" one.
        layer: store layer for the representation measure (default the first monitored layer).
        stop_training: stop the run (all ranks, at the end of the epoch) at the first alert.
        alerts_path: JSON record of alerts and per-snapshot maxima (default `<store>_memorization.json`).
        log_to_wandb: log alert images and the per-snapshot maxima to an attached WandbLogger.
        store_path: the store to read (default that of the MontrageCallback in the trainer).
        origin_classifier: an origin classifier folder (`montrage origin fit STORE` writes `<store>.origin`), e.g. of
            an earlier run of this fine-tune; each alert's probe generation gets its origin probabilities under the
            classifier's own model (None: off). `montrage report` adds them after the run when the store has one.
    """

    def __init__(
        self,
        pixel_threshold: Optional[float] = 0.97,
        representation_threshold: Optional[float] = None,
        require: Literal["any", "all"] = "all",
        layer: Optional[str] = None,
        stop_training: bool = False,
        alerts_path: Optional[str] = None,
        log_to_wandb: bool = True,
        store_path: Optional[str] = None,
        origin_classifier: Optional[str] = None,
    ):
        super().__init__()
        if pixel_threshold is None and representation_threshold is None:
            raise MontrageConfigError(
                "MemorizationGuard: both pixel_threshold and representation_threshold are None; "
                "set at least one (e.g. pixel_threshold: 0.97)."
            )
        for name, value in (
            ("pixel_threshold", pixel_threshold),
            ("representation_threshold", representation_threshold),
        ):
            if value is not None and not -1.0 <= value <= 1.0:
                raise MontrageConfigError(f"MemorizationGuard: {name} is a correlation in [-1, 1], got {value}.")
        if require not in ("any", "all"):
            raise MontrageConfigError(f"MemorizationGuard: require must be 'any' or 'all', got {require!r}.")
        self.pixel_threshold = pixel_threshold
        self.representation_threshold = representation_threshold
        self.require = require
        self.layer = layer
        self.stop_training = stop_training
        self.alerts_path = alerts_path
        self.log_to_wandb = log_to_wandb
        self.store_path = store_path
        self.origin_classifier = origin_classifier
        self._origin_model = None  # (classifier, model), loaded at the first alert
        # resumable state
        self.rows_checked = 0
        self.alerts: list[dict] = []
        self.history: list[dict] = []
        self._store: Optional[str] = None
        self._train_thumbs: Optional[np.ndarray] = None
        self._seen: Optional[int] = None  # the monitor's snapshot count at the last check (equal on every rank)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(store_path=self.store_path, alerts_path=self.alerts_path)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._store = monitor_store_path(trainer, self, self.store_path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_deferred(trainer, self._store, "MemorizationGuard")
        # MontrageCallback wrote epoch 0 in its on_train_start, just before. A copy there means the base model already
        # reproduces a training image: alerted, but the run is not stopped before it trained at all.
        self._check(trainer, may_stop=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = snapshot_count(trainer, self._store)
        if n is not None and n != self._seen:  # a step-scheduled snapshot was just written
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = snapshot_count(trainer, self._store)
        if n is None or n != self._seen:
            self._check(trainer)

    # --- the check -----------------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer, may_stop: bool = True) -> None:
        """Rank 0 checks the new snapshots; the stop decision is broadcast so every rank stops together."""
        self._seen = snapshot_count(trainer, self._store)
        stop = False
        if trainer.is_global_zero:
            try:
                new = self._check_new_rows(trainer)
                stop = bool(new) and self.stop_training and may_stop
            except Exception as err:  # the guard must never kill training
                log.warning(
                    "montrage MemorizationGuard: check skipped, training goes on. %s: %s",
                    type(err).__name__,
                    err,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
        stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning("montrage MemorizationGuard: stopping training (stop_training=True).")

    def _training_thumbnails(self, trainer: pl.Trainer, store: StoreReader, size: int) -> np.ndarray:
        if self._train_thumbs is None or self._train_thumbs.shape[1] != size:
            self._train_thumbs = training_thumbnails(trainer, store, size)
        return self._train_thumbs

    def _check_new_rows(self, trainer: pl.Trainer) -> list[Alert]:
        with StoreReader(self._store) as store:
            n = store.num_epochs
            if n < self.rows_checked:  # the store was cut back (resume from an earlier checkpoint)
                self.rows_checked = n
                self.history = [h for h in self.history if h["row"] < n]
                kept = {h["epoch"] for h in self.history}
                self.alerts = [a for a in self.alerts if a["epoch"] in kept]
            if n == self.rows_checked:
                return []
            layer = self.layer or store.layers[0]
            if layer not in store.layers:
                raise MontrageConfigError(f"layer {layer!r} is not in the store (layers: {store.layers}).")
            start = self.rows_checked  # only the new rows are read
            new_rows = slice(start, n)
            thumbs = store.probe_images(new_rows)
            train_thumbs = self._training_thumbnails(trainer, store, thumbs.shape[2])
            with_rep = self.representation_threshold is not None
            probe_feats = store.probe_features(layer, new_rows) if with_rep else None
            train_feats = store.train_features(layer, epochs=new_rows) if with_rep else None
            epochs, steps, train, items = store.epochs, store.global_steps, store.train, store.probes.items()
            new: list[Alert] = []
            alert_thumbs: list[np.ndarray] = []  # each alert's probe generation
            for row in range(start, n):
                k = row - start
                pix = pixel_similarity(thumbs[k], train_thumbs) if self.pixel_threshold is not None else None
                rep = representation_similarity(probe_feats[k], train_feats[k]) if with_rep else None
                self.history.append(
                    {
                        "row": row,
                        "epoch": int(epochs[row]),
                        "global_step": int(steps[row]),
                        "max_pixel": None if pix is None else round(float(pix.max()), 5),
                        "max_representation": None if rep is None else round(float(rep.max()), 5),
                    }
                )
                for p, i in near_copies(pix, rep, self.pixel_threshold, self.representation_threshold, self.require):
                    new.append(
                        Alert(
                            epoch=int(epochs[row]),
                            global_step=int(steps[row]),
                            probe=p,
                            prompt=items[p][0],
                            seed=int(items[p][1]),
                            train_index=i,
                            train_id=train[i].id,
                            train_concept=train[i].concept,
                            pixel=None if pix is None else round(float(pix[p, i]), 5),
                            representation=None if rep is None else round(float(rep[p, i]), 5),
                        )
                    )
                    alert_thumbs.append(thumbs[k, p])
            self.rows_checked = n
        if new and self.origin_classifier is not None:
            self._add_origins(new, alert_thumbs)
        self.alerts += alert_dicts(new)
        for alert in new:
            log.warning("montrage MemorizationGuard: %s", alert.describe())
        write_alerts(self.alerts_path or default_alerts_path(self._store), self.record())
        if self.log_to_wandb:
            self._log_wandb(trainer, new, thumbs, start, train_thumbs)
        return new

    def _add_origins(self, alerts: list[Alert], thumbs: list[np.ndarray]) -> None:
        """Each alert's probe generation classified by the origin classifier; a failure only drops the origins."""
        from montrage.origin.predict import load_with_model, predict_generations

        try:
            if self._origin_model is None:
                self._origin_model = load_with_model(self.origin_classifier)
            origins = predict_generations(thumbs, [a.prompt for a in alerts], *self._origin_model)
        except Exception as err:  # the guard must never kill training
            log.warning(
                "montrage MemorizationGuard: origin of the alerted probes skipped (%s): %s: %s",
                self.origin_classifier,
                type(err).__name__,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return
        for alert, origin in zip(alerts, origins):
            alert.origin = origin

    def record(self) -> dict:
        return {
            "alerts": self.alerts,
            "history": self.history,
            "store": self._store,
            "config": {
                "pixel_threshold": self.pixel_threshold,
                "representation_threshold": self.representation_threshold,
                "require": self.require,
                "layer": self.layer,
                "stop_training": self.stop_training,
                "origin_classifier": self.origin_classifier,
            },
        }

    def _log_wandb(
        self, trainer: pl.Trainer, new: list[Alert], thumbs: np.ndarray, first_row: int, train_thumbs: np.ndarray
    ) -> None:
        """`thumbs`: the probe thumbnails of the stored rows from `first_row` on (those the alerts come from)."""
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        last = self.history[-1]
        metrics = {f"montrage/memorization/{k}": v for k, v in last.items() if k.startswith("max_") and v is not None}
        metrics["montrage/memorization/alerts"] = len(self.alerts)
        images = []
        row_of = {h["epoch"]: h["row"] for h in self.history}
        for a in new[:16]:
            pair = np.concatenate([thumbs[row_of[a.epoch] - first_row, a.probe], train_thumbs[a.train_index]], axis=1)
            pair = np.kron(pair, np.ones((4, 4, 1), np.uint8)) if pair.shape[0] < 64 else pair  # visible when tiny
            images.append(wandb.Image(pair, caption="probe | training image. " + a.describe()))
        for lg in loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if images:
                lg.experiment.log({"montrage/memorization/alerts_images": images})

    # --- resumable state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rows_checked": self.rows_checked, "alerts": list(self.alerts), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows_checked = int(state_dict["rows_checked"])
        self.alerts = list(state_dict["alerts"])
        self.history = list(state_dict["history"])
