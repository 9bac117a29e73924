"""Monitor: snapshot a fine-tuning run into a montrage store, from any training loop.

At `start` (step 0, before any update), then as the schedule says, and at the final step, the monitor generates the
fixed probes with the live weights, encodes the probe generations and the monitored training images with a fixed
(t, epsilon) per image through forward hooks, and appends the pooled activations (and, for adapter runs, the adapter
weights) to the store. Between snapshots it records the training order: which images each optimizer step saw.

A plain object any loop can call -- `start`, `on_batch`, `maybe_snapshot`, `close`, `state_dict` -- with Lightning
and accelerate as thin adapters. Every rank calls every method; work is split across ranks and gathered, only
global rank 0 writes, and a failure on any rank is told to every rank before the next collective, so that all skip
(or, with strict, raise) together. Monitoring runs under eval, no_grad and an isolated RNG with every module's mode
restored, so training is bit-identical with and without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from montrage.capture import resolve_modules
from montrage.components import (
    DiffusionModel,
    model_identity,
    resolve_components,
    strip_wrapper_prefixes,
    vae_scale_factor,
)
from montrage.data import DataError, to_thumbnails
from montrage.distributed import Distributed, TorchDistributed
from montrage.encode import condition_prompts, stable_seed
from montrage.errors import MontrageError
from montrage.family import Family, make_family
from montrage.latent_cache import LatentCache, cache_key, trainable
from montrage.probes import ProbeSet, default_probes, load_probe_file, probe_noise_key
from montrage.projection import DEFAULT_WIDTH, project
from montrage.projection import describe as describe_projection
from montrage.rng import isolated_rng
from montrage.sources import ImageSource, image_source, select_monitored
from montrage.store import StoreSpec, StoreWriter, features_path
from montrage.store.run import AdapterSetup, RunDescription
from montrage.training_order import batch_indices, wrap_dataloader

log = logging.getLogger(__name__)


class MontrageConfigError(MontrageError, ValueError):
    """The monitor cannot watch this model, data or schedule (named field or file, and the fix)."""


class MontrageSnapshotError(MontrageError, RuntimeError):
    """Monitoring failed during training (on some rank); skipped with a warning unless strict=True."""


def non_finite(probe_feats: dict, train_bad: dict, lora, probe_names: list[str], train_ids: list[str]) -> str:
    """'' when every value is finite, else which layers, probes, training images (or the adapter) are not.

    `train_bad`: per layer, the monitored positions whose features are not finite (found block by block)."""

    def describe(bad: list[int], n: int, names: list[str]) -> str:
        shown = [names[i] for i in sorted(bad)[:3]]
        return f"{len(bad)} of {n} ({', '.join(shown)}{', ...' if len(bad) > 3 else ''})" if bad else ""

    found = []
    for layer in probe_feats:
        arr = probe_feats[layer]
        probe_bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)).tolist()
        for kind, bad, n, names in (
            ("probes", probe_bad, len(arr), probe_names),
            ("training images", train_bad.get(layer, []), len(train_ids), train_ids),
        ):
            if r := describe(bad, n, names):
                found.append(f"layer {layer!r}, {kind} {r}")
    if lora is not None and not np.isfinite(lora).all():
        found.append("the LoRA weights")
    return "; ".join(found)


def default_resolution(c: DiffusionModel) -> int:
    """The denoiser's native image side (sample size x the VAE's downsampling); 1024 when it has no sample size."""
    size = getattr(c.unet.config, "sample_size", None)
    if size is None:
        return 1024
    return int((size[0] if isinstance(size, (list, tuple)) else size) * vae_scale_factor(c.vae))


ORDER_FLUSH_STEPS = 50  # training-order rows reach the store at least this often (and at every snapshot)


def kept_up_to(store_path: str, step: int) -> tuple[int, int]:
    """(snapshots, order rows) of a store that belong to optimizer steps <= `step`: what a run resumed at `step`
    keeps when it brings no state of the monitor (both are written in step order)."""
    from montrage.store import StoreReader

    with StoreReader(store_path) as r:
        snaps = int(np.searchsorted(r.adapter_steps, step, side="right"))
        rows = int(np.searchsorted(r.training_order()["global_step"], step, side="right"))
    return snaps, rows


def base_model_path(pipeline, unet) -> str:
    """Where the base model was loaded from: the pipeline's folder or hub id, else the denoiser's (its parent when the
    denoiser was loaded from a pipeline's subfolder)."""
    path = str(getattr(getattr(pipeline, "config", None), "_name_or_path", "") or "")
    if path:
        return path
    path = str(getattr(unet.config, "_name_or_path", "") or "")
    parent = os.path.dirname(path.rstrip("/"))
    if os.path.basename(path.rstrip("/")) in ("unet", "transformer") and os.path.isfile(
        os.path.join(parent, "model_index.json")
    ):
        return parent
    return path


class Monitor:
    """Watch a fine-tuning run for attribution.

    Args:
        store_path: the run's HDF5 store (one file per run).
        pipeline: a diffusers pipeline built from the live training modules, or a mapping {unet, vae,
            text_encoder, tokenizer, scheduler} (wrapped modules -- DDP, torch.compile, PeftModel -- are fine).
        images: the training images: a folder, a list of paths, `TrainExample` records (or a dataset with
            `.examples`), a map-style dataset of dicts, or a Hugging Face Dataset (see `montrage.sources`).
        image_keys: key / column names for dataset sources (image_key, caption_key, id_key, concept_key).
        monitor_images: which images are monitored: None (all), a count K, a fraction in (0, 1], or a list of ids.
        subset_seed: seed of the stable subset.
        resolution: side of the monitored images (default: the denoiser's sample size x the VAE's downsampling).
        probes, probe_prompts, probe_file, probe_seeds, probe_template, probe_mixtures, concept_tokens: the
            probe set (a ProbeSet; prompts; a JSON/YAML file; or one prompt per concept from the template, with
            pairs when `probe_mixtures`); `concept_tokens` maps concept names to the token captions use.
        every_n_steps, every_n_epochs, at_steps: the schedule (step 0 and the final step are always snapshotted).
        max_steps: the run's final optimizer step, if known (it is snapshotted when reached).
        layers, timesteps, pooling, encode_prompt: what is encoded (see MontrageCallback).
        num_inference_steps, guidance_scale, thumbnail_size: the probe sampler and the stored thumbnails.
        latent_cache: keep the monitored images' VAE latents on disk beside the store (frozen VAE only).
        save_lora_snapshots: store the adapter weights at every snapshot.
        mode: "deferred" (training writes only the adapter snapshots, the training order and the run's description;
            `montrage encode STORE` computes the rest later, elsewhere), "inline" (everything during training; the
            only mode for full fine-tunes) or "auto" (deferred when only adapters train, else inline).
        projection_width, projection_seed: pooled features wider than this are stored through a fixed seeded
            random projection to this width (None: unprojected).
        overwrite: replace an existing store of a finished run instead of refusing.
        strict: raise when monitoring fails during training instead of skipping that piece with a warning.
        log_to_wandb: log similarity curves, a probe grid and the store artifact to the active W&B run.
        model_id: the base model's name in the store (default: the denoiser's `_name_or_path`).
        dist: the distributed protocol (default: torch.distributed when initialized).
        progress: show a progress bar while the latent cache is built.
    """

    def __init__(
        self,
        store_path: str,
        pipeline: Any = None,
        images: Any = None,
        *,
        image_keys: Optional[dict] = None,
        monitor_images: Any = None,
        subset_seed: int = 0,
        resolution: Optional[int] = None,
        probes: Optional[ProbeSet] = None,
        probe_prompts: Optional[Sequence[str]] = None,
        probe_file: Optional[str] = None,
        probe_seeds: Sequence[int] = (0, 1),
        probe_template: str = "a photo of {token}",
        probe_mixtures: bool = True,
        concept_tokens: Optional[dict] = None,
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        at_steps: Optional[Sequence[int]] = None,
        max_steps: Optional[int] = None,
        layers: Optional[Sequence[str]] = None,
        timesteps: Sequence[int] = (200, 500, 800),
        pooling: Literal["mean", "max", "mean_max"] = "mean",
        encode_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        thumbnail_size: int = 64,
        latent_cache: bool = True,
        save_lora_snapshots: bool = True,
        mode: Literal["auto", "inline", "deferred"] = "auto",
        projection_width: Optional[int] = DEFAULT_WIDTH,
        projection_seed: int = 0,
        encode_batch_size: int = 32,
        overwrite: bool = False,
        strict: bool = False,
        log_to_wandb: bool = True,
        model_id: Optional[str] = None,
        family: Optional[Any] = None,
        dist: Optional[Distributed] = None,
        progress: bool = True,
    ):
        if probe_prompts is not None and len(probe_prompts) == 0:
            raise MontrageConfigError(
                "probe_prompts is empty: list at least one prompt, or leave it unset (null) for "
                "one probe per training concept from probe_template."
            )
        if len(probe_seeds) == 0:
            raise MontrageConfigError("probe_seeds is empty: give at least one seed, e.g. [0, 1].")
        if layers is not None and not layers:
            raise MontrageConfigError(
                "layers is empty: name at least one denoiser module to hook, e.g. 'mid_block', "
                "or leave it unset for the model family's default."
            )
        if not timesteps:
            raise MontrageConfigError("timesteps is empty: give at least one timestep, e.g. [500].")
        if mode not in ("auto", "inline", "deferred"):
            raise MontrageConfigError(
                f"mode={mode!r}: use 'deferred' (encode after training with `montrage encode`), "
                "'inline' (encode during training) or 'auto'."
            )
        if mode == "deferred" and not save_lora_snapshots:
            raise MontrageConfigError(
                "mode='deferred' encodes from the saved adapter snapshots: keep "
                "save_lora_snapshots=True, or use mode='inline'."
            )
        if projection_width is not None and int(projection_width) < 1:
            raise MontrageConfigError(
                f"projection_width must be >= 1 (or null for unprojected features), got {projection_width}."
            )
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and int(value) < 1:
                raise MontrageConfigError(f"{name} must be >= 1 (or unset), got {value}.")
        at = sorted({int(s) for s in (at_steps or ())})
        if at and at[0] < 0:
            raise MontrageConfigError(f"at_steps must be optimizer steps >= 0, got {at[0]}.")
        if every_n_steps is None and every_n_epochs is None and not at:
            raise MontrageConfigError(
                "the schedule never fires: set every_n_steps (e.g. 500), every_n_epochs (e.g. 1) "
                "or at_steps (e.g. [100, 1000]); step 0 and the final step are added to it."
            )
        if max_steps is not None and every_n_epochs is None:
            fires = (every_n_steps is not None and every_n_steps <= max_steps) or any(0 < s < max_steps for s in at)
            if not fires:
                raise MontrageConfigError(
                    f"the schedule never fires before the final step {max_steps}: every_n_steps={every_n_steps}, "
                    f"at_steps={at or None}. Lower every_n_steps or give at_steps within the run."
                )
        self.store_path = str(store_path)
        self.pipeline, self.images = pipeline, images
        self.image_keys = dict(image_keys or {})
        self.monitor_images, self.subset_seed = monitor_images, int(subset_seed)
        self.resolution = resolution
        self.probe_set, self.probe_prompts, self.probe_file = (
            probes,
            list(probe_prompts) if probe_prompts else None,
            probe_file,
        )
        self.probe_seeds, self.probe_template, self.probe_mixtures = (
            [int(s) for s in probe_seeds],
            probe_template,
            probe_mixtures,
        )
        self.concept_tokens = dict(concept_tokens or {})
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.every_n_epochs = None if every_n_epochs is None else int(every_n_epochs)
        self.at_steps, self.max_steps = at, None if max_steps is None else int(max_steps)
        self.layers = [strip_wrapper_prefixes(n) for n in layers] if layers else None
        self.family_arg = family
        self.timesteps = [int(t) for t in timesteps]
        self.pooling, self.encode_prompt = pooling, encode_prompt
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.thumbnail_size, self.latent_cache = int(thumbnail_size), bool(latent_cache)
        self.save_lora_snapshots, self.encode_batch_size = bool(save_lora_snapshots), int(encode_batch_size)
        self.mode = mode
        self.projection_width = None if projection_width is None else int(projection_width)
        self.projection_seed = int(projection_seed)
        self._projection: dict[str, np.ndarray] = {}
        self._adapter_check: Optional[int] = None  # set by a deferred encode: the digest of the snapshot it encodes
        self.encode_chunk = max(self.encode_batch_size, 256)  # monitored images per gathered, written block
        self.overwrite, self.strict, self.log_to_wandb = bool(overwrite), bool(strict), bool(log_to_wandb)
        self.model_id, self.progress = model_id, progress
        self.dist: Distributed = dist or TorchDistributed()
        self.wandb_runs: Callable[[], list] = _active_wandb_runs
        # run state; the resumable part is in state_dict
        self.snapshots_written = 0
        self.order_rows = 0
        self.last_snapshot_step: Optional[int] = None
        self.epoch = 0  # completed epochs, as the loop last said
        self._rows: list[tuple[Optional[int], int, int]] = []  # (step, epoch, example index) not yet in the store
        self._resume: Optional[dict] = None
        self._writer: Optional[StoreWriter] = None
        self._started = False
        self._warned_order = False
        self._saw_order = False
        self.model: Optional[DiffusionModel] = None
        self.source: Optional[ImageSource] = None
        self.monitored: list[int] = []
        self.probes: Optional[ProbeSet] = None
        self._cache: Optional[LatentCache] = None

    # --- set-up --------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def is_writer(self) -> bool:
        return self.dist.rank == 0

    def _share(self, n: int) -> list[int]:
        """This rank's positions among n items (round-robin)."""
        return list(range(self.dist.rank, n, self.dist.world_size))

    def start(self, step: int = 0, epoch: int = 0) -> None:
        """Validate everything, open (or resume) the store and snapshot `step` if the store holds no snapshot yet.

        Call it before the first optimizer step, after restoring a checkpoint (`load_state_dict`) when resuming.
        """
        if self._started:
            raise MontrageConfigError("Monitor.start was called twice; call it once per run, before training.")
        self.epoch = int(epoch)
        c = self.model = resolve_components(self.pipeline, self.model_id)
        self.resolution = int(self.resolution or default_resolution(c))
        f = self.family_arg
        self.family: Family = f if isinstance(f, Family) else make_family(c.parts, self.pipeline, f, self.resolution)
        self.layers = self.layers or self.family.default_layers()
        resolve_modules(c.unet, self.layers)  # unknown layer names fail here, listing the available blocks
        if self.images is None:
            raise MontrageConfigError(
                "Monitor needs the training images (images=...): a folder, a list of paths, a "
                "dataset of dicts or a Hugging Face Dataset."
            )
        self.source = image_source(self.images, **self.image_keys)
        self._index = self.source.index_of()
        self.monitored = select_monitored(self.source.examples, self.monitor_images, self.subset_seed)
        factor = vae_scale_factor(c.vae)
        if self.resolution % factor:
            raise MontrageConfigError(
                f"resolution={self.resolution} is not a multiple of the VAE's downsampling "
                f"({factor}); give e.g. resolution={self.resolution // factor * factor or factor}."
            )
        self.probes = self._build_probes()
        self.mode = self._resolve_mode()
        error = None
        try:
            if self.mode == "inline":
                self._prepare_latents()
        except (DataError, OSError, ValueError) as err:
            error = err
        errors = [e for e in self.dist.all_gather(None if error is None else f"{type(error).__name__}: {error}") if e]
        if errors:  # every rank raises, before training: nobody is left waiting at a collective
            raise (
                error
                if error is not None
                else MontrageConfigError(f"another rank could not read its images: {errors[0]}")
            )
        with self._quiet():
            pooled = {
                k: v.shape[-1]
                for k, v in self.family.encode(
                    self._blank_latents(), [0], [""], self.timesteps[:1], self.layers, self.pooling, 1
                ).items()
            }
        projection = describe_projection(pooled, self.projection_width, self.projection_seed)
        self._projection = projection.get("matrices", {})
        dims = {k: (self.projection_width if k in self._projection else v) for k, v in pooled.items()}
        spec = StoreSpec(
            model={**model_identity(c.unet, c.model_id), "family": self.family.name},
            layers=self.layers,
            feature_dims=dims,
            timesteps=self.timesteps,
            pooling=self.pooling,
            probes=self.probes,
            train=list(self.source.examples),
            thumbnail_size=self.thumbnail_size,
            monitored=self.monitored,
            config=self.run_description().to_dict(),
            projection=projection,
            **self._lora_layout(),
        )
        error = self._rank0_do(lambda: self._open_store(spec, int(step)))
        if error is not None:  # a configuration error, before the first training step: raise on every rank
            raise error
        self.snapshots_written, self.order_rows, self.last_snapshot_step = self.dist.broadcast(
            (self.snapshots_written, self.order_rows, self.last_snapshot_step), src=0
        )
        resume = self._resume
        if resume:
            self.epoch = int(resume.get("epoch", self.epoch))
            # the unwritten rows are rank 0's gathered union (every rank loads the same checkpoint)
            self._rows = [tuple(r) for r in resume.get("rows", [])] if self.is_writer else []
        self._started = True
        if self.is_writer:
            log.info("montrage: %s", self.describe_cost())
        if self.snapshots_written == 0 and self.initial_snapshot:
            self._snapshot(int(step), self.epoch)

    initial_snapshot = True  # start() snapshots the starting step of a store that holds none

    def _open_store(self, spec: StoreSpec, step: int) -> None:
        """Rank 0: open (or resume) the store, cut back to the checkpoint's state or, without one, to `step`."""
        resume = self._resume
        cut = (int(resume["snapshots_written"]), int(resume["order_rows"])) if resume else None
        if cut is None and step > 0 and os.path.exists(self.store_path):
            cut = kept_up_to(self.store_path, step)  # resumed without the monitor's state: cut by step
        self._writer = StoreWriter(
            self.store_path,
            spec,
            overwrite=self.overwrite,
            truncate_to=cut,
            part="adapter" if self.mode == "deferred" else "all",
        )
        self.snapshots_written, self.order_rows = self._writer.committed
        stale = features_path(self.store_path)
        if self.mode == "deferred" and self.snapshots_written == 0 and os.path.exists(stale):
            os.remove(stale)  # encoded from another run's (or a cut-back run's) adapters
        if self.snapshots_written:
            self.last_snapshot_step = int(self._writer.f["global_step"][self.snapshots_written - 1])

    def _resolve_mode(self) -> str:
        """'deferred' needs every trained parameter to be an adapter weight that the snapshots save."""
        trained = [
            n
            for part, m in self.model.parts.items()
            if isinstance(m, torch.nn.Module)
            for n, p in m.named_parameters()
            if p.requires_grad and "lora_" not in n
        ]
        adapters = self.save_lora_snapshots and bool(self.family.lora_modules())
        if self.mode == "auto":
            return "deferred" if adapters and not trained else "inline"
        if self.mode == "deferred" and (trained or not adapters):
            what = (
                f"{len(trained)} non-adapter parameters train (e.g. {trained[0]})"
                if trained
                else "the model carries no adapter"
            )
            raise MontrageConfigError(
                f"mode='deferred' re-creates each snapshot from its adapter weights, but {what}; "
                "use mode='inline' for full fine-tunes."
            )
        return self.mode

    def _build_probes(self) -> ProbeSet:
        if self.probe_set is not None:
            return self.probe_set
        if self.probe_file is not None:
            return load_probe_file(self.probe_file, self.probe_seeds)
        concepts = sorted({e.concept for e in self.source.examples if e.concept})
        tokens = self.concept_tokens
        if self.probe_prompts:
            weights = []
            for prompt in self.probe_prompts:
                named = [c for c in concepts if re.search(rf"\b{re.escape(tokens.get(c, c))}\b", prompt)]
                weights.append({c: 1.0 / len(named) for c in named})
            return ProbeSet(tuple(self.probe_prompts), tuple(weights), tuple(self.probe_seeds), tuple(concepts))
        if not concepts:
            raise MontrageConfigError(
                "the training images have no concepts, so no default probes can be made: give "
                "probe_prompts (e.g. ['a painting in the style of sks']) or a probe_file."
            )
        return default_probes(
            {c: tokens.get(c, c) for c in concepts}, self.probe_template, self.probe_seeds, self.probe_mixtures
        )

    def run_description(self) -> RunDescription:
        """The monitor's settings and what rebuilds the model offline, as recorded in the store."""
        unet = self.model.unet
        adapters = {}
        for part, module in self.family.lora_modules().items():
            cfg = next(iter(module.peft_config.values()))
            adapters["unet" if module is unet else part] = AdapterSetup(
                r=int(cfg.r),
                lora_alpha=float(cfg.lora_alpha),
                target_modules=sorted(cfg.target_modules),
                lora_dropout=float(cfg.lora_dropout),
            )
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunDescription) if hasattr(self, f.name)}
        return RunDescription(
            **{
                **settings,
                "model_path": base_model_path(self.pipeline, unet),
                "resolution": int(self.resolution),
                **self.family.describe(),
                "noise_points": [float(self.family.noise_point(t)) for t in self.timesteps],
                "adapters": adapters,
                "images": os.path.abspath(self.images) if isinstance(self.images, (str, os.PathLike)) else None,
                "layers": list(self.layers),
                "timesteps": [int(t) for t in self.timesteps],
            }
        )

    def _has_lora(self) -> bool:
        return self.save_lora_snapshots and bool(self.family.lora_modules())

    def _lora_state(self) -> dict[str, torch.Tensor]:
        """Every adapter's weights: the denoiser's by their peft names, the text encoders' as `<part>::<name>`."""
        from peft.utils import get_peft_model_state_dict

        out = {}
        for part, module in self.family.lora_modules().items():
            prefix = "" if module is self.model.unet else f"{part}::"
            out.update({prefix + k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(module).items()})
        return out

    def _lora_layout(self) -> dict:
        if not self._has_lora():
            return {"lora_names": [], "lora_shapes": []}
        sd = self._lora_state()
        return {"lora_names": list(sd), "lora_shapes": [list(v.shape) for v in sd.values()]}

    def cost(self) -> dict:
        """Denoiser forwards per snapshot: the monitored images and probes at every timestep, and probe sampling."""
        cfg = 2 if self.guidance_scale > 1.0 else 1
        p = len(self.probes) if self.probes is not None else 0
        m = len(self.monitored)
        return {
            "monitored_images": m,
            "probes": p,
            "timesteps": len(self.timesteps),
            "image_forwards": m * len(self.timesteps),
            "probe_encode_forwards": p * len(self.timesteps),
            "probe_sampling_forwards": p * self.num_inference_steps * cfg,
            "forwards_per_snapshot": (m + p) * len(self.timesteps) + p * self.num_inference_steps * cfg,
        }

    def describe_cost(self) -> str:
        c = self.cost()
        return (
            f"each snapshot costs {c['forwards_per_snapshot']:,} denoiser forwards: {c['monitored_images']:,} "
            f"monitored images x {c['timesteps']} timesteps = {c['image_forwards']:,}, plus {c['probes']} probes x "
            f"({c['timesteps']} timesteps + {self.num_inference_steps} sampler steps x "
            f"{2 if self.guidance_scale > 1 else 1} for CFG); {len(self.source)} training images, store "
            f"{self.store_path}"
        )

    # --- images and latents ----------------------------------------------------------------------------------
    def _share_rows(self) -> list[int]:
        """Source rows of the monitored images this rank encodes."""
        return [self.monitored[k] for k in self._share(len(self.monitored))]

    def _pixel_batches(self, rows: list[int], batch: int):
        """Pixels of source rows, a batch at a time (dataset sources isolate the RNG of their own reads)."""
        for i in range(0, len(rows), batch):
            yield slice(i, min(len(rows), i + batch)), self.source.pixels(rows[i : i + batch], self.resolution)

    def _prepare_latents(self) -> None:
        """Build (or find) the latent cache of this rank's monitored images; reads every one, so bad files fail now."""
        rows = self._share_rows()
        vae = self.model.vae
        if not self.latent_cache or trainable(vae):
            for _ in self._pixel_batches(rows, self.encode_batch_size):  # still read each once: fail before training
                pass
            return
        pre = {
            "resolution": self.resolution,
            "crop": "centre-square/bicubic",
            "scaling_factor": vae.config.get("scaling_factor"),
            "shift_factor": vae.config.get("shift_factor"),
            "rank": self.dist.rank,
            "world": self.dist.world_size,
        }
        directory = os.path.splitext(self.store_path)[0] + "_latents"
        with self._quiet():
            key = cache_key(vae, pre, [self.source.examples[r].id for r in rows])
        self._cache = LatentCache(directory, key)
        if self._cache.open():
            return

        def batches():
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(rows),
                desc="montrage: latent cache",
                disable=not self.progress or len(rows) < 256,
                leave=False,
            )
            for sl, px in self._pixel_batches(rows, self.encode_batch_size):
                with self._quiet():
                    yield sl, self.family.latents(px, self.encode_batch_size)
                bar.update(sl.stop - sl.start)
            bar.close()

        self._cache.build(len(rows), batches)

    def _latents(self, rows: slice) -> torch.Tensor:
        """Latents of this rank's monitored images `rows` (positions in its share)."""
        if self._cache is not None and not trainable(self.model.vae):
            return self._cache.read(rows)
        share = self._share_rows()[rows]
        px = self.source.pixels(share, self.resolution)
        return self.family.latents(px, self.encode_batch_size)

    def _blank_latents(self) -> torch.Tensor:
        side = self.resolution // vae_scale_factor(self.model.vae)
        return torch.zeros(1, self.family.latent_channels, side, side)

    @property
    def latent_cache_bytes(self) -> int:
        """Bytes of this rank's latent cache (0 when there is none)."""
        return self._cache.nbytes if self._cache is not None else 0

    def train_thumbnails(self, size: int) -> np.ndarray:
        """(M, size, size, 3) uint8 thumbnails of the monitored images, read from the source a batch at a time."""
        parts = [to_thumbnails(px, size) for _, px in self._pixel_batches(self.monitored, 64)]
        return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)

    # --- training order ------------------------------------------------------------------------------------
    def wrap_dataloader(self, loader):
        """The loader with each dict batch carrying its dataset indices (`montrage_index`), for `on_batch`."""
        return wrap_dataloader(loader)

    def on_batch(
        self,
        indices=None,
        step: Optional[int] = None,
        *,
        ids: Optional[Sequence[str]] = None,
        epoch: Optional[int] = None,
    ) -> None:
        """Record which training images a (micro-)batch holds.

        `indices`: the batch of a wrapped loader, or the batch's dataset indices; or `ids` of the images. `step`:
        the optimizer step the batch counts toward; None gives it the step of the next `maybe_snapshot` call, which
        is right under gradient accumulation when `maybe_snapshot` is called once per optimizer step.
        """
        if ids is not None:
            missing = [str(i) for i in ids if str(i) not in self._index]
            if missing:
                raise MontrageConfigError(
                    f"on_batch: {len(missing)} id(s) are not in the image source "
                    f"({', '.join(missing[:3])}); pass ids the source holds."
                )
            idx = np.array([self._index[str(i)] for i in ids], dtype=np.int64)
        else:
            idx = batch_indices(indices)
        if idx is None:
            if not self._warned_order and self.is_writer:
                log.warning(
                    "montrage: the batches carry no dataset indices, so the training order is not recorded. "
                    "Wrap the loader (monitor.wrap_dataloader(loader)) or pass indices/ids to on_batch."
                )
            self._warned_order = True
            return
        n = len(self.source)
        bad = idx[(idx < 0) | (idx >= n)]
        if len(bad):
            raise MontrageConfigError(
                f"on_batch: index {int(bad[0])} is out of range for the image source ({n} images): "
                "pass positions in the same dataset the monitor was given."
            )
        self._saw_order = True
        e = self.epoch if epoch is None else int(epoch)
        self._rows.extend((None if step is None else int(step), e, int(i)) for i in idx)

    def _collect_rows(self, step: int) -> None:
        """Give pending rows `step`, and (multi-process) gather every rank's rows on rank 0: a collective."""
        self._rows = [(step if s is None else s, e, i) for s, e, i in self._rows]
        if self.dist.world_size > 1:
            parts = self.dist.all_gather(self._rows)
            self._rows = sorted(r for part in parts for r in part) if self.is_writer else []

    def _write_rows(self) -> None:
        """Append the collected rows (rank 0); a failure is skipped (or raised, strict) and the rows kept for the
        next try, so a passing disk error loses nothing."""
        rows = sorted(self._rows)
        epochs = sorted({e for _, e, _ in rows})

        def write():
            if rows:
                arr = np.asarray(rows, dtype=np.int64)
                self.order_rows = self._writer.append_order(arr[:, 1], arr[:, 0], arr[:, 2])

        error = self._rank0_do(write)
        if error is not None:
            span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
            return self._failed(f"recording the training order of {span}", error)
        self._rows = []
        self.order_rows = self.dist.broadcast(self.order_rows, src=0)

    # --- the schedule --------------------------------------------------------------------------------------
    def due(self, step: int, epoch: Optional[int] = None) -> bool:
        """Whether the schedule asks for a snapshot at optimizer step `step` (`epoch`: completed epochs, at an
        epoch's end)."""
        if step == self.last_snapshot_step:
            return False
        if self.max_steps is not None and step >= self.max_steps:
            return True
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            return True
        if step in self.at_steps:
            return True
        return bool(epoch is not None and self.every_n_epochs and epoch > 0 and epoch % self.every_n_epochs == 0)

    def maybe_snapshot(self, step: int, epoch: Optional[int] = None) -> bool:
        """Call once per optimizer step (and with `epoch`, the completed epochs, at an epoch's end) on every rank;
        snapshots when the schedule says so. Returns whether a snapshot was written."""
        if not self._started:
            raise MontrageConfigError("Monitor.maybe_snapshot before start(): call monitor.start() before training.")
        if epoch is not None:
            self.epoch = int(epoch)
        self._collect_rows(int(step))
        if not self.due(int(step), epoch):
            if int(step) % ORDER_FLUSH_STEPS == 0:
                self._write_rows()
            return False
        return self._snapshot(int(step), self.epoch, at_epoch_end=epoch is not None)

    def close(self, step: Optional[int] = None, epoch: Optional[int] = None) -> None:
        """End of training: with `step`, snapshot it unless already done (the final step is always kept), write the
        remaining training order and close the store. Without `step` (e.g. after a crash) it only closes."""
        try:
            if self._started and step is not None:
                if epoch is not None:
                    self.epoch = int(epoch)
                self._collect_rows(int(step))
                if int(step) != self.last_snapshot_step:
                    self._snapshot(int(step), self.epoch, at_epoch_end=epoch is not None)
                else:
                    self._write_rows()
                if not self._saw_order and not self._warned_order and self.is_writer:
                    log.warning("montrage: on_batch was never given indices, so the store has no training order.")
        finally:
            self._close_store()
        if self._started and step is not None:
            error = self._rank0_do(self._log_artifact)
            if error is not None:
                self._failed("logging the store artifact to W&B", error)
            self.dist.barrier("montrage-close")

    def _close_store(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- distributed helpers -------------------------------------------------------------------------------
    def _rank0_do(self, fn) -> Optional[Exception]:
        """Run fn on global rank 0 only and return its error on every rank (None if it worked)."""
        error = None
        if self.is_writer:
            try:
                fn()
            except Exception as err:  # returned below on every rank
                error = err
        message = self.dist.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
        if message is None:
            return None
        return error if error is not None else MontrageSnapshotError(f"montrage failed on global rank 0: {message}")

    def _failed(self, what: str, error: Exception) -> None:
        """strict: raise (on every rank, as every rank gets here); otherwise warn once and let training go on."""
        if self.strict:
            raise error
        if self.is_writer:
            log.warning(
                "montrage: %s failed and was skipped; training goes on (strict=False). %s: %s",
                what,
                type(error).__name__,
                error,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    # --- the snapshot --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _quiet(self):
        """eval + no_grad + isolated RNG, with every module's train/eval mode restored afterwards."""
        mods = [m for part in self.family.modules() for m in part.modules()]
        modes = [(m, m.training) for m in mods]
        for m, _ in modes:
            m.training = False
        try:
            with isolated_rng(), torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _encode_latents(self, latents: torch.Tensor, keys: list[str], texts: list[str]) -> dict[str, np.ndarray]:
        feats = self.family.encode(
            latents,
            [stable_seed(k) for k in keys],
            condition_prompts(self.encode_prompt, texts),
            self.timesteps,
            self.layers,
            self.pooling,
            self.encode_batch_size,
        )
        return project(feats, self._projection)

    def _chunks(self) -> int:
        """Blocks every rank walks through in step (the same count everywhere: one gather per block)."""
        per_rank = -(-len(self.monitored) // self.dist.world_size)
        return -(-per_rank // self.encode_chunk)

    def _encode_chunk(self, k: int) -> dict:
        """This rank's monitored images of block k: their global positions and features {layer: (n, T, F)}."""
        share = self._share(len(self.monitored))
        sl = slice(k * self.encode_chunk, min(len(share), (k + 1) * self.encode_chunk))
        if sl.start >= sl.stop:
            return {"pos": [], "feats": None}
        ex = [self.source.examples[self.monitored[p]] for p in share[sl]]
        with self._quiet():
            feats = self._encode_latents(self._latents(sl), [e.id for e in ex], [e.caption for e in ex])
        return {"pos": share[sl], "feats": feats}

    def _local_probes(self) -> dict:
        """This rank's probes, generated and encoded, and (rank 0) the adapter weights."""
        probes = self.probes
        p_idx = self._share(len(probes))
        items = probes.items()
        if any(trainable(m) for k, m in self.model.parts.items() if k.startswith("text_encoder")):
            self.family.forget_texts()  # a text encoder trains: its cached conditions are stale
        with self._quiet():
            images = self.family.generate(
                probes, self.resolution, self.num_inference_steps, self.guidance_scale, indices=p_idx
            )
            probe_latents = self.family.latents(images, self.encode_batch_size)
            feats = self._encode_latents(
                probe_latents, [probe_noise_key(*items[k]) for k in p_idx], [items[k][0] for k in p_idx]
            )
        lora = None
        if self.is_writer and self._has_lora():
            lora = torch.cat([v.flatten() for v in self._lora_state().values()]).numpy()
        return {"p_idx": p_idx, "probe": feats, "thumbs": to_thumbnails(images, self.thumbnail_size), "lora": lora}

    def _snapshot(self, step: int, epoch: int, at_epoch_end: bool = False) -> bool:
        """Take and write one snapshot; a failure on any rank skips it on every rank (or raises, when strict).

        Probes are generated and gathered first; the monitored images are then encoded a block at a time, gathered
        and written into the open snapshot row by rank 0, so memory stays O(block), not O(images). The row counts
        only once rank 0 commits it, after every block arrived finite.
        """
        self._collect_rows(step)
        self._write_rows()
        probes = self.probes
        label = f"epoch {epoch}" if at_epoch_end or step == 0 else f"step {step}"
        if self.mode == "deferred":
            return self._adapter_snapshot(step, epoch, label)
        error = None
        try:
            local = self._local_probes()
        except Exception as err:  # told to every rank by the gather below
            error, local = err, {"error": f"rank {self.rank}: {type(err).__name__}: {err}"}
        lora = local.pop("lora", None)  # rank 0's, kept out of the gather
        parts = self.dist.all_gather(local)
        failed = [p["error"] for p in parts if "error" in p]
        if failed:
            self._failed(f"the snapshot of {label}", error or MontrageSnapshotError("; ".join(failed)))
            return False
        probe_feats = {}
        for layer in self.layers:
            first = parts[0]["probe"][layer]
            probe_feats[layer] = np.zeros((len(probes), *first.shape[1:]), np.float32)
            for part in parts:
                probe_feats[layer][part["p_idx"]] = part["probe"][layer]
        thumbs = np.zeros((len(probes), self.thumbnail_size, self.thumbnail_size, 3), np.uint8)
        for part in parts:
            thumbs[part["p_idx"]] = part["thumbs"]
        ids = [self.source.examples[i].id for i in self.monitored]
        bad = {layer: [] for layer in self.layers}  # rank 0: monitored positions with non-finite features
        write_error: Optional[Exception] = None
        if self.is_writer:
            try:
                self._writer.begin_epoch()
            except Exception as err:  # reported with the commit below
                write_error = err
        for k in range(self._chunks()):
            try:
                block = self._encode_chunk(k) if error is None else {"pos": [], "feats": None}
            except Exception as err:
                error, block = err, {"error": f"rank {self.rank}: {type(err).__name__}: {err}"}
            blocks = self.dist.all_gather(block)
            failed += [b["error"] for b in blocks if "error" in b]
            if not self.is_writer or failed or write_error is not None:
                continue
            try:
                self._write_block(blocks, bad)
            except Exception as err:
                write_error = err

        def commit():
            if failed:
                raise MontrageSnapshotError("; ".join(failed))
            if write_error is not None:
                raise write_error
            message = non_finite(probe_feats, bad, lora, [f"{p} (seed {s})" for p, s in probes.items()], ids)
            if message:
                raise MontrageSnapshotError(
                    f"non-finite values, nothing written for {label}: {message}. The model "
                    "may have diverged (check the loss and learning rate)."
                )
            self.snapshots_written = self._writer.commit_epoch(
                epoch, step, probe_feats, thumbs, lora, adapter_check=self._adapter_check
            )

        failure = self._rank0_do(commit)
        if failure is not None:
            self._failed(f"the snapshot of {label}", error or failure)
            return False
        self.snapshots_written = self.dist.broadcast(self.snapshots_written, src=0)
        self.last_snapshot_step = step
        if self.is_writer:
            log.info("montrage: snapshot of step %d (epoch %d) written to %s", step, epoch, self.store_path)
        info = {
            "step": step,
            "epoch": epoch,
            "row": self.snapshots_written - 1,
            "probe_feats": probe_feats,
            "thumbs": thumbs,
        }
        failure = self._rank0_do(lambda: self._log_wandb(info) if self.log_to_wandb else None)
        if failure is not None:
            self._failed(f"logging the snapshot of {label} to W&B", failure)
        return True

    def _adapter_snapshot(self, step: int, epoch: int, label: str) -> bool:
        """Deferred mode: rank 0 saves the adapter weights; the features are encoded later from them."""

        def commit():
            lora = torch.cat([v.flatten() for v in self._lora_state().values()]).numpy()
            if not np.isfinite(lora).all():
                raise MontrageSnapshotError(
                    f"non-finite adapter weights, nothing written for {label}. The model may "
                    "have diverged (check the loss and learning rate)."
                )
            self.snapshots_written = self._writer.commit_epoch(epoch, step, lora_params=lora)

        failure = self._rank0_do(commit)
        if failure is not None:
            self._failed(f"the adapter snapshot of {label}", failure)
            return False
        self.snapshots_written = self.dist.broadcast(self.snapshots_written, src=0)
        self.last_snapshot_step = step
        return True

    def _write_block(self, blocks: list[dict], bad: dict) -> None:
        """Rank 0: one block's features from every rank, as one contiguous slice of the open row."""
        pos = np.concatenate([np.asarray(b["pos"], dtype=np.int64) for b in blocks])
        if not len(pos):
            return
        order = np.argsort(pos)
        lo, hi = int(pos[order[0]]), int(pos[order[-1]]) + 1
        if hi - lo != len(pos):
            raise MontrageSnapshotError(f"a block of monitored images is not contiguous ({lo}..{hi}, {len(pos)} rows).")
        for layer in self.layers:
            values = np.concatenate([b["feats"][layer] for b in blocks if b["feats"] is not None])[order]
            finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            bad[layer] += pos[order][~finite].tolist()
            self._writer.write_train_rows(layer, slice(lo, hi), values)

    # --- W&B -----------------------------------------------------------------------------------------------
    def snapshot_metrics(self, info: dict, block: int = 4096) -> dict:
        """Mean centred shifted cosine of each probe concept's probes to each training concept's images (layer 0),
        read back from the written row a block at a time."""
        from montrage.similarity import flatten_features, shifted_cosine

        layer, concepts = self.layers[0], list(self.probes.concepts)
        ds, row, m = self._writer.f[f"train/features/{layer}"], info["row"], len(self.monitored)
        blocks = [(i, min(m, i + block)) for i in range(0, m, block)]
        mu = sum(flatten_features(ds[row, i:j].astype(np.float64)).sum(axis=0) for i, j in blocks) / max(m, 1)
        probe = flatten_features(info["probe_feats"][layer]) - mu
        labels = np.asarray([self.source.examples[i].concept for i in self.monitored])
        sums, counts = np.zeros((len(probe), len(concepts))), np.zeros(len(concepts))
        for i, j in blocks:
            sim = shifted_cosine(probe, flatten_features(ds[row, i:j].astype(np.float64)) - mu)
            for c, name in enumerate(concepts):
                mask = labels[i:j] == name
                sums[:, c] += sim[:, mask].sum(axis=1)
                counts[c] += mask.sum()
        sim = sums / np.where(counts > 0, counts, np.nan)
        primary = np.asarray(self.probes.primary_concepts())
        metrics = {"montrage/epoch": info["epoch"], "montrage/global_step": info["step"]}
        for i, pc in enumerate(concepts):
            rows = primary == pc
            if rows.any():
                for j, tc in enumerate(concepts):
                    metrics[f"montrage/similarity/{pc}/{tc}"] = float(np.nanmean(sim[rows, j]))
        return metrics

    def _log_wandb(self, info: dict) -> None:
        runs = self.wandb_runs()
        if not runs:
            return
        import wandb

        metrics = self.snapshot_metrics(info)
        thumbs = info["thumbs"]
        grid = np.concatenate(list(thumbs), axis=1) if len(thumbs) else None
        caption = f"step {info['step']}: " + " | ".join(f"{p} (seed {s})" for p, s in self.probes.items())
        for run in runs:
            payload = dict(metrics)
            if grid is not None:
                payload["montrage/probes"] = wandb.Image(grid, caption=caption)
            run.log(payload)

    def _log_artifact(self) -> None:
        runs = self.wandb_runs() if self.log_to_wandb else []
        if not runs or not os.path.isfile(self.store_path):
            return
        import wandb

        for run in runs:
            art = wandb.Artifact(
                f"montrage-store-{run.id}",
                type="dataset",
                metadata={"snapshots": self.snapshots_written, "config": json.dumps(self.run_description().to_dict())},
            )
            art.add_file(self.store_path, name="store.h5", policy="immutable")
            run.log_artifact(art)

    # --- resumable state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume without duplicating or losing a snapshot or a training-order row."""
        return {
            "snapshots_written": self.snapshots_written,
            "order_rows": self.order_rows,
            "store_path": self.store_path,
            "rows": [list(r) for r in self._rows],
            "last_snapshot_step": self.last_snapshot_step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._started:
            raise MontrageConfigError(
                "Monitor.load_state_dict after start(): restore the checkpoint first, then start."
            )
        self._resume = dict(state)


def _active_wandb_runs() -> list:
    import sys

    wandb = sys.modules.get("wandb")  # only a run the user started: never import or start W&B ourselves
    run = getattr(wandb, "run", None) if wandb is not None else None
    return [run] if run is not None else []
