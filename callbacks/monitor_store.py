"""Shared by the callbacks that read the store MontrageCallback writes during training (attribution curves, guard).

They read the committed snapshots with a fresh SWMR `StoreReader` on global rank 0, after MontrageCallback's
`on_train_epoch_end` has written and flushed the epoch. Lightning calls callbacks in list order, so such a callback
must come after MontrageCallback in `callbacks=[...]`; `monitor_store_path` checks that before training starts.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from montrage.callbacks.montrage_callback import MontrageCallback, MontrageConfigError
from montrage.store import StoreReader

log = logging.getLogger(__name__)


def monitor_store_path(trainer: pl.Trainer, me: Callback, store_path: Optional[str]) -> str:
    """The store to follow: `store_path`, or that of the MontrageCallback placed before `me` in the trainer."""
    callbacks = list(trainer.callbacks)
    name = type(me).__name__
    monitors = [cb for cb in callbacks if isinstance(cb, MontrageCallback)]
    if store_path is not None:
        monitors = [cb for cb in monitors if cb.store_path == store_path]
        if not monitors:
            return store_path  # a store written elsewhere (e.g. by another process)
    if not monitors:
        raise MontrageConfigError(
            f"{name} reads the store that MontrageCallback writes, but the trainer has no MontrageCallback: add one "
            f"before {name} in callbacks=[...], or pass store_path= of a store another process writes."
        )
    if len(monitors) > 1:
        raise MontrageConfigError(
            f"{name}: the trainer has {len(monitors)} MontrageCallbacks ({', '.join(cb.store_path for cb in monitors)}); "
            "pass store_path= to say which store to read."
        )
    monitor = monitors[0]
    if callbacks.index(monitor) > callbacks.index(me):
        raise MontrageConfigError(
            f"{name} comes before MontrageCallback in the trainer's callbacks, so it would read each epoch before it is "
            f"written (Lightning calls callbacks in list order): put {name} after MontrageCallback."
        )
    return monitor.store_path


def training_thumbnails(trainer: pl.Trainer, store: StoreReader, size: int) -> np.ndarray:
    """(M, size, size, 3) uint8 thumbnails of the store's monitored images: from the MontrageCallback's image
    source when it writes this store, else read from their paths (grey where a file is unreadable)."""
    from montrage.report import train_thumbnails

    monitor = next(
        (
            cb
            for cb in trainer.callbacks
            if isinstance(cb, MontrageCallback) and cb.store_path == store.path and cb.monitor is not None
        ),
        None,
    )
    if monitor is not None:
        return monitor.train_thumbnails(size)
    return train_thumbnails(store, size)[0]


def snapshot_count(trainer: pl.Trainer, store_path: Optional[str]) -> Optional[int]:
    """Snapshots the MontrageCallback writing `store_path` has written (equal on every rank), or None when the store
    is written elsewhere. Followers check the store only when it moves, also after step-scheduled snapshots."""
    cb = next(
        (cb for cb in trainer.callbacks if isinstance(cb, MontrageCallback) and cb.store_path == store_path), None
    )
    return None if cb is None else cb.snapshots_written


def warn_if_deferred(trainer: pl.Trainer, store_path: Optional[str], name: str) -> None:
    """A deferred MontrageCallback writes no features during training: say where the follower's input comes from."""
    cb = next(
        (cb for cb in trainer.callbacks if isinstance(cb, MontrageCallback) and cb.store_path == store_path), None
    )
    if cb is not None and cb.monitor is not None and cb.monitor.mode == "deferred" and trainer.is_global_zero:
        log.warning(
            "montrage %s: MontrageCallback runs deferred (adapter snapshots only), so %s sees each snapshot "
            "only once `montrage encode %s --follow` has encoded it; set mode='inline' to check during "
            "training.",
            name,
            name,
            store_path,
        )
