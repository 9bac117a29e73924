"""Flux: CLIP pooled embedding + T5 sequence with `txt_ids`, a transformer over 2x2-packed latent tokens with
`img_ids`, an embedded guidance scale instead of CFG (dev), timesteps given as sigma, flow-matching noising."""

from __future__ import annotations

import torch

from montrage.family.sd3 import SD3Family


class FluxFamily(SD3Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    lora_parts = ("transformer", "text_encoder")

    def __init__(self, parts, max_sequence_length: int = 512, guidance_scale: float = 3.5):
        super().__init__(parts, max_sequence_length)
        self.guidance_scale = float(guidance_scale)  # Flux-dev's embedded guidance (training and probes)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # packed 2x2

    def _pipe(self, scheduler=None):
        from diffusers import FluxPipeline

        p = self.parts
        return FluxPipeline(
            scheduler=scheduler or p["scheduler"],
            vae=p["vae"],
            text_encoder=p["text_encoder"],
            tokenizer=p["tokenizer"],
            text_encoder_2=p["text_encoder_2"],
            tokenizer_2=p["tokenizer_2"],
            transformer=p["transformer"],
        )

    def _encode_texts(self, prompts: list[str]) -> list:
        dev = next(self.parts["text_encoder"].parameters()).device
        embeds, pooled, text_ids = self._pipe().encode_prompt(
            prompts, prompt_2=None, device=dev, max_sequence_length=self.max_sequence_length
        )
        return [
            {"prompt_embeds": embeds[i : i + 1], "pooled": pooled[i : i + 1], "txt_ids": text_ids}
            for i in range(len(prompts))
        ]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        return FluxPipeline._pack_latents(x, b, c, h, w)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """As train_dreambooth_lora_flux.py calls it: packed latents, img_ids, timestep / 1000, guidance."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        tr = self.parts["transformer"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = torch.full((b,), self.guidance_scale, device=noisy.device) if tr.config.guidance_embeds else None
        pred = tr(
            hidden_states=self.pack(noisy),
            timestep=t.to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"].to(noisy.device, noisy.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(noisy.device, noisy.dtype),
            txt_ids=cond["txt_ids"].to(noisy.device, noisy.dtype),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        from montrage.components import vae_scale_factor

        scale = vae_scale_factor(self.parts["vae"])
        return FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)

    def initial_latents(self, seed: int, height: int) -> torch.Tensor:
        return self.pack(super().initial_latents(seed, height))

    def sample_kwargs(self, num_inference_steps: int, guidance_scale: float) -> dict:
        """Flux samples with its embedded guidance (no CFG): `guidance_scale` is the family's, not CFG's 7.5."""
        return {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }
