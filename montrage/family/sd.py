"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction): one CLIP text encoder, a UNet, DDPM-style noising."""

from __future__ import annotations

import torch

from montrage.family.base import Family


class SDFamily(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    lora_parts = ("unet", "text_encoder")

    def _encode_texts(self, prompts: list[str]) -> list:
        from montrage.components import embed_prompts

        emb = embed_prompts(self.parts["tokenizer"], self.parts["text_encoder"], prompts)
        return [emb[i : i + 1] for i in range(len(prompts))]

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        unet = self.parts["unet"]
        c = cond.to(noisy.device, noisy.dtype) if cond is not None else None
        return unet(noisy, t, encoder_hidden_states=c).sample

    def pipeline(self):
        from montrage.generate import build_pipeline

        p = self.parts
        return build_pipeline(p["tokenizer"], p["text_encoder"], p["vae"], p["unet"], p["scheduler"])

    # SD keeps montrage's original encoding and sampling paths, which the offline store model shares
    def latents(self, pixels: torch.Tensor, batch_size: int = 32, sample: bool = False) -> torch.Tensor:
        from montrage.encode import image_latents

        if sample:
            return super().latents(pixels, batch_size, sample=True)
        return image_latents(self.parts["vae"], pixels, batch_size)

    def encode(self, latents, noise_seeds, prompts, timesteps, layers, pooling="mean", batch_size=32):
        from montrage.encode import encode_conditioned

        p = self.parts
        return encode_conditioned(
            p["unet"],
            None,
            p["scheduler"],
            p["tokenizer"],
            p["text_encoder"],
            latents,
            noise_seeds,
            prompts,
            timesteps,
            layers,
            pooling,
            batch_size,
        )

    def generate(self, probes, height, num_inference_steps, guidance_scale, indices=None, batch_size=8):
        from montrage.generate import generate_probes

        return generate_probes(
            self.pipeline(), probes, height, num_inference_steps, guidance_scale, batch_size, indices=indices
        )
