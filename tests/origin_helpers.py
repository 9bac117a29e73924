"""Builders for the origin tests: tiny untrained models, a naive per-image reference, synthetic feature sets."""

from __future__ import annotations

import copy

import numpy as np
import torch

from montrage.components import DiffusionModel
from montrage.origin.feature_set import FeatureSet, FeatureSpec
from montrage.origin.features import noise_for
from montrage.origin.images import image_keys


def tiny_pixel_unet(seed: int = 0, channels: int = 3, size: int = 8):
    """An untrained UNet2DModel with attention (so the vmap attention path is exercised)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_pixel_model(seed: int = 0, channels: int = 3, size: int = 8) -> DiffusionModel:
    from diffusers import DDPMScheduler

    return DiffusionModel(
        tiny_pixel_unet(seed, channels, size), DDPMScheduler(num_train_timesteps=100), f"tiny-pixel-{seed}"
    )


def save_pixel_model(model: DiffusionModel, path: str) -> str:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=model.unet, scheduler=model.scheduler).save_pretrained(path)
    return path


def naive_features(
    model: DiffusionModel, images: torch.Tensor, timesteps, param_filter=None, captions=None, draw: int = 0
):
    """Reference: one (image, t) at a time, loss.backward() on a copy of the UNet; ∇θ over parameters passing
    `param_filter(name)` (default: all); ε of the given draw. Returns loss, ‖∇x_t‖², ‖∇θ‖² as (N, T) arrays."""
    from montrage.encode import image_latents

    unet = copy.deepcopy(model.unet).eval()
    for p in unet.parameters():
        p.requires_grad_(True)
    keys = image_keys(images)
    z = image_latents(model.vae, images)
    cond = None
    if model.text_encoder is not None:
        cond = model.condition(captions or [""] * len(images))
    n, T = len(images), len(timesteps)
    out = {k: np.zeros((n, T)) for k in ("loss", "grad_x", "grad_theta")}
    for i in range(n):
        for j, t in enumerate(timesteps):
            eps = noise_for(keys[i], t, 0, tuple(z.shape[1:]), draw)[None]
            xt = model.scheduler.add_noise(z[i : i + 1], eps, torch.tensor([t])).detach().requires_grad_(True)
            unet.zero_grad(set_to_none=True)
            kw = {} if cond is None else {"encoder_hidden_states": cond[i : i + 1]}
            loss = ((unet(xt, torch.tensor([t]), **kw).sample - eps) ** 2).mean()
            loss.backward()
            out["loss"][i, j] = loss.item()
            out["grad_x"][i, j] = (xt.grad**2).sum().item()
            out["grad_theta"][i, j] = sum(
                (p.grad**2).sum().item()
                for name, p in unet.named_parameters()
                if p.grad is not None and (param_filter is None or param_filter(name))
            )
    return out


def synthetic_set(
    label: str, n: int, shift: float, identity: dict, timesteps=(0, 10, 20), seed: int = 0, layers: int = 0
) -> FeatureSet:
    """Positive feature values whose log-mean depends on `shift` (a separable toy origin class)."""
    rng = np.random.default_rng(seed)
    T = len(timesteps)
    values = {
        f: np.exp(rng.normal(shift * (k + 1), 1.0, (n, T))).astype(np.float32)
        for k, f in enumerate(("loss", "grad_x", "grad_theta"))
    }
    ln = np.exp(rng.normal(shift, 1.0, (n, T, layers))).astype(np.float32) if layers else None
    spec = FeatureSpec(tuple(timesteps), layer_norms=bool(layers))
    return FeatureSet(
        spec=spec,
        identity=dict(identity),
        ids=[f"{label}{i}" for i in range(n)],
        values=values,
        layer_norms=ln,
        layer_names=[f"w{g}" for g in range(layers)] if layers else None,
        label=label,
    )
