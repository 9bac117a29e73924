"""MontrageCallback: snapshot probe generations and training images into an HDF5 store during fine-tuning.

At epoch 0 (before the first update) and every `every_n_epochs` epochs it generates the fixed probes with the
current weights, encodes probe images and all training images with a fixed (t, epsilon) per image through forward
hooks on named UNet modules, and appends the pooled activations to the store. It also records the training order
(which examples each optimizer step saw) and, for LoRA runs, a per-epoch adapter snapshot.

Distributed: every rank runs every hook and reaches every collective; encoding work is split across ranks and
gathered; only global rank 0 opens and writes the store. A failure on any rank is made known to all ranks before
the next collective, so that they skip (or, with strict=True, stop) together and nobody waits at a barrier.

Failures: configuration errors (module, data, probes, store path or mismatch) raise before the first training
step. A failure while monitoring (a snapshot, non-finite activations, the training order, W&B) skips that piece
with a logged warning and training goes on, unless strict=True.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.seed import isolate_rng

from montrage.capture import resolve_modules
from montrage.components import model_identity
from montrage.data import to_thumbnails
from montrage.encode import condition_prompts, encode_conditioned, stable_seed
from montrage.generate import build_pipeline, generate_probes
from montrage.probes import ProbeSet, default_probes, load_probe_file
from montrage.similarity import concept_similarity, flatten_features
from montrage.store import StoreSpec, StoreWriter

REQUIRED_ATTRS = ("unet", "vae", "text_encoder", "tokenizer", "noise_scheduler")
log = logging.getLogger(__name__)


class MontrageConfigError(ValueError):
    """The callback cannot monitor this module or data (named attribute, file or field, and the fix)."""


def wandb_loggers(trainer: pl.Trainer) -> list:
    """The trainer's WandbLoggers (shared by every montrage callback that logs)."""
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class MontrageSnapshotError(RuntimeError):
    """Monitoring failed during training (on some rank); skipped with a warning unless strict=True."""


def _non_finite(probe_feats: dict, train_feats: dict, lora, probe_names: list[str], train_ids: list[str]) -> str:
    """'' when every value is finite, else which layers, probes, training images (or the adapter) are not."""

    def rows(arr, names):
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        shown = [names[i] for i in np.flatnonzero(bad)[:3]]
        return f"{int(bad.sum())} of {len(arr)} ({', '.join(shown)}{', ...' if bad.sum() > 3 else ''})" if bad.any() else ""

    found = []
    for layer in probe_feats:
        for kind, arr, names in (("probes", probe_feats[layer], probe_names), ("training images", train_feats[layer], train_ids)):
            if r := rows(arr, names):
                found.append(f"layer {layer!r}, {kind} {r}")
    if lora is not None and not np.isfinite(lora).all():
        found.append("the LoRA weights")
    return "; ".join(found)


