"""Stable Diffusion 3: three text encoders (two CLIP with projection, one T5), an MMDiT transformer whose joint
blocks return (text, image) streams, flow-matching noising (1 - sigma) x + sigma eps."""

from __future__ import annotations

import torch

from montrage.family.base import Family

JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


class SD3Family(Family):
    name = "sd3"
    noise_kind = "flow"
    pipeline_class = "StableDiffusion3Pipeline"
    lora_parts = ("transformer", "text_encoder", "text_encoder_2")

    def __init__(self, parts, max_sequence_length: int = 256):
        super().__init__(parts)
        self.max_sequence_length = int(max_sequence_length)

    def default_layers(self) -> list[str]:
        return [f"transformer_blocks.{len(self.denoiser.transformer_blocks) // 2}"]

    def select_stream(self, module, output):
        if type(module).__name__ in JOINT_BLOCKS and isinstance(output, (tuple, list)):
            return output[1]  # (encoder_hidden_states, hidden_states): the image tokens
        return super().select_stream(module, output)

    def _pipe(self, scheduler=None):
        from diffusers import StableDiffusion3Pipeline

        p = self.parts
        return StableDiffusion3Pipeline(
            transformer=p["transformer"],
            scheduler=scheduler or p["scheduler"],
            vae=p["vae"],
            text_encoder=p["text_encoder"],
            tokenizer=p["tokenizer"],
            text_encoder_2=p["text_encoder_2"],
            tokenizer_2=p["tokenizer_2"],
            text_encoder_3=p.get("text_encoder_3"),
            tokenizer_3=p.get("tokenizer_3"),
        )

    def _encode_texts(self, prompts: list[str]) -> list:
        dev = next(self.parts["text_encoder"].parameters()).device
        embeds, _, pooled, _ = self._pipe().encode_prompt(
            prompts,
            prompts,
            prompts,
            device=dev,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds": embeds[i : i + 1], "pooled": pooled[i : i + 1]} for i in range(len(prompts))]

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.parts["transformer"](
            hidden_states=noisy,
            timestep=t.to(noisy.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(noisy.device, noisy.dtype),
            pooled_projections=cond["pooled"].to(noisy.device, noisy.dtype),
            return_dict=False,
        )[0]

    def sampler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.parts["scheduler"].config)

    def sample_kwargs(self, num_inference_steps: int, guidance_scale: float) -> dict:
        return {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }
