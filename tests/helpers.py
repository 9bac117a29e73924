"""Shared builders for the tests: a small monitored fit on the untrained tiny model."""

import pytorch_lightning as pl

from montrage.callbacks import MontrageCallback
from montrage.recipes import ConceptDataModule, DiffusionFineTune


def callback(store_path, **kw) -> MontrageCallback:
    args = dict(store_path=str(store_path), probe_seeds=[0], num_inference_steps=2, guidance_scale=1.0,
                timesteps=[300, 700], thumbnail_size=8, log_to_wandb=False)
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
    args = dict(max_epochs=max_epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    args.update(kw)
    return pl.Trainer(**args)
