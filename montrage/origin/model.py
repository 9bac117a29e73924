"""Loading a diffusion model for origin attribution: a pixel DDPM or a latent text-to-image model, with an optional
LoRA, as a `montrage.components.DiffusionModel`; and comparing the identities that features and classifiers record.

Trajectory features need the same four things from both kinds: the denoiser, its training noise schedule, the
map from an image to the denoiser's input space (identity, or the VAE) and an optional text condition. Features
are only comparable under the same weights, so the identity carries a fingerprint of the weights as well as the
architecture.
"""

from __future__ import annotations

import os

import torch

from montrage.components import DiffusionModel
from montrage.origin.errors import OriginError


def same_model(a: dict, b: dict) -> bool:
    """Whether two identities name the same weights. With fingerprints on both sides the model id (a path that may
    have moved) is ignored; without, architecture and id must agree."""
    keys = ["unet_class", "unet_config_sha"]
    if a.get("weights_sha") and b.get("weights_sha"):
        keys.append("weights_sha")
    else:
        keys.append("model_id")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_identity(ident: dict) -> str:
    return (
        f"{ident.get('model_id')!r} ({ident.get('unet_class')}, config {ident.get('unet_config_sha')}, "
        f"weights {ident.get('weights_sha', '?')})"
    )


def check_same_model(expected: dict, actual: dict, what: str, fix: str) -> None:
    """Raise an OriginError naming both models when `what` (a features file, a classifier) came from another model."""
    if not same_model(expected, actual):
        raise OriginError(
            f"{what} was made with model {describe_identity(expected)}, but the model given is "
            f"{describe_identity(actual)}. {fix}"
        )


def _pipeline_config(path: str) -> dict:
    from diffusers import DiffusionPipeline

    if os.path.isfile(path):
        raise OriginError(
            f"{path!r} is a file, not a diffusion model: pass the model folder (the one holding "
            "model_index.json, written by `save_pretrained`) or a hub id."
        )
    try:
        return DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as err:
        raise OriginError(
            f"{path!r} is not a diffusers diffusion model: no readable model_index.json ({err.__class__.__name__}). "
            "Pass the folder written by `DDPMPipeline.save_pretrained` (pixel model: unet/, scheduler/) or "
            "`StableDiffusionPipeline.save_pretrained` (latent model: unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/), or a hub id with network access."
        ) from err


def load_diffusion_model(
    path: str,
    lora: str | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    resolution: int | None = None,
) -> DiffusionModel:
    """Load a pixel DDPM (model_index.json with unet + scheduler) or a latent text-to-image model (+ vae, text
    encoder, tokenizer) from a local folder or hub id, with a DDPM scheduler for the training noise schedule.

    `lora`: a diffusers-format LoRA (folder or `pytorch_lora_weights.safetensors`) loaded into the UNet; the base
    weights are then frozen and only the adapter has requires_grad, so that ∇θ defaults to the LoRA parameters.
    """
    cfg = _pipeline_config(path)
    if "transformer" in cfg or "text_encoder_2" in cfg:  # SDXL, SD3, Flux: through their family adapter
        return _load_family_model(path, lora, device, torch_dtype, resolution)
    if "unet" not in cfg:
        raise OriginError(
            f"{path!r} holds a {cfg.get('_class_name', 'diffusers')} pipeline without a `unet` "
            "component; origin attribution needs a UNet denoiser (UNet2DModel or UNet2DConditionModel)."
        )
    if "vae" in cfg:
        from montrage.components import ModelLoadError, load_components

        try:
            model = load_components(path, torch_dtype=torch_dtype)
        except ModelLoadError as err:
            raise OriginError(str(err)) from err
        model.vae.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
    else:
        from diffusers import DDPMScheduler, UNet2DModel

        try:
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError) as err:
            raise OriginError(
                f"could not load a pixel diffusion model (unet/ = UNet2DModel, scheduler/) from {path!r}: {err}"
            ) from err
        model = DiffusionModel(unet, scheduler, str(path), parts={"unet": unet, "scheduler": scheduler})
    if lora:
        _load_lora(model.unet, lora)
        model.lora = os.path.abspath(lora)
    for m in (model.unet, model.vae, model.text_encoder):
        if m is not None:
            m.eval()
            if device is not None:
                m.to(device)
    return model


def _load_family_model(path, lora, device, torch_dtype, resolution) -> DiffusionModel:
    from montrage.components import ModelLoadError, load_model
    from montrage.family import make_family

    try:
        model = load_model(path, torch_dtype=torch_dtype)
    except ModelLoadError as err:
        raise OriginError(str(err)) from err
    model.family = family = make_family(model.parts, None, None, resolution)
    model.resolution = resolution
    for m in family.modules():
        m.requires_grad_(False).eval()
        if device is not None:
            m.to(device)
    if lora:
        _load_lora(model.unet, lora, prefix="unet" if "unet" in model.parts else "transformer")
        model.lora = os.path.abspath(lora)
    return model


def _load_lora(unet: torch.nn.Module, lora: str, prefix: str = "unet") -> None:
    if not os.path.exists(lora):
        raise OriginError(
            f"LoRA weights {lora!r} do not exist: pass the folder or the .safetensors file written by "
            "`save_lora_weights` (e.g. pytorch_lora_weights.safetensors)."
        )
    if os.path.isdir(lora):
        files = sorted(f for f in os.listdir(lora) if f.endswith(".safetensors"))
        if "pytorch_lora_weights.safetensors" in files:
            files = ["pytorch_lora_weights.safetensors"]
        if len(files) != 1:
            raise OriginError(
                f"LoRA folder {lora!r} should hold one .safetensors file (pytorch_lora_weights."
                f"safetensors), found {files or 'none'}: pass the file itself."
            )
        lora = os.path.join(lora, files[0])
    unet.requires_grad_(False)
    try:
        from safetensors.torch import load_file

        unet.load_lora_adapter(load_file(lora), prefix=prefix, adapter_name="default")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise OriginError(f"could not load LoRA weights {lora!r} into the UNet: {err}") from err
    n = 0
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise OriginError(f"LoRA weights {lora!r} matched no UNet module; check that they belong to this base model.")
