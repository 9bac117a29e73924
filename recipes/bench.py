"""`montrage bench overhead`: epoch wall time with vs without MontrageCallback, side by side in one run.

Each variant runs in its own subprocess (so that peak memory is its own), alternating without/with, at the demo's
defaults (tiny base, 4 digit concepts x 16 images, repeats 40, LoRA rank 8, 20 probes, 10 DDIM steps).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _variant(with_callback: bool, epochs: int, images_per_concept: int, repeats: int, workdir: str) -> dict:
    import pytorch_lightning as pl
    import torch

    from montrage.callbacks import MontrageCallback
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune

    class EpochTimer(pl.Callback):
        """Wall time of each epoch, the monitoring work at its end included (the epoch-0 snapshot is separate)."""

        def __init__(self):
            self.marks = []

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

    torch.set_num_threads(int(os.environ.get("MONTRAGE_BENCH_THREADS", "2")))
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    store = os.path.join(workdir, "store.h5")
    callbacks = [timer]  # first, so that its on_train_start precedes the epoch-0 snapshot
    if with_callback:
        callbacks.append(MontrageCallback(store_path=store, probe_seeds=[0, 1], num_inference_steps=10,
                                             guidance_scale=3.0, thumbnail_size=16, overwrite=True, log_to_wandb=False))
    t0 = time.perf_counter()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(DiffusionFineTune(lora_rank=8, lora_alpha=8, learning_rate=1e-2),
                ConceptDataModule(images_per_concept=images_per_concept, batch_size=32, repeats=repeats))
    epoch_times = np.diff(timer.marks).tolist()
    out = {
        "with_callback": with_callback,
        "epoch_seconds": epoch_times,
        "fit_seconds": time.perf_counter() - t0,
        "epoch0_snapshot_seconds": timer.marks[0] - timer.start if with_callback else 0.0,
        "steps_per_epoch": trainer.num_training_batches,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if with_callback:
        from montrage.store import StoreReader

        with StoreReader(store) as r:
            out["store_bytes"] = os.path.getsize(store)
            out["snapshots"] = r.num_epochs
    return out


def run_overhead(epochs: int = 3, images_per_concept: int = 16, repeats: int = 40, rounds: int = 2,
                 out: str | None = None) -> dict:
    from montrage.recipes.tiny_base import tiny_base_path

    tiny_base_path()  # build the cached base first, outside the timed runs
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for with_cb in (False, True):
                args = [sys.executable, "-m", "montrage.recipes.bench", "_variant", json.dumps(
                    [with_cb, epochs, images_per_concept, repeats, tmp])]
                proc = subprocess.run(args, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark variant failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{rounds} {'with' if with_cb else 'without'} callback: "
                      f"{np.mean(results[-1]['epoch_seconds']):.2f} s/epoch", file=sys.stderr, flush=True)
    plain = [np.mean(x["epoch_seconds"]) for x in results if not x["with_callback"]]
    monitored = [np.mean(x["epoch_seconds"]) for x in results if x["with_callback"]]
    ratios = [m / p for m, p in zip(monitored, plain)]
    last = [x for x in results if x["with_callback"]][-1]
    summary = {
        "command": f"montrage bench overhead --epochs {epochs} --images-per-concept {images_per_concept} --repeats {repeats}",
        "epoch_seconds_without": round(float(np.median(plain)), 3),
        "epoch_seconds_with": round(float(np.median(monitored)), 3),
        "ratio": round(float(np.median(ratios)), 3),
        "ratios_per_round": [round(float(r), 3) for r in ratios],
        "epoch0_snapshot_seconds": round(float(last["epoch0_snapshot_seconds"]), 3),
        "steps_per_epoch": last["steps_per_epoch"],
        "store_bytes_per_epoch": int(last["store_bytes"] / last["snapshots"]),
        "peak_rss_mib_without": round(max(x["peak_rss_mib"] for x in results if not x["with_callback"]), 1),
        "peak_rss_mib_with": round(max(x["peak_rss_mib"] for x in results if x["with_callback"]), 1),
        "runs": results,
    }
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_variant":
    w, e, ipc, rep, tmp = json.loads(sys.argv[2])
    print(json.dumps(_variant(w, e, ipc, rep, tmp)))
