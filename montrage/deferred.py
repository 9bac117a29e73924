"""Deferred encoding: compute a deferred store's snapshots from its adapter weights, after (or beside) training.

A deferred run's training job saves only the adapter snapshots, the training order and the run's description. For
each snapshot, `encode_store` rebuilds the model (base weights + that snapshot's adapter), generates the probes
and encodes them and the monitored training images exactly as an inline run would -- it *is* the Monitor's snapshot
code, fed by the rebuilt model -- and writes them to `<store>.features.h5`, which `StoreReader` joins with the store.
Encoded rows are committed one at a time (crash-safe as the store is), so an interrupted encode resumes where it
stopped; a row whose adapter snapshot changed since (a resumed run rewrote it) is encoded again. With several
processes the probes and images of each snapshot are split across ranks and gathered on rank 0, the one writer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import numpy as np

from montrage.distributed import Distributed, TorchDistributed
from montrage.monitor import Monitor, MontrageConfigError
from montrage.store import (
    StoreError,
    StoreMismatchError,
    StoreReader,
    StoreSpec,
    StoreWriter,
    adapter_digest,
    features_path,
    first_difference,
    left_open_for_write,
)

log = logging.getLogger(__name__)


class NothingToEncode(StoreError):
    """The store is inline: its training run wrote every feature already."""


def _source_for(store: StoreReader, images: Any):
    """The images to encode: those given, else the folder the run recorded, else the store's own paths."""
    if images is not None:
        return images
    folder = store.run.images
    if folder:
        if not os.path.isdir(folder):
            raise MontrageConfigError(
                f"store {store.path!r} was trained on the folder {folder!r}, which is not "
                "here: pass the images (--images FOLDER)."
            )
        return folder
    train = store.all_train
    missing = [train[i].id for i in store.monitored_rows if not train[i].path]
    if missing:
        raise MontrageConfigError(
            f"store {store.path!r} records no file for {len(missing)} monitored image(s) (e.g. {missing[0]!r}: they "
            "came from a dataset): pass the same dataset, encode_store(..., images=dataset), or --images "
            "<folder or datasets.save_to_disk directory>."
        )
    return train


class _Encoder(Monitor):
    """The Monitor's snapshot, writing a deferred store's features file from a model rebuilt per snapshot."""

    initial_snapshot = False

    def __init__(self, store: StoreReader, *args, **kw):
        super().__init__(*args, **kw)
        self.store = store

    def _open_store(self, spec: StoreSpec, step: int) -> None:
        main = self.store.spec
        spec.model, spec.config = main["model"], main["config"]
        spec.lora_names, spec.lora_shapes = main["lora_names"], main["lora_shapes"]
        diff = first_difference(main["identity"], spec)
        if diff is not None:
            raise StoreMismatchError(
                f"the rebuilt run does not match store {self.store.path!r}: field {diff[0]!r} differs (store: "
                f"{diff[1]!r}, rebuilt: {diff[2]!r}). Pass the run's images (--images) and base model (--model-path)."
            )
        # take the file (its lock; a killed encode's committed rows are recovered), then drop stale rows
        self._writer = StoreWriter(features_path(self.store_path), spec, truncate_to=(1 << 62, 0), part="features")
        self._writer.truncate(valid_rows(self.store, self._writer.f), 0)
        self.snapshots_written, self.order_rows = self._writer.committed[0], 0


def valid_rows(store: StoreReader, f) -> int:
    """Leading rows of an open features file encoded from the store's current adapter snapshots."""
    n = min(int(f["committed"][0]), store.adapter_snapshots)
    steps, checks = f["global_step"][:n], f["adapter_check"][:n]
    main_steps = store.adapter_steps[:n]
    for row in range(n):
        if steps[row] != main_steps[row] or checks[row] != adapter_digest(store.adapter_params(row)):
            return row
    return n


