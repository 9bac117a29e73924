"""The one diffusion-model wrapper (`DiffusionModel`), loaded from a local folder or hub id or resolved over a live
training run's modules, with a check that its parts are there.

Real models (SD 1.x/2.x, SDXL, SD3, Flux) and the tiny offline bases share this one loading path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from montrage.errors import MontrageError

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelLoadError(MontrageError, ValueError):
    """A model path or id that does not hold a diffusers text-to-image model."""


@dataclass
class DiffusionModel:
    """A diffusion model as every part of montrage sees it: the denoiser with its training scheduler and, for a
    latent text-to-image model, the VAE, text encoder(s) and tokenizer(s); None for a pixel-space DDPM.

    The Monitor resolves one over the live training modules, `StoreModel` loads one from the store's base and
    adapters, origin loads any pixel or latent model. `parts` holds every part by its diffusers name
    (text_encoder_2, transformer, ...), which the family adapters need.
    """

    unet: torch.nn.Module  # the denoiser: a UNet, or the transformer of SD3 / Flux
    scheduler: Any
    model_id: str
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    parts: dict = field(default_factory=dict)
    lora: str | None = None  # an adapter file loaded into the denoiser, to reload it
    family: Any = None  # an SDXL / SD3 / Flux adapter (montrage.family) for origin; None: the plain UNet path
    resolution: int | None = None  # image side, where the denoiser's config has no sample size (Flux)
    snapshots: Any = None  # the run's StoreModel when built from a store: loads the adapter of any stored snapshot

    @property
    def kind(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @property
    def image_channels(self) -> int:
        return int(self.unet.config.in_channels if self.vae is None else self.vae.config.in_channels)

    @property
    def image_size(self) -> int:
        if self.resolution:
            return int(self.resolution)
        size = getattr(self.unet.config, "sample_size", None)
        if size is None:
            return 1024
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        return size * vae_scale_factor(self.vae) if self.vae is not None else size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def identity(self) -> dict:
        """`model_identity` plus `kind` and `weights_sha`, a fingerprint of every weight that shapes the features
        (denoiser with any adapter, VAE, text encoder), and `lora` (an adapter loaded from a file) or `store` (a
        model built from a store), to reload it, not compared. Recomputed on every call (cheap), so it follows
        weights that change."""
        ident = model_identity(self.unet, self.model_id)
        ident["kind"] = self.kind
        ident["weights_sha"] = weights_fingerprint([self.unet, self.vae, self.text_encoder])
        if self.lora:
            ident["lora"] = self.lora
        if self.snapshots is not None:
            ident["store"] = self.snapshots.store.path
        return ident

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> torch.Tensor | None:
        """Text embeddings (B, seq, dim) for a latent model, None for an unconditional pixel model."""
        if self.text_encoder is None:
            return None
        if self.family is not None:
            return self.family.condition(list(prompts))  # a dict of batched tensors (per family)
        unique = sorted(set(prompts))
        emb = embed_prompts(self.tokenizer, self.text_encoder, unique)
        index = {p: i for i, p in enumerate(unique)}
        return emb[torch.tensor([index[p] for p in prompts], device=emb.device)]


def model_identity(unet: torch.nn.Module, model_id: str) -> dict:
    """What makes two runs' representations comparable: the base model and its denoiser's architecture."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model_id": str(model_id), "unet_class": type(unet).__name__, "unet_config_sha": digest}


