"""MontrageCallback: the Lightning adapter over `montrage.Monitor`.

It finds the model's parts on the LightningModule (attributes, dotted paths or a pipeline attribute), the training
images (the train dataloader's dataset, or `images`), the training order (a batch key, or a wrapped loader), and
calls the Monitor from Lightning's hooks: `start` at train start (after a checkpoint restore), `on_batch` and
`maybe_snapshot` after every batch, `maybe_snapshot(epoch=...)` at epoch ends, `close` at train end. Collectives go
through the trainer's strategy, so every rank reaches every one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from montrage.capture import resolve_modules
from montrage.components import ALIASES, EXTRA_PARTS, ModelLoadError
from montrage.monitor import Monitor, MontrageConfigError, MontrageSnapshotError
from montrage.probes import load_probe_file

log = logging.getLogger(__name__)

__all__ = ["MontrageCallback", "MontrageConfigError", "MontrageSnapshotError", "wandb_loggers"]


def wandb_loggers(trainer: pl.Trainer) -> list:
    """The trainer's WandbLoggers (shared by every montrage callback that logs)."""
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class StrategyDistributed:
    """montrage's distributed protocol over a Lightning strategy (gather through torch.distributed, as DDP does)."""

    def __init__(self, trainer: pl.Trainer):
        self.trainer = trainer

    @property
    def rank(self) -> int:
        return self.trainer.global_rank

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def broadcast(self, obj, src: int = 0):
        return self.trainer.strategy.broadcast(obj, src=src)

    def all_gather(self, obj) -> list:
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def barrier(self, name: str) -> None:
        self.trainer.strategy.barrier(name)


def _refuse_sharded(strategy) -> None:
    """FSDP, ModelParallel and DeepSpeed ZeRO-3 shard the denoiser's parameters: a probe pass outside the training
    step would see parameter shards, every forward is a collective that the uneven split of probes across ranks
    would leave unmatched (a hang), and the adapter snapshot would be a shard. Refuse before training instead."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (
        isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False)
    )
    if sharded:
        raise MontrageConfigError(
            f"MontrageCallback does not support {type(strategy).__name__} (parameters sharded across ranks): its probe "
            "passes run the denoiser outside the training step and need whole parameters on every rank. Use "
            "strategy='ddp' (a LoRA run trains few weights, so each GPU holding the frozen base is the usual set-up), "
            "or DeepSpeed ZeRO stage 1 or 2, which shard optimizer state and gradients but not the parameters."
        )


def _dotted(obj, path: str, owner: str):
    try:
        return functools.reduce(getattr, path.split("."), obj)
    except AttributeError:
        raise MontrageConfigError(
            f"components: {owner} has no attribute path {path!r}; give dotted attribute paths "
            "from the LightningModule, e.g. {unet: model.unet, vae: model.vae}."
        ) from None


def module_components(
    pl_module: pl.LightningModule, components: Optional[dict] = None, pipeline: Optional[str] = None
) -> Any:
    """The model's parts on a LightningModule: dotted paths (`components`), a pipeline attribute (`pipeline`), the
    module's own attributes (unet/transformer, vae, text_encoder, tokenizer, noise_scheduler/scheduler), or a
    `pipe`/`pipeline` attribute that is a diffusers pipeline."""
    name = type(pl_module).__name__
    if components:
        return {k: _dotted(pl_module, v, name) for k, v in components.items()}
    if pipeline:
        return _dotted(pl_module, pipeline, name)
    own = {
        k: getattr(pl_module, k)
        for k in sum(ALIASES.values(), ()) + EXTRA_PARTS
        if getattr(pl_module, k, None) is not None
    }
    if any(k in own for k in ALIASES["unet"]):
        return own
    for attr in ("pipe", "pipeline"):
        candidate = getattr(pl_module, attr, None)
        if (
            candidate is not None
            and not callable(getattr(candidate, "__func__", None))
            and hasattr(candidate, "components")
        ):
            return candidate
    return own


class MontrageCallback(Callback):
    """Monitor a diffusion fine-tuning run for attribution (a Lightning adapter over `montrage.Monitor`).

    Args:
        store_path: the run's HDF5 store (one file per run).
        probe_prompts: probe prompts; their concept weights are the concepts whose token the prompt names.
            Default: one prompt per training concept from `probe_template`, plus pairs when `probe_mixtures`.
        probe_seeds: seeds crossed with every prompt (fixed initial latents).
        probe_file: JSON/YAML file of `{probes: [{prompt, concepts: {name: weight}}]}`; overrides `probe_prompts`.
        every_n_epochs, every_n_steps, at_steps: the schedule (default every epoch); step 0 and the final step are
            always snapshotted, also under `max_steps` with `max_epochs=-1`.
        layers: denoiser modules to hook, by dotted name (default: the family's, e.g. the UNet bottleneck
            "mid_block", the "h-space", or a middle joint block of SD3/Flux, whose image tokens are pooled).
        timesteps: timesteps at which images are noised (fixed epsilon per image) and encoded.
        pooling: how activations are reduced to a vector.
        encode_prompt: text condition used when encoding images: "" (default) = the empty prompt for all, an
            image-only space that serves queries whose prompt is unknown; "{caption}" = each training image under
            its caption and each probe under its prompt, as the model processes them -- stronger when queries come
            with the prompt that made them (your own model's generations), weak without it.
        num_inference_steps, guidance_scale: the probe sampler (DDIM).
        thumbnail_size: side of the probe image thumbnails kept in the store.
        save_lora_snapshots: keep the adapter weights of every snapshot (so queries can be re-encoded per snapshot).
        components: dotted attribute paths of the model's parts on the LightningModule, e.g. {unet: model.unet,
            vae: model.vae, text_encoder: model.text_encoder, tokenizer: model.tokenizer, scheduler: model.sched}.
        pipeline: name of a LightningModule attribute holding a diffusers pipeline over the live modules.
        images: the training images, if not the train dataloader's dataset (a folder or a list of paths).
        image_key, caption_key, id_key, concept_key: item keys (column names) of dict datasets (default: image,
            caption, id, concept; for a Hugging Face Dataset: image, text, no id, no concept).
        monitor_images: None (all), a count, a fraction in (0, 1], or a list of ids; a stable subset.
        subset_seed: seed of the stable subset.
        resolution: side of the monitored images (default: the dataset's `size`, else the model's native size).
        latent_cache: keep the monitored images' VAE latents on disk beside the store (frozen VAE only).
        overwrite: replace an existing store of a finished run instead of refusing.
        log_to_wandb: log similarity curves, a probe grid and the store artifact to an attached WandbLogger.
        strict: stop training when monitoring fails (a snapshot, non-finite activations, the training order, W&B).
            Default False: the failing piece is skipped with a logged warning and training goes on. Configuration
            errors raise before training starts either way.
    """

    def __init__(
        self,
        store_path: str = "montrage_store.h5",
        probe_prompts: Optional[list[str]] = None,
        probe_seeds: list[int] = [0, 1],
        probe_file: Optional[str] = None,
        probe_template: str = "a photo of {token}",
        probe_mixtures: bool = True,
        every_n_epochs: Optional[int] = None,
        every_n_steps: Optional[int] = None,
        at_steps: Optional[list[int]] = None,
        layers: Optional[list[str]] = None,
        timesteps: list[int] = [200, 500, 800],
        pooling: Literal["mean", "max", "mean_max"] = "mean",
        encode_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        thumbnail_size: int = 64,
        save_lora_snapshots: bool = True,
        mode: Literal["auto", "inline", "deferred"] = "auto",
        projection_width: Optional[int] = 128,
        projection_seed: int = 0,
        encode_batch_size: int = 32,
        components: Optional[dict[str, str]] = None,
        pipeline: Optional[str] = None,
        images: Optional[Union[str, list[str]]] = None,
        image_key: Optional[str] = None,
        caption_key: Optional[str] = None,
        id_key: Optional[str] = None,
        concept_key: Optional[str] = None,
        monitor_images: Optional[Union[int, float, list[str]]] = None,
        subset_seed: int = 0,
        resolution: Optional[int] = None,
        latent_cache: bool = True,
        overwrite: bool = False,
        log_to_wandb: bool = True,
        strict: bool = False,
    ):
        super().__init__()
        if every_n_epochs is None and every_n_steps is None and not at_steps:
            every_n_epochs = 1
        self.store_path = store_path
        self.components, self.pipeline = components, pipeline
        self.log_to_wandb = log_to_wandb
        self.probe_file, self.layers = probe_file, list(layers) if layers is not None else None
        self.images = images
        self.resolution = resolution
        self._monitor_args = dict(
            probe_prompts=probe_prompts,
            probe_seeds=probe_seeds,
            probe_file=probe_file,
            probe_template=probe_template,
            probe_mixtures=probe_mixtures,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            at_steps=at_steps,
            layers=layers,
            timesteps=timesteps,
            pooling=pooling,
            encode_prompt=encode_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            thumbnail_size=thumbnail_size,
            save_lora_snapshots=save_lora_snapshots,
            mode=mode,
            projection_width=projection_width,
            projection_seed=projection_seed,
            encode_batch_size=encode_batch_size,
            image_keys={
                k: v
                for k, v in (
                    ("image_key", image_key),
                    ("caption_key", caption_key),
                    ("id_key", id_key),
                    ("concept_key", concept_key),
                )
                if v is not None
            },
            monitor_images=monitor_images,
            subset_seed=subset_seed,
            latent_cache=latent_cache,
            overwrite=overwrite,
            strict=strict,
            log_to_wandb=log_to_wandb,
        )
        Monitor(store_path, **self._monitor_args)  # argument errors surface here, at construction
        self.monitor: Optional[Monitor] = None
        self._state: Optional[dict] = None
        self._last_step: Optional[int] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(store_path=self.store_path)

    @property
    def snapshots_written(self) -> int:
        return self.monitor.snapshots_written if self.monitor is not None else 0

    # --- set-up ----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_sharded(getattr(trainer, "strategy", None))
        parts = module_components(pl_module, self.components, self.pipeline)
        from montrage.components import resolve_components

        try:
            c = resolve_components(parts, where=f"LightningModule {type(pl_module).__name__}")
        except ModelLoadError as err:
            raise MontrageConfigError(
                f"{err} On a LightningModule, assign the parts as attributes (self.unet = ..., as "
                "montrage.recipes.DiffusionFineTune does), or set components: {unet: model.unet, ...} (dotted paths), "
                "or pipeline: <attribute holding a diffusers pipeline>."
            ) from err
        if self.layers:
            resolve_modules(c.unet, self.layers)  # unknown module names fail before training starts
        if self.probe_file is not None:
            load_probe_file(self.probe_file, self._monitor_args["probe_seeds"])

    def _images(self, trainer: pl.Trainer):
        if self.images is not None:
            return self.images
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None:
            raise MontrageConfigError(
                "MontrageCallback found no training dataset (trainer.train_dataloader.dataset); "
                "set images: <folder or list of paths>."
            )
        return dataset

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = self._images(trainer)
        tokens = {}
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "concept_tokens"):
            tokens = dict(trainer.datamodule.concept_tokens())
        inner = getattr(images, "dataset", images) if getattr(images, "montrage_wrapped", False) else images
        resolution = self.resolution or getattr(inner, "size", None)
        steps = trainer.estimated_stepping_batches
        max_steps = int(steps) if steps is not None and steps != float("inf") else None
        model_id = getattr(pl_module, "model_id", None)
        self.monitor = Monitor(
            self.store_path,
            module_components(pl_module, self.components, self.pipeline),
            images,
            resolution=resolution,
            concept_tokens=tokens,
            max_steps=max_steps,
            model_id=model_id,
            dist=StrategyDistributed(trainer),
            progress=trainer.is_global_zero,
            **self._monitor_args,
        )
        self.monitor.wandb_runs = lambda: [lg.experiment for lg in wandb_loggers(trainer)] if self.log_to_wandb else []
        if self._state is not None:
            self.monitor.load_state_dict(self._state)
        self._last_step = trainer.global_step
        self.monitor.start(step=trainer.global_step, epoch=trainer.current_epoch)

    # --- training ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = self.monitor
        m.on_batch(batch, epoch=trainer.current_epoch)
        step = trainer.global_step
        if batch_idx + 1 == trainer.num_training_batches:
            return  # the epoch's last step is taken up by on_train_epoch_end, with the epoch
        if step != self._last_step:  # an optimizer step happened (not a gradient-accumulation micro-batch)
            self._last_step = step
            m.maybe_snapshot(step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.monitor.maybe_snapshot(trainer.global_step, epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close(step=trainer.global_step, epoch=self.monitor.epoch)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def wrap_dataloader(self, loader):
        """A loader whose dict batches carry their dataset indices (for datasets without an `index` key)."""
        from montrage.training_order import wrap_dataloader

        return wrap_dataloader(loader)

    def train_thumbnails(self, size: int):
        return self.monitor.train_thumbnails(size)

    # --- resumable state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return dict(self._state or {"snapshots_written": 0, "order_rows": 0, "store_path": self.store_path})
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.setdefault("snapshots_written", state.get("epochs_written", 0))
        self._state = state