def encode_store(
    store_path: str,
    images: Any = None,
    model_path: Optional[str] = None,
    *,
    follow: bool = False,
    timeout: Optional[float] = None,
    interval: float = 2.0,
    device: str = "cpu",
    dist: Optional[Distributed] = None,
    batch_size: Optional[int] = None,
    log_to_wandb: bool = False,
    wandb_runs=None,
    progress: bool = True,
) -> dict:
    """Encode every adapter snapshot of a deferred store not yet encoded; returns what was done.

    `follow`: keep encoding snapshots as a running training job commits them, until it closes the store (or
    `timeout` seconds pass without it closing). Every rank of `dist` calls this; rank 0 writes.
    """
    dist = dist or TorchDistributed()
    t0 = time.time()
    if follow:
        _wait_for(store_path, timeout)
    store = StoreReader(store_path, features=False)
    try:
        if not store.deferred:
            raise NothingToEncode(
                f"store {store_path!r} is inline: its training run wrote every snapshot's features (nothing to encode)."
            )
        from montrage.store_model import StoreModel

        sm = StoreModel(store, model_path, device)
        run = store.run
        train = store.all_train
        enc = _Encoder(
            store,
            store_path,
            sm.model.parts,
            _source_for(store, images),
            image_keys=run.image_keys,
            monitor_images=[train[i].id for i in store.monitored_rows],
            resolution=sm.resolution,
            probes=store.probes,
            every_n_steps=1,
            layers=store.layers,
            timesteps=store.timesteps,
            pooling=store.spec["pooling"],
            encode_prompt=run.encode_prompt,
            num_inference_steps=run.num_inference_steps,
            guidance_scale=run.guidance_scale,
            thumbnail_size=int(store.spec["thumbnail_size"]),
            latent_cache=run.latent_cache,
            save_lora_snapshots=False,
            mode="inline",
            projection_width=(store.spec.get("projection") or {}).get("width"),
            projection_seed=int((store.spec.get("projection") or {}).get("seed", 0)),
            encode_batch_size=int(batch_size or run.encode_batch_size),
            strict=True,
            log_to_wandb=log_to_wandb,
            model_id=store.spec["model"].get("model_id"),
            family=sm.family,
            dist=dist,
            progress=progress,
        )
        if wandb_runs is not None:
            enc.wandb_runs = wandb_runs
        enc.start()
        skipped = enc.snapshots_written
        encoded = 0
        deadline = None if not timeout else time.monotonic() + timeout
        try:
            while True:
                store.refresh()
                n, open_ = dist.broadcast((store.adapter_snapshots, left_open_for_write(store_path)), src=0)
                if n < enc.snapshots_written:  # a resumed run cut its store back: so are its encoded rows
                    if enc.is_writer:
                        enc._writer.truncate(n, 0)
                    enc.snapshots_written = n
                steps, epochs = store.adapter_steps, store.adapter_epochs  # read once per refresh
                for row in _rows(enc.snapshots_written, n, progress and enc.is_writer):
                    sm.set_epoch(row)
                    enc._adapter_check = adapter_digest(store.adapter_params(row)) if enc.is_writer else None
                    if not enc._snapshot(int(steps[row]), int(epochs[row])):
                        raise StoreError(f"encoding snapshot {row} of {store_path!r} failed.")
                    encoded += 1
                    if log_to_wandb and enc.is_writer and enc.snapshots_written >= 2:
                        _log_attribution(store, enc)
                if not follow or not open_:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    log.warning(
                        "montrage encode: %s is still open for writing after %.0f s; stopping (run again to "
                        "encode what comes later).",
                        store_path,
                        timeout,
                    )
                    break
                time.sleep(interval)
        finally:
            enc._close_store()
        dist.barrier("montrage-encode")
        return {
            "store": store_path,
            "features": features_path(store_path),
            "snapshots": int(enc.snapshots_written),
            "encoded": encoded,
            "already_encoded": int(skipped),
            "processes": dist.world_size,
            "seconds": round(time.time() - t0, 2),
            "images_per_second": round(encoded * len(enc.monitored) / max(time.time() - t0, 1e-9), 2),
        }
    finally:
        store.close()


def _log_attribution(store: StoreReader, enc: _Encoder) -> None:
    """Attribution curves of the snapshots encoded so far (a final-epoch model fitted on them, as AttributionCurves
    does), logged per probe concept and training concept at the latest snapshot."""
    from montrage.attribution.curves import attribution_curves, fit_live_model

    runs = enc.wandb_runs()
    if not runs:
        return
    store.ff = enc._writer.f  # this process writes the features file: read it through the writer's handle
    try:
        curves = attribution_curves(store, fit_live_model(store, steps=100), top_k=1)
        row = store.num_epochs - 1
        payload = {"montrage/global_step": int(store.global_steps[row]), "montrage/epoch": int(store.epochs[row])}
    finally:
        store.ff = None
    primary = np.asarray(store.probes.primary_concepts())
    for pc in sorted(set(primary.tolist())):
        for j, tc in enumerate(curves["concepts"]):
            payload[f"montrage/attribution/{pc}/{tc}"] = float(curves["scores"][row, primary == pc, j].mean())
    for run in runs:
        run.log(payload)


def _rows(start: int, stop: int, bar: bool):
    from tqdm.auto import tqdm

    return tqdm(
        range(start, stop), desc="montrage encode", unit="snapshot", disable=not bar or stop - start < 2, leave=False
    )


def _wait_for(path: str, timeout: Optional[float]) -> None:
    """--follow may start before the training job has created its store."""
    deadline = None if not timeout else time.monotonic() + timeout
    while not (os.path.isfile(path) and os.path.getsize(path) >= 12):
        if deadline is not None and time.monotonic() >= deadline:
            raise StoreError(f"store {path!r} did not appear within {timeout:.0f} s.")
        time.sleep(1.0)


def launch(devices: int, accelerator: str = "cpu"):
    """Start `devices` processes with Lightning Fabric (DDP; gloo on CPU) and return (this rank's device, dist)."""
    import torch

    if accelerator == "gpu":
        have = torch.cuda.device_count()
        if devices > have:
            raise MontrageConfigError(
                f"--devices {devices} with --accelerator gpu, but this machine has {have} GPU(s): "
                f"use --devices {max(have, 1)}{'' if have else ' --accelerator cpu'}."
            )
    elif accelerator == "cpu":
        have = os.cpu_count() or 1
        if devices > have:
            raise MontrageConfigError(
                f"--devices {devices} CPU processes, but this machine has {have} core(s): use "
                f"--devices {have} or fewer."
            )
    else:
        raise MontrageConfigError(f"--accelerator {accelerator!r}: use 'cpu' or 'gpu'.")
    if devices < 1:
        raise MontrageConfigError(f"--devices must be >= 1, got {devices}.")
    if devices == 1:
        return ("cuda" if accelerator == "gpu" else "cpu"), TorchDistributed()
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp")
    fabric.launch()
    return str(fabric.device), TorchDistributed()