def weights_fingerprint(modules: list[torch.nn.Module | None]) -> str:
    """A short hash of the names, shapes, dtypes and a strided sample (<= 4096 values) of every parameter and buffer.

    Sampling instead of hashing all bytes keeps a multi-GB model at well under a second, and raw values (no sums)
    keep it identical across devices and thread counts; any real training step changes every sampled tensor.
    """
    h = hashlib.sha256()
    for m, module in enumerate(modules):
        if module is None:
            continue
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{m}|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(flat[::step].cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_local_layout(path: str) -> None:
    if not os.path.isdir(path):
        return  # treated as a hub id; diffusers reports what is wrong with it
    missing = [s for s in REQUIRED_SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if not os.path.isfile(os.path.join(path, "model_index.json")) or missing:
        raise ModelLoadError(
            f"{path!r} is not a diffusers text-to-image model folder: expected model_index.json and the subfolders "
            f"{', '.join(REQUIRED_SUBFOLDERS)} (missing: {', '.join(missing) or 'model_index.json'}). "
            "Pass the folder written by `StableDiffusionPipeline.save_pretrained`, or a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )


def load_components(
    pretrained: str, revision: str | None = None, torch_dtype: torch.dtype | None = None
) -> DiffusionModel:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler from `pretrained`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    _check_local_layout(pretrained)
    kw = {"revision": revision} if revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained, subfolder="text_encoder", torch_dtype=torch_dtype, **kw
        )
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=torch_dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=torch_dtype, **kw)
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(
            f"could not load a diffusers text-to-image model from {pretrained!r}: {err}. Pass a local folder in the "
            "diffusers layout or a hub id (downloads need network access; set HF_HUB_OFFLINE=0)."
        ) from err
    return DiffusionModel(
        unet,
        scheduler,
        model_id=pretrained,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        parts={"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler},
    )


def load_model(pretrained: str, torch_dtype: torch.dtype | None = None) -> DiffusionModel:
    """The parts of any supported family from a `model_index.json` folder or hub id: SD 1.x/2.x through
    `load_components`, SDXL / SD3 / Flux through their pipelines; UNet families train with a DDPM scheduler."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    try:
        cfg = DiffusionPipeline.load_config(pretrained)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not read model_index.json of {pretrained!r}: {err}. Pass the folder written by "
            "`save_pretrained`, or a hub id (downloads need network access)."
        ) from err
    if "transformer" not in cfg and "text_encoder_2" not in cfg:
        return load_components(pretrained, torch_dtype=torch_dtype)
    from montrage.family import PIPELINES

    if cfg.get("_class_name") not in PIPELINES:
        raise ModelLoadError(
            f"{pretrained!r} holds a {cfg.get('_class_name')}, which no montrage family adapter knows "
            f"(supported: {', '.join(PIPELINES)}); for another model subclass montrage.family.Family."
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the {cfg.get('_class_name')} at {pretrained!r}: {err}") from err
    c = resolve_components(pipe, model_id=pretrained)
    if "unet" in c.parts:
        c.scheduler = c.parts["scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
    return c


@torch.no_grad()
def embed_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (B, seq, dim) for prompts, padded to the tokenizer's max length as SD does."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


def vae_scale_factor(vae) -> int:
    """How much the VAE downsamples an image side (2 ** (number of blocks - 1), as diffusers' pipelines compute it)."""
    return 2 ** (len(getattr(vae.config, "block_out_channels", [0])) - 1)


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def unwrap(module):
    """The model inside DDP / DataParallel (`.module`), torch.compile (`._orig_mod`) and peft's PeftModel
    (`.base_model.model`) wrappers: the module whose names users see and whose forward hooks fire."""
    while module is not None:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        elif type(module).__name__.startswith("Peft") and isinstance(
            getattr(getattr(module, "base_model", None), "model", None), torch.nn.Module
        ):
            module = module.base_model.model
        else:
            return module
    return module


def strip_wrapper_prefixes(name: str) -> str:
    """A layer name as the unwrapped model spells it ('module._orig_mod.mid_block' -> 'mid_block')."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


# what each part may be called in a pipeline, a mapping or a LightningModule
ALIASES = {
    "unet": ("unet", "transformer"),
    "vae": ("vae",),
    "text_encoder": ("text_encoder",),
    "tokenizer": ("tokenizer",),
    "scheduler": ("scheduler", "noise_scheduler"),
}
EXTRA_PARTS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def resolve_components(model, model_id: str | None = None, where: str = "pipeline") -> DiffusionModel:
    """The DiffusionModel of a diffusers pipeline (built over the live training modules) or of a mapping {name: module}.

    Accepted names: unet (or transformer), vae, text_encoder, tokenizer, scheduler (or noise_scheduler). Wrapped
    modules (DDP, torch.compile, PeftModel) are unwrapped. Missing parts raise a ModelLoadError naming them.
    """
    if isinstance(model, dict):
        parts = dict(model)
    elif isinstance(getattr(model, "components", None), dict):
        parts = dict(model.components)
    else:
        parts = {
            k: getattr(model, k) for k in sum(ALIASES.values(), ()) + EXTRA_PARTS if getattr(model, k, None) is not None
        }
    found = {}
    for key, names in ALIASES.items():
        found[key] = next((parts[n] for n in names if parts.get(n) is not None), None)
    missing = [k for k, v in found.items() if v is None]
    if missing:
        have = ", ".join(sorted(k for k, v in parts.items() if v is not None)) or "nothing"
        raise ModelLoadError(
            f"the {where} lacks {', '.join('denoiser (unet or transformer)' if m == 'unet' else m for m in missing)} "
            f"(it has: {have}). Give a diffusers pipeline built from the live training modules, e.g. "
            "StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, "
            "scheduler=noise_scheduler, safety_checker=None, feature_extractor=None), or a mapping with these names."
        )
    unet = unwrap(found["unet"])
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "config"):
        raise ModelLoadError(f"the {where}'s denoiser is a {type(found['unet']).__name__}, not a diffusers model.")
    ident = model_id or str(getattr(unet.config, "_name_or_path", "") or "unknown")
    named = {
        "transformer" if type(unet).__name__.endswith("Transformer2DModel") else "unet": unet,
        "vae": unwrap(found["vae"]),
        "text_encoder": unwrap(found["text_encoder"]),
        "tokenizer": found["tokenizer"],
        "scheduler": found["scheduler"],
    }
    named.update({k: unwrap(parts[k]) for k in EXTRA_PARTS if parts.get(k) is not None})
    return DiffusionModel(
        unet,
        found["scheduler"],
        model_id=ident,
        vae=named["vae"],
        text_encoder=named["text_encoder"],
        tokenizer=found["tokenizer"],
        parts=named,
    )
