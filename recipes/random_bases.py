"""Random-weight bases with real architectures: Stable Diffusion 1.5's and SDXL's UNet, VAE and text encoders at
their full sizes, weights drawn at random (seeded) and cached once, so costs can be measured offline at real scale.
Tokenizers are built in code; nothing is downloaded."""

from __future__ import annotations

import os

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def _cached_random_model(name: str, save) -> str:
    """`<cache>/<name>`: a random-weight pipeline folder, written once by `save(tmp_path)` and renamed when complete."""
    from montrage.recipes.tiny_base import default_cache_dir

    path = os.path.join(default_cache_dir(), name)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        import torch

        torch.manual_seed(0)
        save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def _clip_text(tok, cls_name: str = "CLIPTextModel", hidden: int = 768, layers: int = 12, heads: int = 12, **kw):
    import transformers

    return getattr(transformers, cls_name)(
        transformers.CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **kw,
        )
    )


SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sd15_random_path() -> str:
    """A pipeline folder with Stable Diffusion 1.5's architecture and random weights (built once, cached)."""

    def save(path):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from montrage.recipes.tiny_base import build_tokenizer, save_pipeline

        tok = build_tokenizer(77)
        save_pipeline(
            dict(
                unet=UNet2DConditionModel(**SD15_UNET),
                vae=AutoencoderKL(**SD15_VAE),
                text_encoder=_clip_text(tok),
                tokenizer=tok,
                scheduler=DDPMScheduler(**SCALED_LINEAR),
            ),
            path,
        )

    return _cached_random_model("sd15-random-v1", save)


SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


def sdxl_random_path() -> str:
    """A pipeline folder with SDXL's architecture (2.6 B-parameter UNet, CLIP-L + bigG) and random weights."""

    def save(path):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        from montrage.recipes.tiny_base import build_tokenizer

        tok = build_tokenizer(77)
        StableDiffusionXLPipeline(
            vae=AutoencoderKL(**{**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}),
            text_encoder=_clip_text(tok),
            text_encoder_2=_clip_text(tok, "CLIPTextModelWithProjection", 1280, 32, 20, projection_dim=1280),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=EulerDiscreteScheduler(**{k: v for k, v in SCALED_LINEAR.items() if k != "num_train_timesteps"}),
        ).save_pretrained(path)

    return _cached_random_model("sdxl-random-v1", save)


BASES = {"sd15": sd15_random_path, "sdxl": sdxl_random_path}
