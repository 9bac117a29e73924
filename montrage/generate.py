"""Generate probe images from fixed initial latents with the model's current weights."""

from __future__ import annotations

import torch

from montrage.probes import ProbeSet


def build_pipeline(tokenizer, text_encoder, vae, unet, scheduler):
    """A StableDiffusionPipeline around live modules (no copies) with a DDIM sampler from the training scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(seed: int, unet: torch.nn.Module, vae_scale_factor: int, height: int) -> torch.Tensor:
    size = height // vae_scale_factor
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, unet.config.in_channels, size, size), generator=g)


@torch.no_grad()
def generate_probes(
    pipe,
    probes: ProbeSet,
    height: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    indices: list[int] | None = None,
) -> torch.Tensor:
    """Images (len(indices), 3, H, W) in [-1, 1] for the selected probes (all by default), deterministic per seed."""
    items = probes.items()
    indices = list(range(len(items))) if indices is None else list(indices)
    p = next(pipe.unet.parameters())
    out = []
    for i in range(0, len(indices), batch_size):
        chunk = [items[k] for k in indices[i : i + batch_size]]
        latents = torch.cat([initial_latents(s, pipe.unet, pipe.vae_scale_factor, height) for _, s in chunk])
        images = pipe(
            [prompt for prompt, _ in chunk],
            height=height,
            width=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=latents.to(p.device, p.dtype),
            output_type="pt",
        ).images
        out.append(images.float().cpu() * 2.0 - 1.0)
    if not out:
        return torch.empty(0, 3, height, height)
    return torch.cat(out)
