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


def _synthetic_store(path: str, n_train: int, epochs: int, seed: int = 0) -> None:
    """A store shaped like a real tiny-base LoRA run (real model, real adapter layout) with random features."""
    import torch

    from montrage.attribution.fit import default_model_dir, fit_model
    from montrage.attribution.table import feature_names
    from montrage.components import load_components, model_identity
    from montrage.data import TrainExample
    from montrage.probes import default_probes
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.store import StoreReader, StoreSpec, StoreWriter

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = tiny_base_path()
    unet = load_components(base).unet
    lora_cfg = {"r": 8, "lora_alpha": 8.0, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"], "lora_dropout": 0.0}
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=lora_cfg["target_modules"]))
    lora = {k: v.detach().float() for k, v in get_peft_model_state_dict(unet).items()}
    rng = np.random.default_rng(seed)
    concepts = [f"c{k}" for k in range(4)]
    train = [TrainExample(f"img/{i}", concepts[i % 4], "a photo", f"sklearn:digits/{i % 1797}") for i in range(n_train)]
    probes = default_probes({c: c for c in concepts}, "a photo of {token}", [0, 1])
    layers, T, F = ["mid_block"], [200, 500, 800], 64
    spec = StoreSpec(model=model_identity(unet, os.path.basename(base)), layers=layers, feature_dims={"mid_block": F},
                     timesteps=T, pooling="mean", probes=probes, train=train, thumbnail_size=16,
                     lora_names=list(lora), lora_shapes=[list(v.shape) for v in lora.values()],
                     config={"model_path": base, "resolution": 16, "lora_config": lora_cfg, "encode_prompt": "",
                             "num_inference_steps": 10, "guidance_scale": 3.0})
    w = StoreWriter(path, spec, overwrite=True)
    flat = torch.cat([v.flatten() for v in lora.values()]).numpy()
    for e in range(epochs):
        w.append_epoch(e, e * 10, {"mid_block": rng.normal(size=(len(probes), 3, F)).astype(np.float32)},
                       {"mid_block": rng.normal(size=(n_train, 3, F)).astype(np.float32)},
                       np.zeros((len(probes), 16, 16, 3), np.uint8), flat + 0.01 * e)
    w.close()
    with StoreReader(path) as store:
        identity = store.spec["identity"]
    for mode in ("trajectory", "final"):
        names = feature_names(layers, T, epochs, mode)
        x = rng.normal(size=(4, 32, 2 * len(names))).astype(np.float32)
        model, _ = fit_model(x, rng.random((4, 32)).astype(np.float32), steps=5)
        model.save(os.path.join(default_model_dir(path), mode), {"mode": mode, "store_identity": identity,
                                                                 "num_epochs": epochs, "feature_names": names})


def run_query_latency(sizes: tuple[int, ...] = (100, 1000, 10000), epochs: int = 7, repeats: int = 5,
                      out: str | None = None) -> dict:
    """ms per query (fast and full) and attribution-fit time vs the number of training images; TRAK-style cost too."""
    import torch

    from montrage.attribution.fit import fit_model
    from montrage.attribution.query import Attributor
    from montrage.baselines import gradients

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = os.path.join(tmp, f"store{n}.h5")
            _synthetic_store(path, n, epochs)
            att = Attributor.from_store(path)
            q = torch.rand(1, 3, 16, 16) * 2 - 1
            att.query(q, fast=True)  # warm-up: loads the model once, as a long-lived service would
            timing = {}
            for fast in (True, False):
                t = time.perf_counter()
                for _ in range(repeats):
                    att.query(q, top_k=5, fast=fast)
                timing["fast" if fast else "full"] = (time.perf_counter() - t) / repeats * 1000
            # TRAK-style per-query cost: one projected LoRA gradient for the query + kernel scores against n images
            unet = att.model.components.unet
            for name, p in unet.named_parameters():
                p.requires_grad_("lora_" in name)
            t = time.perf_counter()
            for _ in range(repeats):
                g = gradients.lora_gradient_features(unet, att.model.components.vae, att.model.components.scheduler, q,
                                                     att.model.cond([""]), [100, 300, 500, 700, 900], [0], proj_dim=256)
                gradients.trak_scores(g, np.random.default_rng(0).normal(size=(n, 256)).astype(np.float32))
            trak_ms = (time.perf_counter() - t) / repeats * 1000
            att.close()
            x = np.random.default_rng(0).normal(size=(52, n, 112)).astype(np.float32)
            t = time.perf_counter()
            fit_model(x, np.random.default_rng(1).random((52, n)).astype(np.float32), steps=100)
            fit_s = time.perf_counter() - t
            rows.append({"train_images": n, "query_ms_fast": round(timing["fast"], 1), "query_ms_full": round(timing["full"], 1),
                         "trak_query_ms": round(trak_ms, 1), "fit_seconds_100_steps_52_probes": round(fit_s, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    result = {"command": f"montrage bench query --sizes {','.join(map(str, sizes))}", "epochs": epochs, "rows": rows}
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result
