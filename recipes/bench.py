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

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def _cached_random_model(name: str, save) -> str:
    """`<cache>/<name>`: a random-weight pipeline folder, written once by `save(tmp_path)` and renamed when complete."""
    from montrage.recipes.tiny_base import default_cache_dir

    path = os.path.join(default_cache_dir(), name)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        import torch

        torch.manual_seed(0)
        save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def _clip_text(tok, cls_name: str = "CLIPTextModel", hidden: int = 768, layers: int = 12, heads: int = 12, **kw):
    import transformers

    return getattr(transformers, cls_name)(
        transformers.CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **kw,
        )
    )


SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sd15_random_path() -> str:
    """A pipeline folder with Stable Diffusion 1.5's architecture and random weights (built once, cached)."""

    def save(path):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from montrage.recipes.tiny_base import build_tokenizer, save_pipeline

        tok = build_tokenizer(77)
        save_pipeline(
            dict(
                unet=UNet2DConditionModel(**SD15_UNET),
                vae=AutoencoderKL(**SD15_VAE),
                text_encoder=_clip_text(tok),
                tokenizer=tok,
                scheduler=DDPMScheduler(**SCALED_LINEAR),
            ),
            path,
        )

    return _cached_random_model("sd15-random-v1", save)


SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


def sdxl_random_path() -> str:
    """A pipeline folder with SDXL's architecture (2.6 B-parameter UNet, CLIP-L + bigG) and random weights."""

    def save(path):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        from montrage.recipes.tiny_base import build_tokenizer

        tok = build_tokenizer(77)
        StableDiffusionXLPipeline(
            vae=AutoencoderKL(**{**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}),
            text_encoder=_clip_text(tok),
            text_encoder_2=_clip_text(tok, "CLIPTextModelWithProjection", 1280, 32, 20, projection_dim=1280),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=EulerDiscreteScheduler(**{k: v for k, v in SCALED_LINEAR.items() if k != "num_train_timesteps"}),
        ).save_pretrained(path)

    return _cached_random_model("sdxl-random-v1", save)


BASES = {"sd15": sd15_random_path, "sdxl": sdxl_random_path}
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
                "montrage.recipes.bench",
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


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_variant":
    print(json.dumps(_variant(*json.loads(sys.argv[2]))))
if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_sequence":
    variants, *rest = json.loads(sys.argv[2])
    print(json.dumps([_variant(v, *rest) for v in variants]))


def _synthetic_store(path: str, n_train: int, epochs: int, seed: int = 0) -> None:
    """A store shaped like a real tiny-base LoRA run (real model, real adapter layout) with random features."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from montrage.attribution.fit import default_model_dir, fit_model
    from montrage.attribution.table import feature_names
    from montrage.components import load_components, model_identity
    from montrage.data import TrainExample
    from montrage.probes import default_probes
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.store import StoreReader, StoreSpec, StoreWriter

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
        config={
            "model_path": base,
            "resolution": 16,
            "lora_config": lora_cfg,
            "encode_prompt": "",
            "num_inference_steps": 10,
            "guidance_scale": 3.0,
        },
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
        identity = store.spec["identity"]
    for mode in ("trajectory", "final"):
        names = feature_names(layers, T, epochs, mode)
        x = rng.normal(size=(4, 32, 2 * len(names))).astype(np.float32)
        model, _ = fit_model(x, rng.random((4, 32)).astype(np.float32), steps=5)
        model.save(
            os.path.join(default_model_dir(path), mode),
            {"mode": mode, "store_identity": identity, "num_epochs": epochs, "feature_names": names},
        )


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
