"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states concatenated, the second's pooled
embedding), `time_ids` for size and crop, a UNet with `text_time` added conditioning, DDPM-style noising."""

from __future__ import annotations

import torch

from montrage.family.base import Family


class SDXLFamily(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    lora_parts = ("unet", "text_encoder", "text_encoder_2")

    def __init__(self, parts, resolution: int = 1024):
        super().__init__(parts)
        self.resolution = int(resolution)

    def _pipe(self, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        p = self.parts
        return StableDiffusionXLPipeline(
            vae=p["vae"],
            text_encoder=p["text_encoder"],
            text_encoder_2=p["text_encoder_2"],
            tokenizer=p["tokenizer"],
            tokenizer_2=p["tokenizer_2"],
            unet=p["unet"],
            scheduler=scheduler or p["scheduler"],
        )

    def _encode_texts(self, prompts: list[str]) -> list:
        dev = next(self.parts["text_encoder_2"].parameters()).device
        embeds, _, pooled, _ = self._pipe().encode_prompt(
            prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return [{"prompt_embeds": embeds[i : i + 1], "pooled": pooled[i : i + 1]} for i in range(len(prompts))]

    def time_ids(self, n: int, device) -> torch.Tensor:
        """(original size, crop top-left, target size) of the monitor's deterministic centre crop at `resolution`, as
        the SDXL training scripts' `compute_time_ids` builds them."""
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device).repeat(n, 1)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        n = len(noisy)
        added = {
            "text_embeds": cond["pooled"].to(noisy.device, noisy.dtype),
            "time_ids": self.time_ids(n, noisy.device).to(noisy.dtype),
        }
        return self.parts["unet"](
            noisy, t, encoder_hidden_states=cond["prompt_embeds"].to(noisy.device, noisy.dtype), added_cond_kwargs=added
        ).sample
