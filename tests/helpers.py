"""Shared builders for the tests: a small monitored fit on the untrained tiny model, store specs and arrays,
a fake W&B logger, and the crash-writer script's path."""

import os
import types

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from montrage.callbacks import MontrageCallback
from montrage.data import TrainExample, to_thumbnails
from montrage.generate import build_pipeline, generate_probes
from montrage.probes import ProbeSet
from montrage.recipes import ConceptDataModule, DiffusionFineTune
from montrage.store import StoreSpec

CRASH_WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_writer.py")


def callback(store_path, **kw) -> MontrageCallback:
    args = dict(
        store_path=str(store_path),
        probe_seeds=[0],
        num_inference_steps=2,
        guidance_scale=1.0,
        timesteps=[300, 700],
        thumbnail_size=8,
        log_to_wandb=False,
        mode="inline",
    )
    args.update(kw)
    return MontrageCallback(**args)


def module(model_dir, **kw) -> DiffusionFineTune:
    args = dict(pretrained_model=model_dir, learning_rate=1e-3)
    args.update(kw)
    return DiffusionFineTune(**args)


def data(**kw) -> ConceptDataModule:
    args = dict(digits=[1, 7], images_per_concept=3, batch_size=4, resolution=16)
    args.update(kw)
    return ConceptDataModule(**args)


def trainer(max_epochs=2, callbacks=(), **kw) -> pl.Trainer:
    args = dict(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    args.update(kw)
    return pl.Trainer(**args)


def make_spec(
    prompts=("a photo of one", "a photo of seven"), model_id="m", layers=("mid_block",), lora=True
) -> StoreSpec:
    probes = ProbeSet(
        tuple(prompts), tuple({"digit1": 1.0} if "one" in p else {"digit7": 1.0} for p in prompts), (0, 1)
    )
    train = [TrainExample(f"digits/{i}", "digit1" if i < 3 else "digit7", "cap", f"p{i}") for i in range(5)]
    return StoreSpec(
        model={"model_id": model_id},
        layers=list(layers),
        feature_dims={l: 6 for l in layers},
        timesteps=[100, 500],
        pooling="mean",
        probes=probes,
        train=train,
        thumbnail_size=4,
        lora_names=["a", "b"] if lora else [],
        lora_shapes=[[2, 3], [3]] if lora else [],
    )


def epoch_arrays(spec, value):
    P, N = len(spec.probes), len(spec.train)
    probe = {l: np.full((P, 2, 6), value, np.float32) for l in spec.layers}
    train = {l: np.full((N, 2, 6), value + 0.5, np.float32) for l in spec.layers}
    return probe, train, np.full((P, 4, 4, 3), int(value) % 255, np.uint8), np.arange(9, dtype=np.float32) + value


def copy_data_dir(model_dir, root, resolution=16) -> str:
    """seven/ holds the model's own generation for 'a photo of seven' (seed 0, the callback's sampler); one/ a digit."""
    m = module(model_dir)
    pipe = build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler)
    probes = ProbeSet(("a photo of seven",), ({"seven": 1.0},), (0,))
    with torch.no_grad():
        img = generate_probes(pipe, probes, resolution, 2, 1.0)[0]
    for concept, pixels in (("seven", img), ("one", torch.rand(3, resolution, resolution) * 2 - 1)):
        os.makedirs(os.path.join(root, concept), exist_ok=True)
        Image.fromarray(to_thumbnails(pixels[None], resolution)[0]).save(os.path.join(root, concept, "0.png"))
    return str(root)


class FakeExperiment:
    """Records what a WandbLogger's run is asked to log (wandb itself is disabled in tests)."""

    def __init__(self):
        self.logged = []
        self.config = types.SimpleNamespace(update=lambda *a, **k: None)

    def __getattr__(self, name):  # define_metric, watch, ...: no-ops
        return lambda *a, **k: None

    def log(self, payload, **kw):
        self.logged.append(payload)


def fake_wandb_logger():
    from pytorch_lightning.loggers import WandbLogger

    class Fake(WandbLogger):
        @property
        def experiment(self):
            return self._fake

    lg = Fake(offline=True)
    lg._fake = FakeExperiment()
    return lg
