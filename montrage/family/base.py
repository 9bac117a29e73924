"""The family adapter protocol: everything that differs between SD 1.x/2.x, SDXL, SD3 and Flux, behind one class.

A family adapter owns the latents (VAE posterior mean, scaled and shifted as that family trains), the closed-form
noising at the stored noise points (integer t through alpha-bar for DDPM-style schedulers, sigma in (0, 1) for flow
matching), the text conditioning (as the family's pipeline builds it, cached per distinct text), the denoiser call,
the layers hooked by default and which stream of a joint block is the image stream, probe generation through the
family's own pipeline over the live modules with a copy of the scheduler, and the components that carry a LoRA.

To support another model, subclass `Family`, implement the abstract methods, and pass an instance as `family=`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from montrage.capture import FeatureHooks, Pooling
from montrage.errors import MontrageError

# entries of a family's condition shared by the whole batch instead of one per image (Flux's text position ids)
SHARED_COND_KEYS = ("txt_ids",)


class FamilyError(MontrageError, ValueError):
    """A model no family adapter knows, or one used against a store of another family."""


class Family:
    """Base adapter; `parts` are the live modules by diffusers name (unet or transformer, vae, text_encoder, ...)."""

    name = "base"
    noise_kind = "ddpm"  # or "flow"
    pipeline_class = ""  # the diffusers pipeline that samples probes
    lora_parts: tuple[str, ...] = ("unet",)
    conditional = True  # the denoiser takes a text condition

    def __init__(self, parts: dict[str, Any]):
        self.parts = parts
        self._text_cache: dict[str, Any] = {}

    # --- what the store records --------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts["unet"] if "unet" in self.parts else self.parts["transformer"]

    def describe(self) -> dict:
        return {"family": self.name, "noise_kind": self.noise_kind, "denoiser_class": type(self.denoiser).__name__}

    def default_layers(self) -> list[str]:
        """The UNet bottleneck (the "h-space"); transformer families name a middle joint block."""
        return ["mid_block"]

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in self.parts.values() if isinstance(m, torch.nn.Module)]

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The components that carry a peft adapter (snapshotted every snapshot, restored offline)."""
        return {
            k: self.parts[k]
            for k in self.lora_parts
            if isinstance(self.parts.get(k), torch.nn.Module) and getattr(self.parts[k], "peft_config", None)
        }

    # --- latents and noise -------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, batch_size: int = 32, sample: bool = False) -> torch.Tensor:
        """Latents in the denoiser's training space: (z - shift) * scale, or with latents_mean/std. The posterior
        mean (monitoring: deterministic), or a sample of it (`sample`, as training draws)."""
        vae = self.parts["vae"]
        p = next(vae.parameters())
        cfg = vae.config
        out = []
        for i in range(0, len(pixels), batch_size):
            dist = vae.encode(pixels[i : i + batch_size].to(p.device, p.dtype)).latent_dist
            z = (dist.sample() if sample else dist.mean).float()
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            if mean is not None and std is not None:
                m = torch.tensor(mean, device=z.device).view(1, -1, 1, 1)
                s = torch.tensor(std, device=z.device).view(1, -1, 1, 1)
                z = (z - m) * float(cfg.scaling_factor) / s
            else:
                z = (z - float(getattr(cfg, "shift_factor", None) or 0.0)) * float(cfg.scaling_factor)
            out.append(z if sample else z.cpu())
        return torch.cat(out) if out else torch.empty(0)

    def noise_point(self, t: int) -> float:
        """The stored noise point of timestep t: t itself (DDPM) or sigma = t / num_train_timesteps (flow)."""
        if self.noise_kind == "flow":
            return float(t) / float(self.parts["scheduler"].config.num_train_timesteps)
        return int(t)

    def noise(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Closed-form noising of x (B, ...) with eps at integer timesteps t (B,), as the family's training does."""
        if self.noise_kind == "flow":
            sigma = (t.float() / float(self.parts["scheduler"].config.num_train_timesteps)).view(
                -1, *[1] * (x.dim() - 1)
            )
            return (1.0 - sigma) * x + sigma * eps
        ac = self.parts["scheduler"].alphas_cumprod.to(dtype=x.dtype, device=x.device)[t.to(x.device)]
        ac = ac.view(-1, *[1] * (x.dim() - 1))
        return ac**0.5 * x + (1 - ac) ** 0.5 * eps

    # --- text and the denoiser ---------------------------------------------------------------------------
    max_cached_texts = 64  # probe prompts and the fixed encode prompt stay; a run's many captions rotate through

    def condition(self, prompts: list[str]) -> Any:
        """The condition of each prompt (family-specific, batched along dim 0), computed once per distinct text and
        kept (up to `max_cached_texts`, oldest dropped first: T5 embeddings are megabytes each)."""
        distinct = list(dict.fromkeys(prompts))
        new = [p for p in distinct if p not in self._text_cache]
        fresh = {}
        if new:
            with torch.no_grad():
                fresh = dict(zip(new, self._encode_texts(new)))
        out = self._stack([self._text_cache[p] if p in self._text_cache else fresh[p] for p in prompts])
        for p, c in fresh.items():
            if len(self._text_cache) >= self.max_cached_texts:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[p] = c
        return out

    def embed(self, prompts: list[str]):
        """Conditions of `prompts`, uncached and with gradients where the text encoders train (for training steps)."""
        return self._stack(self._encode_texts(prompts))

    def _encode_texts(self, prompts: list[str]) -> list:
        raise NotImplementedError

    def target(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: eps - x (flow), the velocity (v-prediction) or eps."""
        if self.noise_kind == "flow":
            return eps - x
        sched = self.parts["scheduler"]
        if sched.config.get("prediction_type", "epsilon") == "v_prediction":
            return sched.get_velocity(x, eps, t)
        return eps

    @staticmethod
    def _stack(conds: list):
        if isinstance(conds[0], dict):
            return {k: conds[0][k] if k in SHARED_COND_KEYS else torch.cat([c[k] for c in conds]) for k in conds[0]}
        return torch.cat(conds)

    def forget_texts(self) -> None:
        """Drop cached text conditions (after a text encoder was trained a step)."""
        self._text_cache.clear()

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def select_stream(self, module: torch.nn.Module, output):
        """The image stream of a hooked module's output (joint blocks return (text, image))."""
        if isinstance(output, (tuple, list)):
            return output[0]
        return output

    # --- encoding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        latents: torch.Tensor,
        noise_seeds: list[int],
        prompts: list[str],
        timesteps: list[int],
        layers: list[str],
        pooling: Pooling = "mean",
        batch_size: int = 32,
    ) -> dict[str, np.ndarray]:
        """Pooled activations {layer: (N, T, F)} of latents (N, ...) noised with a fixed eps per image at each
        timestep, under each image's prompt."""
        from montrage.encode import fixed_noise

        dev = next(self.denoiser.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        n, T = len(latents), len(timesteps)
        t_all = torch.tensor(timesteps, dtype=torch.long)
        result: dict[str, list] = {name: [] for name in layers}
        rows = max(1, batch_size // max(T, 1))
        with FeatureHooks(self.denoiser, layers, pooling, select=self.select_stream) as hooks:
            for i in range(0, n, rows):
                z = latents[i : i + rows].float()
                eps = torch.stack([fixed_noise(s, T, tuple(z.shape[1:])) for s in noise_seeds[i : i + rows]])
                z_rep = z[:, None].expand(-1, T, *z.shape[1:]).reshape(-1, *z.shape[1:])
                t_rep = t_all.repeat(len(z))
                noisy = self.noise(z_rep, eps.reshape(-1, *z.shape[1:]), t_rep)
                texts = [p for p in prompts[i : i + rows] for _ in range(T)]
                cond = self.condition(texts) if self.conditional else None
                self.denoise(noisy.to(dev, dtype), t_rep.to(dev), cond)
                for name, feats in hooks.pop().items():
                    result[name].append(feats.reshape(len(z), T, -1))
        return {name: torch.cat(v).numpy() for name, v in result.items()}

    # --- probes ------------------------------------------------------------------------------------------
    def sampler(self):
        """A sampler built from the training scheduler's config (its state, timesteps and sigmas, stay untouched):
        DDIM for DDPM-style families; flow families override it."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.parts["scheduler"].config)

    def _pipe(self, scheduler=None):
        """The family's diffusers pipeline over the live modules, with `scheduler` (default: the training one)."""
        raise NotImplementedError

    def pipeline(self):
        return self._pipe(self.sampler())

    def initial_latents(self, seed: int, height: int) -> torch.Tensor:
        from montrage.components import vae_scale_factor

        size = height // vae_scale_factor(self.parts["vae"])
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((1, self.latent_channels, size, size), generator=g)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def sample_kwargs(self, num_inference_steps: int, guidance_scale: float) -> dict:
        return {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}

    @torch.no_grad()
    def generate(
        self, probes, height: int, num_inference_steps: int, guidance_scale: float, indices=None, batch_size: int = 8
    ) -> torch.Tensor:
        """Images (len(indices), 3, H, W) in [-1, 1] of the selected probes, from fixed per-seed initial latents."""
        items = probes.items()
        indices = list(range(len(items))) if indices is None else list(indices)
        if not indices:
            return torch.empty(0, 3, height, height)
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        p = next(self.denoiser.parameters())
        out = []
        for i in range(0, len(indices), batch_size):
            chunk = [items[k] for k in indices[i : i + batch_size]]
            latents = torch.cat([self.initial_latents(s, height) for _, s in chunk])
            images = pipe(
                [prompt for prompt, _ in chunk],
                height=height,
                width=height,
                latents=latents.to(p.device, p.dtype),
                output_type="pt",
                **self.sample_kwargs(num_inference_steps, guidance_scale),
            ).images
            out.append(images.float().cpu() * 2.0 - 1.0)
        return torch.cat(out)
