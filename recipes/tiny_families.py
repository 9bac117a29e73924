"""Tiny random-weight models of every supported family, built in code (configs in the spirit of diffusers' own
pipeline tests; CLIP and T5 tokenizers from in-code vocabularies) and saved with `save_pretrained`, so that tests
load them like real models. Nothing is downloaded.

    sd     Stable Diffusion 1.x layout (epsilon)        sd2v   the same with a v-prediction scheduler
    sdxl   two CLIP encoders, text_time UNet            sd3    MMDiT, three text encoders (CLIP, CLIP, T5)
    flux   Flux transformer with guidance embedding, CLIP + T5
"""

from __future__ import annotations

import os

import torch

from montrage.errors import MontrageError
from montrage.recipes.tiny_base import CHARS, WORDS, TinyBaseConfig, build_components, build_tokenizer

FAMILY_NAMES = ("sd", "sd2v", "sdxl", "sd3", "flux")


def build_t5_tokenizer(max_length: int = 32):
    """A word-level T5-style tokenizer (pad 0, eos 1, unk 2) from an in-code vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS + tuple(CHARS):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _clip(cls, vocab: int, seed: int):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return cls(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab,
            max_position_embeddings=16,
            projection_dim=32,
            hidden_act="gelu",
        )
    )


def _t5(vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _vae(seed: int, shift: float | None = None, scale: float = 1.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = {"shift_factor": shift} if shift is not None else {}
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scale,
        **kw,
    )


def build_family(name: str, seed: int = 0):
    """A pipeline of family `name` with random weights (16 px images, 8 x 8 latents)."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name in ("sd", "sd2v"):
        parts = build_components(TinyBaseConfig(seed=seed))
        if name == "sd2v":
            parts["scheduler"].register_to_config(prediction_type="v_prediction")
        return StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    tok = build_tokenizer(16)
    if name == "sdxl":
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(seed + 1, scale=0.5),
            text_encoder=_clip(CLIPTextModel, len(tok), seed),
            text_encoder_2=_clip(CLIPTextModelWithProjection, len(tok), seed + 3),
            tokenizer=tok,
            tokenizer_2=build_tokenizer(16),
            unet=unet,
            scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        )
    t5_tok = build_t5_tokenizer(32)
    if name == "sd3":
        torch.manual_seed(seed + 2)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(seed + 1, shift=0.06, scale=1.5),
            text_encoder=_clip(CLIPTextModelWithProjection, len(tok), seed),
            tokenizer=tok,
            text_encoder_2=_clip(CLIPTextModelWithProjection, len(tok), seed + 3),
            tokenizer_2=build_tokenizer(16),
            text_encoder_3=_t5(len(t5_tok), seed + 4),
            tokenizer_3=t5_tok,
        )
    if name == "flux":
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(seed + 1, shift=0.06, scale=1.5),
            text_encoder=_clip(CLIPTextModel, len(tok), seed),
            tokenizer=tok,
            text_encoder_2=_t5(len(t5_tok), seed + 4),
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    raise MontrageError(f"unknown family {name!r}: one of {', '.join(FAMILY_NAMES)}.")


def save_family(name: str, path: str, seed: int = 0) -> str:
    """Build and `save_pretrained` a tiny `name` model into `path` (a folder with model_index.json)."""
    build_family(name, seed).save_pretrained(path)
    return path


def load_family(path: str):
    """The saved tiny model, loaded the way a real model is (`DiffusionPipeline.from_pretrained`)."""
    from diffusers import DiffusionPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise MontrageError(f"{path!r} holds no model_index.json; build it with save_family first.")
    return DiffusionPipeline.from_pretrained(path)
