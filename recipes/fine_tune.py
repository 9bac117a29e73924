"""LoRA and DreamBooth fine-tuning of a diffusers text-to-image model (SD 1.x/2.x layout) as a LightningModule.

Follows diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py: frozen base, peft LoRA on the UNet
attention (or the full UNet), epsilon or v-prediction targets, an optional prior-preservation term, and LoRA
weights saved in diffusers format (`pytorch_lora_weights.safetensors`, loadable by `pipeline.load_lora_weights`).
The module exposes `unet` (the denoiser: a UNet, or the SD3/Flux transformer), `vae`, `text_encoder`, `tokenizer`,
`noise_scheduler` (and `text_encoder_2`, `tokenizer_2`, ... for SDXL, SD3 and Flux), which MontrageCallback reads;
SDXL, SD3 and Flux train through their family adapter (`montrage.family`).
"""

from __future__ import annotations

import os
from typing import Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from montrage.components import (
    EXTRA_PARTS,
    embed_prompts,
    load_components,
    load_model,
    model_identity,
    vae_scale_factor,
)
from montrage.family import make_family

TINY = "tiny"


def resolve_pretrained(name: str) -> str:
    """'tiny' -> the cached offline tiny base (built on first use); anything else is a local path or hub id."""
    if name == TINY:
        from montrage.recipes.tiny_base import tiny_base_path

        return tiny_base_path()
    return name


class DiffusionFineTune(pl.LightningModule):
    """Customize a text-to-image diffusion model on concept images (LoRA by default, or the full UNet).

    Args:
        pretrained_model: local diffusers folder, hub id, or "tiny" for the offline tiny base.
        train_mode: "lora" (peft adapter on the UNet attention) or "full" (all UNet weights, DreamBooth-style).
        lora_target_modules: module names the adapter wraps.
        prediction_type: override the scheduler's target ("epsilon" or "v_prediction").
        prior_loss_weight: weight of the class-image term when batches carry prior-preservation rows.
        output_dir: where the LoRA (or UNet) weights are saved at the end of training.
    """

    def __init__(
        self,
        pretrained_model: str = TINY,
        revision: Optional[str] = None,
        train_mode: Literal["lora", "full"] = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"],
        prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        prior_loss_weight: float = 1.0,
        output_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        path = resolve_pretrained(pretrained_model)
        parts = load_components(path, revision=revision) if revision else load_model(path)
        self.family = make_family(parts.parts)  # SD 1.x/2.x, SDXL, SD3 or Flux, from the model's classes
        for extra in EXTRA_PARTS:  # SDXL / SD3 / Flux: the second (and third) text encoder and tokenizer
            if parts.parts.get(extra) is not None:
                value = parts.parts[extra]
                setattr(
                    self, extra, value.requires_grad_(False).eval() if isinstance(value, torch.nn.Module) else value
                )
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder.requires_grad_(False).eval()
        self.vae = parts.vae.requires_grad_(False).eval()
        self.unet = parts.unet
        self.noise_scheduler = parts.scheduler
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        # the tiny base is named by its cache folder, which encodes its config hash
        self.model_id = (
            os.path.basename(resolve_pretrained(pretrained_model)) if pretrained_model == TINY else pretrained_model
        )
        self.base_identity = model_identity(self.unet, self.model_id)
        if train_mode == "lora":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(lora_target_modules),
                )
            )
        else:
            self.unet.requires_grad_(True)
        self.strict_loading = False  # checkpoints hold only the trainable weights (see on_save_checkpoint)

    # --- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels = batch["pixel_values"].to(self.device, self.unet.dtype)
        if self.family.name != "sd":
            return self._family_step(batch, pixels)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            cond = embed_prompts(self.tokenizer, self.text_encoder, batch["caption"])
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        prior = batch.get("is_prior")
        if prior is not None and bool(prior.any()):
            loss = per_example[~prior].mean() + self.hparams.prior_loss_weight * per_example[prior].mean()
        else:
            loss = per_example.mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(latents))
        return loss

    def _family_step(self, batch: dict, pixels: torch.Tensor) -> torch.Tensor:
        """SDXL / SD3 / Flux: the family's latents, noising, conditioning, denoiser call and target."""
        fam = self.family
        if hasattr(fam, "resolution"):
            fam.resolution = int(pixels.shape[-1])  # SDXL's time_ids: the training crop
        with torch.no_grad():
            latents = fam.latents(pixels, sample=True)
            cond = fam.embed(list(batch["caption"]))
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        pred = fam.denoise(fam.noise(latents, noise, t), t, cond)
        loss = F.mse_loss(pred.float(), fam.target(latents, noise, t).float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(latents))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # --- checkpoints: only trainable weights ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    # --- generation and export ---------------------------------------------------------------------------------
    def pipeline(self):
        """The family's pipeline over the live modules (a DDIM or flow-matching copy of the scheduler)."""
        return self.family.pipeline()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: Optional[int] = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from fixed per-seed initial latents."""
        from montrage.probes import ProbeSet

        was_training = self.unet.training
        self.unet.eval()
        try:
            size = getattr(self.unet.config, "sample_size", None) or 128
            height = height or size * vae_scale_factor(self.vae)
            images = []
            for prompt, seed in zip(prompts, seeds):
                probes = ProbeSet((prompt,), ({},), (int(seed),))
                images.append(self.family.generate(probes, height, num_inference_steps, guidance_scale))
            return torch.cat(images)
        finally:
            self.unet.train(was_training)

    def lora_state_dict(self) -> dict:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def save_weights(self, directory: str) -> str:
        """LoRA: `pytorch_lora_weights.safetensors` in diffusers format; full: a `unet/` folder."""
        os.makedirs(directory, exist_ok=True)
        if self.hparams.train_mode == "lora":
            import diffusers

            pipeline = getattr(diffusers, self.family.pipeline_class)
            key = "unet_lora_layers" if self.family.name in ("sd", "sdxl") else "transformer_lora_layers"
            pipeline.save_lora_weights(directory, **{key: self.lora_state_dict()}, safe_serialization=True)
            return os.path.join(directory, "pytorch_lora_weights.safetensors")
        sub = "unet" if self.family.name in ("sd", "sdxl") else "transformer"
        self.unet.save_pretrained(os.path.join(directory, sub))
        return os.path.join(directory, sub)

    def on_train_end(self) -> None:
        if self.hparams.output_dir and self.trainer.is_global_zero:
            self.save_weights(self.hparams.output_dir)