def _refuse_sharded(strategy) -> None:
    """FSDP, ModelParallel and DeepSpeed ZeRO-3 shard the UNet's parameters: a probe pass outside the training step
    would see parameter shards, every forward is a collective that the uneven split of probes across ranks would
    leave unmatched (a hang), and the LoRA snapshot would be a shard. Refuse before training instead."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (
        isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False))
    if sharded:
        raise MontrageConfigError(
            f"MontrageCallback does not support {type(strategy).__name__} (parameters sharded across ranks): its probe "
            "passes run the UNet outside the training step and need whole parameters on every rank. Use "
            "strategy='ddp' (a LoRA run trains few weights, so each GPU holding the frozen base is the usual set-up), "
            "or DeepSpeed ZeRO stage 1 or 2, which shard optimizer state and gradients but not the parameters."
        )


class MontrageCallback(Callback):
    """Monitor a diffusion fine-tuning run for attribution.

    Args:
        store_path: the run's HDF5 store (one file per run).
        probe_prompts: probe prompts; their concept weights are the concepts whose token the prompt names.
            Default: one prompt per training concept from `probe_template`, plus pairs when `probe_mixtures`.
        probe_seeds: seeds crossed with every prompt (fixed initial latents).
        probe_file: JSON/YAML file of `{probes: [{prompt, concepts: {name: weight}}]}`; overrides `probe_prompts`.
        every_n_epochs: snapshot period (epoch 0 is always snapshotted; the last epoch too).
        layers: UNet modules to hook, by dotted name (default the bottleneck, "h-space").
        timesteps: timesteps at which images are noised (fixed epsilon per image) and encoded.
        pooling: how activations are reduced to a vector.
        encode_prompt: text condition used when encoding images: "" (default) = the empty prompt for all, an
            image-only space that serves queries whose prompt is unknown; "{caption}" = each training image under
            its caption and each probe under its prompt, as the model processes them -- stronger when queries come
            with the prompt that made them (your own model's generations), weak without it.
        num_inference_steps, guidance_scale: the probe sampler (DDIM).
        thumbnail_size: side of the probe image thumbnails kept in the store.
        save_lora_snapshots: keep the adapter weights of every snapshot (so queries can be re-encoded per epoch).
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
        every_n_epochs: int = 1,
        layers: list[str] = ["mid_block"],
        timesteps: list[int] = [200, 500, 800],
        pooling: Literal["mean", "max", "mean_max"] = "mean",
        encode_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        thumbnail_size: int = 64,
        save_lora_snapshots: bool = True,
        encode_batch_size: int = 32,
        overwrite: bool = False,
        log_to_wandb: bool = True,
        strict: bool = False,
    ):
        super().__init__()
        if probe_prompts is not None and len(probe_prompts) == 0:
            raise MontrageConfigError("probe_prompts is empty: list at least one prompt, or leave it unset (null) for "
                                      "one probe per training concept from probe_template.")
        if len(probe_seeds) == 0:
            raise MontrageConfigError("probe_seeds is empty: give at least one seed, e.g. [0, 1].")
        if every_n_epochs < 1:
            raise MontrageConfigError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if not layers:
            raise MontrageConfigError("layers is empty: name at least one UNet module to hook, e.g. 'mid_block'.")
        if not timesteps:
            raise MontrageConfigError("timesteps is empty: give at least one timestep, e.g. [500].")
        self.store_path = store_path
        self.probe_prompts = list(probe_prompts) if probe_prompts else None
        self.probe_seeds = [int(s) for s in probe_seeds]
        self.probe_file = probe_file
        self.probe_template = probe_template
        self.probe_mixtures = probe_mixtures
        self.every_n_epochs = int(every_n_epochs)
        self.layers = list(layers)
        self.timesteps = [int(t) for t in timesteps]
        self.pooling = pooling
        self.encode_prompt = encode_prompt
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.thumbnail_size = int(thumbnail_size)
        self.save_lora_snapshots = save_lora_snapshots
        self.encode_batch_size = int(encode_batch_size)
        self.overwrite = overwrite
        self.log_to_wandb = log_to_wandb
        self.strict = bool(strict)
        # run state (the resumable part is in state_dict)
        self.epochs_written = 0
        self.order_rows = 0
        self._resume: Optional[tuple[int, int]] = None
        self._writer: Optional[StoreWriter] = None
        self._order: list[tuple[int, int]] = []
        self._probes: Optional[ProbeSet] = None
        self._curves: list[np.ndarray] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(store_path=self.store_path)

    # --- validation ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_sharded(getattr(trainer, "strategy", None))
        missing = [a for a in REQUIRED_ATTRS if getattr(pl_module, a, None) is None]
        if missing:
            raise MontrageConfigError(
                f"MontrageCallback needs the LightningModule to expose {', '.join(REQUIRED_ATTRS)}; "
                f"{type(pl_module).__name__} lacks: {', '.join(missing)}. Assign the diffusers components as attributes "
                "(e.g. self.unet = UNet2DConditionModel...), as montrage.recipes.DiffusionFineTune does."
            )
        resolve_modules(pl_module.unet, self.layers)  # unknown module names fail before training starts
        if self.probe_file is not None:
            load_probe_file(self.probe_file, self.probe_seeds)

    def _dataset(self, trainer: pl.Trainer):
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "examples") or not hasattr(dataset, "pixels"):
            raise MontrageConfigError(
                "MontrageCallback needs the training dataset to expose `examples` (TrainExample records with stable "
                "ids) and `pixels` (N, 3, H, W in [-1, 1]); use montrage.data.ConceptImageDataset or add them."
            )
        return dataset

    @staticmethod
    def _check_pixels(dataset, vae) -> None:
        """Training pixels the encoder can take: (N, 3, H, W), finite, H and W multiples of the VAE's downsampling."""
        px, n = dataset.pixels, len(dataset.examples)
        shape = tuple(px.shape) if hasattr(px, "shape") else type(px).__name__
        if not isinstance(px, torch.Tensor) or px.ndim != 4 or px.shape[1] != 3 or len(px) != n:
            raise MontrageConfigError(
                f"dataset.pixels must be a tensor of shape ({n}, 3, H, W) in [-1, 1], one row per example; got {shape}. "
                "Convert every image to RGB first (montrage.data.load_image does, whatever its mode)."
            )
        factor = 2 ** (len(getattr(vae.config, "block_out_channels", [0])) - 1)
        if px.shape[-1] % factor or px.shape[-2] % factor:
            raise MontrageConfigError(f"dataset.pixels are {px.shape[-2]}x{px.shape[-1]}; the VAE needs sides that are "
                                      f"multiples of {factor}. Resize the images (e.g. resolution: 512).")
        finite = torch.isfinite(px.reshape(n, -1)).all(dim=1)
        if not bool(finite.all()):
            bad = [dataset.examples[i].id for i in torch.nonzero(~finite).flatten().tolist()[:3]]
            raise MontrageConfigError(f"dataset.pixels of {int((~finite).sum())} training image(s) are not finite "
                                      f"(e.g. {', '.join(bad)}); fix or drop them.")

    def _build_probes(self, dataset) -> ProbeSet:
        concepts = sorted({e.concept for e in dataset.examples})
        tokens = self._tokens
        if self.probe_file is not None:
            return load_probe_file(self.probe_file, self.probe_seeds)
        if self.probe_prompts:
            weights = []
            for prompt in self.probe_prompts:
                named = [c for c in concepts if re.search(rf"\b{re.escape(tokens.get(c, c))}\b", prompt)]
                weights.append({c: 1.0 / len(named) for c in named})
            return ProbeSet(tuple(self.probe_prompts), tuple(weights), tuple(self.probe_seeds), tuple(concepts))
        return default_probes({c: tokens.get(c, c) for c in concepts}, self.probe_template, self.probe_seeds, self.probe_mixtures)

    # --- distributed helpers -------------------------------------------------------------------------------
    @staticmethod
    def _gather(trainer: pl.Trainer, obj: Any) -> list:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * trainer.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def _rank0_do(self, trainer: pl.Trainer, fn) -> Optional[Exception]:
        """Run fn on global rank 0 only and return its error on every rank (None if it worked): all ranks then act
        alike, and nobody waits at a barrier that another rank skipped."""
        error = None
        if trainer.is_global_zero:
            try:
                fn()
            except Exception as err:  # returned below on every rank
                error = err
        message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
        if message is None:
            return None
        return error if error is not None else MontrageSnapshotError(f"MontrageCallback failed on global rank 0: {message}")

    def _monitoring_failed(self, trainer: pl.Trainer, what: str, error: Exception) -> None:
        """strict: raise (on every rank, as every rank gets here); otherwise warn once and let training go on."""
        if self.strict:
            raise error
        if trainer.is_global_zero:
            log.warning("montrage: %s failed and was skipped; training goes on (strict=False). %s: %s",
                        what, type(error).__name__, error)

    # --- store lifecycle -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._dataset(trainer)
        self._check_pixels(dataset, pl_module.vae)
        # concept name -> the token its captions use; a data module may say (default: the concept name)
        self._tokens = dict(getattr(trainer.datamodule, "concept_tokens", dict)()) if trainer.datamodule is not None else {}
        self._probes = self._build_probes(dataset)
        self._resolution = int(dataset.pixels.shape[-1])
        dims = {k: v.shape[-1] for k, v in self._encode(pl_module, dataset.pixels[:1], ["dims"], [dataset.examples[0].caption]).items()}
        lora_names, lora_shapes = [], []
        if self.save_lora_snapshots and getattr(pl_module.unet, "peft_config", None):
            sd = self._lora_state(pl_module)
            lora_names, lora_shapes = list(sd), [list(v.shape) for v in sd.values()]
        identity = getattr(pl_module, "base_identity", None) or model_identity(pl_module.unet, getattr(pl_module, "model_id", "unknown"))
        spec = StoreSpec(
            model=identity, layers=self.layers, feature_dims=dims, timesteps=self.timesteps, pooling=self.pooling,
            probes=self._probes, train=list(dataset.examples), thumbnail_size=self.thumbnail_size,
            lora_names=lora_names, lora_shapes=lora_shapes,
            config={**self._config(), **self._model_facts(pl_module, self._resolution)},
        )
        resume = self._resume

        def open_store():
            self._writer = StoreWriter(self.store_path, spec, overwrite=self.overwrite, truncate_to=resume)
            self.epochs_written, self.order_rows = self._writer.committed  # resume: at most the checkpoint's

        error = self._rank0_do(trainer, open_store)
        if error is not None:  # a configuration error: before the first training step, so raise
            raise error
        self.epochs_written, self.order_rows = trainer.strategy.broadcast((self.epochs_written, self.order_rows), src=0)
        if self.epochs_written == 0:
            self._snapshot(trainer, pl_module, epoch=0)

    def _config(self) -> dict:
        keys = ("store_path", "probe_prompts", "probe_seeds", "probe_file", "probe_template", "probe_mixtures",
                "every_n_epochs", "layers", "timesteps", "pooling", "encode_prompt", "num_inference_steps",
                "guidance_scale", "thumbnail_size", "save_lora_snapshots")
        return {k: getattr(self, k) for k in keys}

    @staticmethod
    def _model_facts(pl_module, resolution: int) -> dict:
        """What an offline query needs to rebuild the model: base path, adapter config, image size."""
        facts = {"model_path": str(getattr(pl_module.unet.config, "_name_or_path", "")), "resolution": resolution}
        peft_config = getattr(pl_module.unet, "peft_config", None)
        if peft_config:
            cfg = next(iter(peft_config.values()))
            facts["lora_config"] = {"r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha),
                                    "target_modules": sorted(cfg.target_modules), "lora_dropout": float(cfg.lora_dropout)}
        return facts

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        error = self._rank0_do(trainer, lambda: self._log_artifact(trainer))
        if error is not None:
            self._monitoring_failed(trainer, "logging the store artifact to W&B", error)
        trainer.strategy.barrier("montrage-train-end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # --- training order ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "index" in batch:
            step = trainer.global_step
            self._order.extend((step, int(i)) for i in batch["index"].tolist())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = [r for part in self._gather(trainer, self._order) for r in part]
        self._order = []
        epoch = trainer.current_epoch
        if rows:
            arr = np.array(sorted(rows), dtype=np.int64)

            def write():
                self.order_rows = self._writer.append_order(epoch, arr[:, 0], arr[:, 1])

            error = self._rank0_do(trainer, write)
            if error is not None:
                self._monitoring_failed(trainer, f"recording the training order of epoch {epoch}", error)
            else:
                self.order_rows = trainer.strategy.broadcast(self.order_rows, src=0)
        done = epoch + 1
        last = trainer.max_epochs is not None and done >= trainer.max_epochs
        if done % self.every_n_epochs == 0 or last:
            self._snapshot(trainer, pl_module, epoch=done)

    # --- the snapshot --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _probe_mode(self, pl_module: pl.LightningModule):
        """eval + no_grad + isolated RNG, with every submodule's train/eval mode restored afterwards."""
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with isolate_rng(), torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _encode(self, pl_module, images: torch.Tensor, keys: list[str], texts: list[str]) -> dict[str, np.ndarray]:
        """Pooled activations of images under their texts (captions / probe prompts) or the fixed `encode_prompt`."""
        with self._probe_mode(pl_module):
            return encode_conditioned(
                pl_module.unet, pl_module.vae, pl_module.noise_scheduler, pl_module.tokenizer, pl_module.text_encoder,
                images, [stable_seed(k) for k in keys], condition_prompts(self.encode_prompt, texts), self.timesteps,
                self.layers, self.pooling, self.encode_batch_size,
            )

    def _lora_state(self, pl_module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(pl_module.unet).items()}

    def _local_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset) -> dict:
        """This rank's share: its probes generated and encoded, its training images encoded, the adapter weights."""
        rank, world = trainer.global_rank, trainer.world_size
        probes = self._probes
        p_idx = list(range(rank, len(probes), world))
        t_idx = list(range(rank, len(dataset.examples), world))
        with self._probe_mode(pl_module):
            pipe = build_pipeline(pl_module.tokenizer, pl_module.text_encoder, pl_module.vae, pl_module.unet,
                                  pl_module.noise_scheduler)
            images = generate_probes(pipe, probes, self._resolution, self.num_inference_steps, self.guidance_scale,
                                     indices=p_idx)
        items = probes.items()
        probe_keys = [f"probe/{prompt}/{seed}" for prompt, seed in items]
        lora = None
        if trainer.is_global_zero and self.save_lora_snapshots and getattr(pl_module.unet, "peft_config", None):
            lora = torch.cat([v.flatten() for v in self._lora_state(pl_module).values()]).numpy()
        return {
            "p_idx": p_idx, "t_idx": t_idx,
            "probe": self._encode(pl_module, images, [probe_keys[k] for k in p_idx], [items[k][0] for k in p_idx]),
            "train": self._encode(pl_module, dataset.pixels[t_idx], [dataset.examples[k].id for k in t_idx],
                                  [dataset.examples[k].caption for k in t_idx]),
            "thumbs": to_thumbnails(images, self.thumbnail_size),
            "lora": lora,
        }

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Take and write one snapshot; a failure on any rank skips it on every rank (or raises, when strict)."""
        dataset = self._dataset(trainer)
        probes = self._probes
        error = None
        try:
            local = self._local_snapshot(trainer, pl_module, dataset)
        except Exception as err:  # told to every rank by the gather below
            error, local = err, {"error": f"rank {trainer.global_rank}: {type(err).__name__}: {err}"}
        lora = local.pop("lora", None)  # rank 0's, kept out of the gather
        parts = self._gather(trainer, local)
        failed = [p["error"] for p in parts if "error" in p]
        if failed:
            return self._monitoring_failed(trainer, f"the snapshot of epoch {epoch}",
                                           error or MontrageSnapshotError("; ".join(failed)))

        def assemble(kind: str, n: int, idx_key: str) -> dict[str, np.ndarray]:
            out = {}
            for layer in self.layers:
                first = parts[0][kind][layer]
                arr = np.zeros((n, *first.shape[1:]), np.float32)
                for part in parts:
                    arr[part[idx_key]] = part[kind][layer]
                out[layer] = arr
            return out

        written = {}

        def write():
            probe_feats = assemble("probe", len(probes), "p_idx")
            train_feats = assemble("train", len(dataset.examples), "t_idx")
            bad = _non_finite(probe_feats, train_feats, lora, [f"{p} (seed {s})" for p, s in probes.items()],
                              [e.id for e in dataset.examples])
            if bad:
                raise MontrageSnapshotError(f"non-finite values, nothing written for epoch {epoch}: {bad}. The "
                                            "model may have diverged (check the loss and learning rate).")
            thumbs = np.zeros((len(probes), self.thumbnail_size, self.thumbnail_size, 3), np.uint8)
            for part in parts:
                thumbs[part["p_idx"]] = part["thumbs"]
            self.epochs_written = self._writer.append_epoch(epoch, trainer.global_step, probe_feats, train_feats, thumbs, lora)
            written.update(probe_feats=probe_feats, train_feats=train_feats, thumbs=thumbs)

        error = self._rank0_do(trainer, write)
        if error is not None:
            return self._monitoring_failed(trainer, f"the snapshot of epoch {epoch}", error)
        self.epochs_written = trainer.strategy.broadcast(self.epochs_written, src=0)
        rank_zero_info(f"montrage: snapshot of epoch {epoch} written to {self.store_path}")
        error = self._rank0_do(trainer, lambda: self._log_epoch(trainer, epoch, written["probe_feats"],
                                                               written["train_feats"], written["thumbs"], dataset))
        if error is not None:
            self._monitoring_failed(trainer, f"logging epoch {epoch} to W&B", error)

    # --- W&B -----------------------------------------------------------------------------------------------
    def _wandb_loggers(self, trainer: pl.Trainer) -> list:
        return wandb_loggers(trainer) if self.log_to_wandb else []

    def _log_epoch(self, trainer, epoch, probe_feats, train_feats, thumbs, dataset) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        layer = self.layers[0]
        concepts = list(self._probes.concepts)
        train_flat = flatten_features(train_feats[layer])
        mu = train_flat.mean(axis=0, keepdims=True)  # centred, as in the demo's curves.png
        sim = concept_similarity(flatten_features(probe_feats[layer]) - mu, train_flat - mu,
                                 [e.concept for e in dataset.examples], concepts)
        primary = np.asarray(self._probes.primary_concepts())
        metrics = {"montrage/epoch": epoch}
        for i, pc in enumerate(concepts):
            rows = primary == pc
            if rows.any():
                for j, tc in enumerate(concepts):
                    metrics[f"montrage/similarity/{pc}/{tc}"] = float(np.nanmean(sim[rows, j]))
        import wandb

        grid = np.concatenate(list(thumbs), axis=1) if len(thumbs) else None
        for lg in loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if grid is not None:
                lg.experiment.log({"montrage/probes": wandb.Image(grid, caption=f"epoch {epoch}: " + " | ".join(
                    f"{p} (seed {s})" for p, s in self._probes.items()))})

    def _log_artifact(self, trainer: pl.Trainer) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers or not os.path.isfile(self.store_path):
            return
        import wandb

        for lg in loggers:
            art = wandb.Artifact(f"montrage-store-{lg.experiment.id}", type="dataset",
                                 metadata={"epochs_written": self.epochs_written, "config": json.dumps(self._config())})
            art.add_file(self.store_path, name="store.h5", policy="immutable")
            lg.experiment.log_artifact(art)

    # --- resumable state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epochs_written": self.epochs_written, "order_rows": self.order_rows, "store_path": self.store_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = (int(state_dict["epochs_written"]), int(state_dict["order_rows"]))
