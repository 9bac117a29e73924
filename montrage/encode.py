"""Fixed-noise encoding: any image -> pooled UNet activations at chosen timesteps, with a fixed epsilon per image.

This is the one representation space shared by training images, probe generations and offline queries: the
image is VAE-encoded (posterior mean), noised with a seeded epsilon at each timestep, and passed through the
UNet under a text condition while forward hooks read the named modules. The condition is, by default, each
image's own text -- a training image's caption, a probe's prompt, a query's prompt -- because that is how the
model processes them in training and generation (MONTRAGE watches representations "while training data is input
to and processed by the model"); a fixed prompt (e.g. "" for the empty prompt) gives an image-only space.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from montrage.capture import FeatureHooks, Pooling
from montrage.components import embed_prompts


def stable_seed(key: str) -> int:
    """A seed derived from a string id, identical across processes and runs (unlike `hash`)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def fixed_noise(seed: int, num_timesteps: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((num_timesteps, *shape), generator=g)


@torch.no_grad()
def image_latents(vae: torch.nn.Module | None, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Posterior-mean latents scaled as in training; a pixel model (vae=None) uses the images themselves."""
    if vae is None:
        return images
    p = next(vae.parameters())
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    out = [
        vae.encode(images[i : i + batch_size].to(p.device, p.dtype)).latent_dist.mean * scale
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float().cpu()


@torch.no_grad()
def encode_images(
    unet: torch.nn.Module,
    vae: torch.nn.Module | None,
    scheduler,
    images: torch.Tensor,
    noise_seeds: list[int],
    timesteps: list[int],
    layers: list[str],
    pooling: Pooling = "mean",
    cond: torch.Tensor | None = None,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Pooled activations {layer: (N, len(timesteps), features)} for images (N, 3, H, W) in [-1, 1].

    `cond` is one text embedding (1, seq, dim) shared by all images, or one per image (N, seq, dim) -- e.g. each
    training image's caption, as the model saw it in training (None for unconditional UNets).
    """
    if len(images) != len(noise_seeds):
        raise ValueError(f"{len(images)} images but {len(noise_seeds)} noise seeds.")
    if cond is not None and len(cond) not in (1, len(images)):
        raise ValueError(f"{len(images)} images but {len(cond)} text conditions (give one, or one per image).")
    p = next(unet.parameters())
    latents = image_latents(vae, images, batch_size)
    n, T = len(latents), len(timesteps)
    t_all = torch.tensor(timesteps, dtype=torch.long)
    result: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    rows_per_call = max(1, batch_size // max(T, 1))
    with FeatureHooks(unet, layers, pooling) as hooks:
        for i in range(0, n, rows_per_call):
            z = latents[i : i + rows_per_call]
            eps = torch.stack([fixed_noise(s, T, tuple(z.shape[1:])) for s in noise_seeds[i : i + rows_per_call]])
            z_rep = z[:, None].expand(-1, T, *z.shape[1:]).reshape(-1, *z.shape[1:])
            t_rep = t_all.repeat(len(z))
            noisy = scheduler.add_noise(z_rep, eps.reshape(-1, *z.shape[1:]), t_rep)
            kwargs = {}
            if cond is not None:
                c = cond if len(cond) == 1 else cond[i : i + rows_per_call].repeat_interleave(T, dim=0)
                kwargs["encoder_hidden_states"] = c.to(p.device, p.dtype).expand(len(noisy), -1, -1)
            unet(noisy.to(p.device, p.dtype), t_rep.to(p.device), **kwargs)
            for name, feats in hooks.pop().items():
                result[name].append(feats.reshape(len(z), T, -1))
    return {name: torch.cat(v).numpy() for name, v in result.items()}


CAPTION = "{caption}"


def condition_prompts(encode_prompt: str, texts: list[str]) -> list[str]:
    """The text each image is encoded under: its own text for `CAPTION`, else the one fixed prompt for all."""
    return list(texts) if encode_prompt == CAPTION else [encode_prompt] * len(texts)


def encode_conditioned(
    unet,
    vae,
    scheduler,
    tokenizer,
    text_encoder,
    images: torch.Tensor,
    noise_seeds: list[int],
    prompts: list[str],
    timesteps: list[int],
    layers: list[str],
    pooling: Pooling = "mean",
    batch_size: int = 32,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """`encode_images` with image i under `prompts[i]`; text embeddings are made a chunk at a time (bounded memory).

    `vae=None` takes `images` as latents already (see `image_latents`).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    if text_encoder is None:
        return encode_images(unet, vae, scheduler, images, noise_seeds, timesteps, layers, pooling, None, batch_size)
    parts = []
    for i in range(0, max(len(images), 1), chunk):
        texts = prompts[i : i + chunk]
        cond = embed_prompts(tokenizer, text_encoder, texts[:1] if len(set(texts)) == 1 else texts)
        parts.append(
            encode_images(
                unet,
                vae,
                scheduler,
                images[i : i + chunk],
                noise_seeds[i : i + chunk],
                timesteps,
                layers,
                pooling,
                cond,
                batch_size,
            )
        )
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
