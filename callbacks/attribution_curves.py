"""AttributionCurves: live MONTRAGE attribution in W&B while the run trains.

After each snapshot MontrageCallback writes, global rank 0 scores every stored epoch's probe generations against
that epoch's training images with the final-epoch attribution model (`montrage.attribution.curves`) and logs, per
probe, the score of each training concept over epochs (`wandb.plot.line_series`), plus a `wandb.Table` of each
probe's top training images with thumbnails. The model is the one in `model_dir` (from an earlier
`montrage attribute fit` with the same layers and timesteps), or, by default, fitted on the store so far every
`fit_every_n_snapshots` snapshots once there are two; it is saved to `<store>_attribution_live/final`, where
`montrage report` finds it.

Place it after MontrageCallback in `callbacks=[...]`. It runs no collective, and its failures are logged as
warnings: it never stops training.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from montrage.attribution.curves import attribution_curves, fit_live_model, live_model_dir, load_final_model
from montrage.callbacks.monitor_store import monitor_store_path, snapshot_count, training_thumbnails, warn_if_deferred
from montrage.callbacks.montrage_callback import MontrageConfigError, wandb_loggers
from montrage.store import StoreReader

log = logging.getLogger(__name__)


def probe_labels(store: StoreReader) -> list[str]:
    return [f"{prompt} | seed {seed}" for prompt, seed in store.probes.items()]


class AttributionCurves(Callback):
    """Log per-probe attribution curves and top training images to W&B after every snapshot.

    Args:
        model_dir: folder holding a final-epoch attribution model (`final.json` + `final.safetensors`), e.g. the
            `<store>_attribution` of an earlier run; None fits one on this run's store.
        fit_every_n_snapshots: refit the live model after this many new snapshots (fitting is a small MLP on stored
            features, no re-encoding: well under a second for the demo; raise it for large training sets).
        fit_steps: optimizer steps per fit.
        top_k: training images per probe in the table.
        save_model: save each live fit to `<store>_attribution_live/final` (for `montrage report`).
        store_path: the store to read (default that of the MontrageCallback in the trainer).
    """

    def __init__(
        self,
        model_dir: Optional[str] = None,
        fit_every_n_snapshots: int = 1,
        fit_steps: int = 200,
        top_k: int = 5,
        save_model: bool = True,
        store_path: Optional[str] = None,
    ):
        super().__init__()
        if fit_every_n_snapshots < 1:
            raise MontrageConfigError(
                f"AttributionCurves: fit_every_n_snapshots must be >= 1, got {fit_every_n_snapshots}."
            )
        if top_k < 1:
            raise MontrageConfigError(f"AttributionCurves: top_k must be >= 1, got {top_k}.")
        self.model_dir = model_dir
        self.fit_every_n_snapshots = int(fit_every_n_snapshots)
        self.fit_steps = int(fit_steps)
        self.top_k = int(top_k)
        self.save_model = save_model
        self.store_path = store_path
        self.rows_seen = 0
        self.fitted_at = 0  # snapshots in the store when the live model was last fitted
        self.last: Optional[dict] = None  # the last curves computed (for tests and programmatic use)
        self._store: Optional[str] = None
        self._model = None
        self._train_thumbs = None  # (N, size, size, 3) uint8, made once for the W&B table

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._store = monitor_store_path(trainer, self, self.store_path)
            if self.model_dir is not None and not os.path.isfile(os.path.join(self.model_dir, "final.json")):
                raise MontrageConfigError(
                    f"AttributionCurves: model_dir {self.model_dir!r} holds no final.json; give the "
                    "folder `montrage attribute fit` wrote (<store>_attribution), or leave it unset."
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_deferred(trainer, self._store, "AttributionCurves")
        self._update(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = snapshot_count(trainer, self._store)
        if n is not None and n != self.rows_seen:  # a step-scheduled snapshot was just written
            self._update(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer)

    def _update(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self._update_rank0(trainer)
        except Exception as err:  # never kill training over a live plot
            log.warning(
                "montrage AttributionCurves: skipped, training goes on. %s: %s",
                type(err).__name__,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    def _update_rank0(self, trainer: pl.Trainer) -> None:
        with StoreReader(self._store) as store:
            n = store.num_epochs
            if n == self.rows_seen:
                return
            self.rows_seen = n
            if self.model_dir is not None:
                if self._model is None:
                    self._model = load_final_model(store, self.model_dir)
            elif n >= 2 and (self._model is None or n - self.fitted_at >= self.fit_every_n_snapshots):
                self._model = fit_live_model(store, steps=self.fit_steps)
                self.fitted_at = n
                if self.save_model:
                    self._save(store)
            if self._model is None:
                return
            curves = attribution_curves(store, self._model, self.top_k)
            curves["labels"] = probe_labels(store)
            curves["probe_thumbs"] = store.probe_images(slice(-1, None))[0]
            self.last = curves
            self._log_wandb(trainer, store, curves)

    def _save(self, store: StoreReader) -> None:
        from montrage.attribution.fit import model_meta

        meta = model_meta(store, "final", live=True, fit_steps=self.fit_steps)
        self._model.save(os.path.join(live_model_dir(store.path), "final"), meta)

    def _log_wandb(self, trainer: pl.Trainer, store: StoreReader, curves: dict) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        train = store.train
        size = curves["probe_thumbs"].shape[1]
        if self._train_thumbs is None or self._train_thumbs.shape[1] != size:
            self._train_thumbs = training_thumbnails(trainer, store, size)
        epoch = curves["epochs"][-1]
        payload = {}
        for p, label in enumerate(curves["labels"]):
            payload[f"montrage/attribution/{label}"] = wandb.plot.line_series(
                xs=curves["epochs"],
                ys=curves["scores"][:, p, :].T.tolist(),
                keys=curves["concepts"],
                title=f"attribution: {label}",
                xname="epoch",
            )
        table = wandb.Table(
            columns=["epoch", "probe", "probe image", "rank", "train id", "concept", "score", "train image"]
        )
        for p, label in enumerate(curves["labels"]):
            for r, (i, s) in enumerate(zip(curves["top"][p], curves["top_scores"][p])):
                table.add_data(
                    epoch,
                    label,
                    wandb.Image(curves["probe_thumbs"][p]),
                    r + 1,
                    train[i].id,
                    train[i].concept,
                    float(s),
                    wandb.Image(self._train_thumbs[i]),
                )
        payload["montrage/attribution/top_images"] = table
        for lg in loggers:
            lg.experiment.log(payload)
