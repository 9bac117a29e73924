"""Model families: one adapter per family (SD 1.x/2.x, SDXL, SD3, Flux), chosen from the pipeline or denoiser class.

A user can support another model by subclassing `Family` (see `montrage.family.base`) and passing `family=` to the
Monitor.
"""

from __future__ import annotations

from montrage.family.base import Family, FamilyError
from montrage.family.flux import FluxFamily
from montrage.family.sd import SDFamily
from montrage.family.sd3 import SD3Family
from montrage.family.sdxl import SDXLFamily

FAMILIES: dict[str, type[Family]] = {"sd": SDFamily, "sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily}
PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}


def detect_family(parts: dict, pipeline=None) -> str:
    """The family of a pipeline (by class) or of its parts (by the denoiser's class and config)."""
    cls = type(pipeline).__name__ if pipeline is not None and not isinstance(pipeline, dict) else ""
    if cls in PIPELINES:
        return PIPELINES[cls]
    den = parts.get("unet") if parts.get("unet") is not None else parts.get("transformer")
    name = type(den).__name__
    if name == "UNet2DConditionModel":
        return "sdxl" if getattr(den.config, "addition_embed_type", None) == "text_time" else "sd"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise FamilyError(
        f"no family adapter for {cls or name}: montrage knows SD 1.x/2.x (StableDiffusionPipeline), SDXL, SD3 and Flux. "
        "For another model subclass montrage.family.Family (latents, noise, condition, denoise, default_layers, "
        "pipeline; see montrage/family/base.py) and pass family=YourFamily(parts)."
    )


def make_family(parts: dict, pipeline=None, name: str | None = None, resolution: int | None = None) -> Family:
    """The adapter for these parts; `name` forces a family ("sd", "sdxl", "sd3", "flux")."""
    name = name or detect_family(parts, pipeline)
    if name not in FAMILIES:
        raise FamilyError(f"unknown family {name!r}: use one of {', '.join(FAMILIES)} or pass a Family instance.")
    missing = [k for k in REQUIRED[name] if parts.get(k) is None]
    if missing:
        raise FamilyError(f"a {name} model needs {', '.join(REQUIRED[name])}; the pipeline lacks {', '.join(missing)}.")
    if name == "sdxl":
        return SDXLFamily(parts, resolution=resolution or 1024)
    return FAMILIES[name](parts)


__all__ = [
    "FAMILIES",
    "Family",
    "FamilyError",
    "FluxFamily",
    "SD3Family",
    "SDFamily",
    "SDXLFamily",
    "detect_family",
    "make_family",
]
