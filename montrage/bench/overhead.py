"""`montrage bench overhead`: epoch wall time with vs without MontrageCallback (inline and deferred), side by side.

Each variant runs in its own subprocess (so that peak memory is its own), alternating without / inline / deferred
in every round, at the demo's settings (4 digit concepts, LoRA rank 8, 20 probes, 10 DDIM steps) on the tiny base,
or on a random-weight UNet with Stable Diffusion 1.5's architecture at 256 px (`--model sd15`; fewer probes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from montrage.recipes.random_bases import BASES

VARIANTS = ("without", "inline", "deferred")


def _variant(
    variant: str,
    epochs: int,
    images_per_concept: int,
    repeats: int,
    workdir: str,
    model: str = "tiny",
    accelerator: str = "cpu",
    resolution: Optional[int] = None,
) -> dict:
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
    with_callback = variant != "without"
    big = model != "tiny"
    if with_callback:
        callbacks.append(
            MontrageCallback(
                store_path=store,
                probe_seeds=[0] if big else [0, 1],
                num_inference_steps=10,
                probe_mixtures=not big,
                guidance_scale=3.0,
                thumbnail_size=16,
                overwrite=True,
                log_to_wandb=False,
                mode=variant,
            )
        )
    hooks = [0.0]  # seconds spent inside the monitor's per-batch and per-epoch hooks (a low-noise overhead estimate)
    if with_callback:
        cb = callbacks[-1]
        for name in ("on_train_batch_end", "on_train_epoch_end"):

            def timed(*a, _f=getattr(cb, name), **k):
                t = time.perf_counter()
                _f(*a, **k)
                hooks[0] += time.perf_counter() - t

            setattr(cb, name, timed)
    t0 = time.perf_counter()
    gpu = accelerator == "gpu"
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
    )
    base = BASES[model]() if big else "tiny"
    resolution = resolution or ({"tiny": 16, "sd15": 256, "sdxl": 1024}[model])
    trainer.fit(
        DiffusionFineTune(pretrained_model=base, lora_rank=8, lora_alpha=8, learning_rate=1e-4 if big else 1e-2),
        ConceptDataModule(
            images_per_concept=images_per_concept, batch_size=4 if big else 32, repeats=repeats, resolution=resolution
        ),
    )
    epoch_times = np.diff(timer.marks).tolist()
    out = {
        "variant": variant,
        "with_callback": with_callback,
        "epoch_seconds": epoch_times,
        "fit_seconds": time.perf_counter() - t0,
        "epoch0_snapshot_seconds": timer.marks[0] - timer.start if with_callback else 0.0,
        "monitor_hook_seconds": hooks[0],
        "steps_per_epoch": trainer.num_training_batches,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if with_callback:
        from montrage.store import StoreReader

        with StoreReader(store) as r:
            out["store_bytes"] = os.path.getsize(store)
            out["snapshots"] = r.adapter_snapshots
            out["monitored_images"] = r.num_train
        if variant == "deferred":  # encode afterwards, as `montrage encode STORE` would
            from montrage.deferred import encode_store

            t = time.perf_counter()
            done = encode_store(store, device="cuda" if gpu else "cpu", progress=False)
            out["encode_seconds"] = time.perf_counter() - t
            out["encode_images_per_s"] = done["encoded"] * out["monitored_images"] / out["encode_seconds"]
    return out


def run_overhead(
    epochs: int = 3,
    images_per_concept: int = 16,
    repeats: int = 40,
    rounds: int = 2,
    out: str | None = None,
    mode: str = "both",
    model: str = "tiny",
    accelerator: str = "cpu",
    resolution: Optional[int] = None,
) -> dict:
    """Per round, one fresh process fits without, then each monitored mode, then all of them again (every fit its own
    Trainer, module and store); a round's ratio is a mode's epoch time over the mean of that process's two fits
    without, so that process-to-process noise (thread placement, allocator state) cancels. The median over rounds
    is reported, with the time spent inside the monitor's hooks as a second, low-noise estimate."""
    from montrage.recipes.tiny_base import tiny_base_path

    if model in BASES:
        BASES[model]()
    else:
        tiny_base_path()  # build the cached base first, outside the timed runs
    modes = ["inline", "deferred"] if mode == "both" else [mode]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            sequence = (["without"] + modes) * 2
            args = [
                sys.executable,
                "-m",
                "montrage.bench.overhead",
                "_sequence",
                json.dumps([sequence, epochs, images_per_concept, repeats, tmp, model, accelerator, resolution]),
            ]
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark variant failed:\n{proc.stderr[-3000:]}")
            for k, run in enumerate(json.loads(proc.stdout.strip().splitlines()[-1])):
                results.append({"round": r, "position": k, **run})
                print(
                    f"round {r + 1}/{rounds} {run['variant']}: {np.mean(run['epoch_seconds']):.2f} s/epoch",
                    file=sys.stderr,
                    flush=True,
                )

    def per_round(variant):  # mean epoch time of each round's fits of `variant`
        return [
            np.mean([np.mean(x["epoch_seconds"]) for x in results if x["variant"] == variant and x["round"] == r])
            for r in range(rounds)
        ]

    plain = per_round("without")
    summary = {
        "command": f"montrage bench overhead --model {model} --mode {mode} --epochs {epochs} --images-per-concept "
        f"{images_per_concept} --repeats {repeats} --rounds {rounds} --accelerator {accelerator}"
        + (f" --resolution {resolution}" if resolution else ""),
        "model": model,
        "repeats": repeats,
        "accelerator": accelerator,
        "images": 4 * images_per_concept,
        "steps_per_epoch": results[0]["steps_per_epoch"],
        "epoch_seconds_without": round(float(np.median(plain)), 3),
        "peak_rss_mib_without": round(max(x["peak_rss_mib"] for x in results if x["variant"] == "without"), 1),
        "modes": {},
        "runs": results,
    }
    for variant in modes:
        ratios = [m / p for m, p in zip(per_round(variant), plain)]
        last = [x for x in results if x["variant"] == variant][-1]
        summary["modes"][variant] = {
            "ratio": round(float(np.median(ratios)), 4),
            "ratios_per_round": [round(float(r), 4) for r in ratios],
            "epoch_seconds": round(float(np.median(per_round(variant))), 3),
            "hook_seconds_per_epoch": round(
                float(np.median([x["monitor_hook_seconds"] / epochs for x in results if x["variant"] == variant])), 4
            ),
            "ratio_from_hooks": round(
                1.0
                + float(np.median([x["monitor_hook_seconds"] / epochs for x in results if x["variant"] == variant]))
                / float(np.median(plain)),
                4,
            ),
            "epoch0_snapshot_seconds": round(float(last["epoch0_snapshot_seconds"]), 3),
            "store_bytes_per_snapshot": int(last["store_bytes"] / last["snapshots"]),
            "peak_rss_mib": round(max(x["peak_rss_mib"] for x in results if x["variant"] == variant), 1),
        }
        if variant == "deferred":
            summary["modes"][variant]["encode_images_per_s"] = round(
                float(np.median([x["encode_images_per_s"] for x in results if x["variant"] == "deferred"])), 2
            )
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="montrage bench overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per fit")
    p.add_argument("--images-per-concept", type=int, default=16)
    p.add_argument("--repeats", type=int, default=40, help="passes over the images per epoch (demo default)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes, each fitting without / with twice")
    p.add_argument("--mode", default="both", choices=["inline", "deferred", "both"], help="monitoring modes")
    p.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "sd15", "sdxl"],
        help="the tiny base, or random-weight SD 1.5 / SDXL architectures (256 / 1024 px)",
    )
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="where training runs")
    p.add_argument("--resolution", type=int, default=None, help="image side (tiny 16, sd15 256, sdxl 1024)")
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    result = run_overhead(
        epochs=a.epochs,
        images_per_concept=a.images_per_concept,
        repeats=a.repeats,
        rounds=a.rounds,
        out=a.out,
        mode=a.mode,
        model=a.model,
        accelerator=a.accelerator,
        resolution=a.resolution,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_variant":
    print(json.dumps(_variant(*json.loads(sys.argv[2]))))
if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_sequence":
    variants, *rest = json.loads(sys.argv[2])
    print(json.dumps([_variant(v, *rest) for v in variants]))
if __name__ == "__main__" and (len(sys.argv) < 2 or not sys.argv[1].startswith("_")):
    raise SystemExit(main())
