"""Measure the MemorizationGuard on the tiny base: a normal run (the demo's LoRA customization) against a
deliberately over-trained one (the full UNet on one digit image repeated 64 times per epoch).

    montrage bench memorization --out memorization.json   # ~2 min on 2 CPU cores

Writes, per run, the guard's per-snapshot maxima (pixel correlation and centred representation cosine of the
closest (probe, training image) pair) and its alerts at the default threshold; the figures in docs/results.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pytorch_lightning as pl

RUNS = {
    # the demo's customization: LoRA rank 8 on 4 digit concepts x 16 images, 6 epochs of 80 steps
    "normal": dict(
        module=dict(train_mode="lora", lora_rank=8, lora_alpha=8, learning_rate=1e-2),
        data=dict(digits=[1, 4, 7, 9], images_per_concept=16, batch_size=32, repeats=40),
    ),
    # over-trained: the full UNet on one image of a seven, 6 epochs of 4 steps
    "over-trained": dict(
        module=dict(train_mode="full", learning_rate=1e-3),
        data=dict(digits=[7], images_per_concept=1, batch_size=16, repeats=64),
    ),
}


def run(name: str, out_dir: str, epochs: int = 6, seed: int = 0, base: str = "tiny") -> dict:
    from montrage.callbacks import MemorizationGuard, MontrageCallback
    from montrage.recipes import ConceptDataModule, DiffusionFineTune

    cfg = RUNS[name]
    store = os.path.join(out_dir, f"{name}.h5")
    monitor = MontrageCallback(
        store_path=store,
        probe_seeds=[0, 1],
        timesteps=[200, 500, 800],
        num_inference_steps=10,
        guidance_scale=3.0,
        thumbnail_size=16,
        overwrite=True,
        log_to_wandb=False,
        mode="inline",
    )
    # representation_threshold=1.0 only records that measure's maxima; require="any" keeps the pixel rule alone
    guard = MemorizationGuard(representation_threshold=1.0, require="any", log_to_wandb=False)
    pl.seed_everything(seed)
    t0 = time.time()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor, guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(
        DiffusionFineTune(pretrained_model=base, **cfg["module"]), ConceptDataModule(resolution=16, **cfg["data"])
    )
    return {
        "store": store,
        "seconds": round(time.time() - t0, 1),
        "history": guard.history,
        "alerts": len(guard.alerts),
        "first_alert_epoch": min((a["epoch"] for a in guard.alerts), default=None),
        "max_pixel": max(h["max_pixel"] for h in guard.history),
        "max_pixel_after_epoch0": max(h["max_pixel"] for h in guard.history if h["epoch"] > 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="montrage bench memorization", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="memorization.json")
    p.add_argument("--keep", default=None, help="keep the stores in this folder")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="tiny", help="base model folder (default: the cached tiny base, built if missing)")
    args = p.parse_args(argv)
    out_dir = args.keep or tempfile.mkdtemp(prefix="montrage-memorization-")
    results = {name: run(name, out_dir, args.epochs, args.seed, args.base) for name in RUNS}
    for name, r in results.items():
        print(
            f"{name:>13}: max pixel similarity {r['max_pixel']:.3f} per epoch "
            f"{[h['max_pixel'] for h in r['history']]}, alerts {r['alerts']} (first at epoch {r['first_alert_epoch']})"
        )
    with open(args.out, "w") as fh:
        json.dump({"runs": results, "default_pixel_threshold": 0.97}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
