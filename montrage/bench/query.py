"""`montrage bench query`: query latency against the training-set size, on synthetic stores shaped like a real
tiny-base LoRA run (real model and adapter layout, random features)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np


def _synthetic_store(path: str, n_train: int, epochs: int, seed: int = 0) -> None:
    """A store shaped like a real tiny-base LoRA run (real model, real adapter layout) with random features."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from montrage.attribution.fit import default_model_dir, fit_model, model_meta
    from montrage.bench import synthetic_run
    from montrage.components import load_components, model_identity
    from montrage.data import TrainExample
    from montrage.probes import default_probes
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.store import StoreReader, StoreSpec, StoreWriter

    base = tiny_base_path()
    components = load_components(base)
    unet = components.unet
    lora_cfg = {"r": 8, "lora_alpha": 8.0, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"], "lora_dropout": 0.0}
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=lora_cfg["target_modules"]))
    lora = {k: v.detach().float() for k, v in get_peft_model_state_dict(unet).items()}
    rng = np.random.default_rng(seed)
    concepts = [f"c{k}" for k in range(4)]
    train = [TrainExample(f"img/{i}", concepts[i % 4], "a photo", f"sklearn:digits/{i % 1797}") for i in range(n_train)]
    probes = default_probes({c: c for c in concepts}, "a photo of {token}", [0, 1])
    layers, T, F = ["mid_block"], [200, 500, 800], 64
    spec = StoreSpec(
        model=model_identity(unet, os.path.basename(base)),
        layers=layers,
        feature_dims={"mid_block": F},
        timesteps=T,
        pooling="mean",
        probes=probes,
        train=train,
        thumbnail_size=16,
        lora_names=list(lora),
        lora_shapes=[list(v.shape) for v in lora.values()],
        config=synthetic_run(components, base, layers, T, "mean", lora_cfg["target_modules"]),
    )
    w = StoreWriter(path, spec, overwrite=True)
    flat = torch.cat([v.flatten() for v in lora.values()]).numpy()
    for e in range(epochs):
        w.append_epoch(
            e,
            e * 10,
            {"mid_block": rng.normal(size=(len(probes), 3, F)).astype(np.float32)},
            {"mid_block": rng.normal(size=(n_train, 3, F)).astype(np.float32)},
            np.zeros((len(probes), 16, 16, 3), np.uint8),
            flat + 0.01 * e,
        )
    w.close()
    with StoreReader(path) as store:
        for mode in ("trajectory", "final"):
            meta = model_meta(store, mode)
            x = rng.normal(size=(4, 32, 2 * len(meta["feature_names"]))).astype(np.float32)
            model, _ = fit_model(x, rng.random((4, 32)).astype(np.float32), steps=5)
            model.save(os.path.join(default_model_dir(path), mode), meta)


def run_query_latency(
    sizes: tuple[int, ...] = (100, 1000, 10000), epochs: int = 7, repeats: int = 5, out: str | None = None
) -> dict:
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
                g = gradients.lora_gradient_features(
                    unet,
                    att.model.components.vae,
                    att.model.components.scheduler,
                    q,
                    att.model.cond([""]),
                    [100, 300, 500, 700, 900],
                    [0],
                    proj_dim=256,
                )
                gradients.trak_scores(g, np.random.default_rng(0).normal(size=(n, 256)).astype(np.float32))
            trak_ms = (time.perf_counter() - t) / repeats * 1000
            att.close()
            x = np.random.default_rng(0).normal(size=(52, n, 112)).astype(np.float32)
            t = time.perf_counter()
            fit_model(x, np.random.default_rng(1).random((52, n)).astype(np.float32), steps=100)
            fit_s = time.perf_counter() - t
            rows.append(
                {
                    "train_images": n,
                    "query_ms_fast": round(timing["fast"], 1),
                    "query_ms_full": round(timing["full"], 1),
                    "trak_query_ms": round(trak_ms, 1),
                    "fit_seconds_100_steps_52_probes": round(fit_s, 2),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    result = {"command": f"montrage bench query --sizes {','.join(map(str, sizes))}", "epochs": epochs, "rows": rows}
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="montrage bench query", description=__doc__)
    p.add_argument("--sizes", default="100,1000,10000", help="training-set sizes (synthetic stores), comma-separated")
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    print(json.dumps(run_query_latency(tuple(int(n) for n in a.sizes.split(",")), out=a.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
