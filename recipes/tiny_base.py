"""A tiny offline Stable-Diffusion-layout base model, built from configs and briefly pre-trained on digits.

Nothing is downloaded: the tokenizer comes from an in-code vocabulary, the weights from a seeded init and a short
pre-training on scikit-learn's digits: every digit under a generic caption, and 0, 2, 3, 5, 6 and 8 also under
their word ("a photo of two"). The base thus uses its text conditioning but has never bound the words of 1, 4, 7
or 9, so customizing it to those concept tokens is real customization, as with Stable Diffusion and an artist.
The result is saved with `StableDiffusionPipeline.save_pretrained` into the user cache directory, keyed by a hash
of its config, and then loaded through the same path as a real model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from montrage.data import DIGIT_WORDS, digits_pixels

WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "of",
    "digit",
    "handwritten",
    "in",
    "style",
    "and",
    "sks",
    "dog",
    "person",
) + DIGIT_WORDS
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789<>_-,.'!?"


@dataclasses.dataclass(frozen=True)
class TinyBaseConfig:
    image_size: int = 16
    vae_steps: int = 300
    unet_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 2e-3
    caption: str = "a photo of a digit"
    class_template: str = "a photo of {token}"
    class_caption_prob: float = 0.7
    digits: tuple[int, ...] = tuple(range(10))
    class_digits: tuple[int, ...] = (0, 2, 3, 5, 6, 8)
    seed: int = 0
    max_length: int = 16
    holdout: float = 0.0  # fraction of each digit's images kept out of pre-training (`held_out_digits`)

    def digest(self) -> str:
        d = dataclasses.asdict(self)
        if not d["holdout"]:  # bases cached before the option keep their digest
            del d["holdout"]
        blob = json.dumps(d, sort_keys=True) + "|v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_digits(cfg: TinyBaseConfig) -> np.ndarray:
    """Indices of the digits the base pre-trains on: those of `cfg.digits`, less `held_out_digits`."""
    from montrage.data import sklearn_digits

    target = sklearn_digits()[1]
    return np.flatnonzero(np.isin(target, cfg.digits) & ~np.isin(np.arange(len(target)), held_out_digits(cfg)))


def held_out_digits(cfg: TinyBaseConfig) -> np.ndarray:
    """Sorted indices of the digits the base never sees in pre-training: per digit class, a seeded draw of
    `cfg.holdout` of its images (empty at 0). Membership benchmarks draw members and same-distribution external
    images from them, so that both are new to the base and only the fine-tune can tell them apart."""
    from montrage.data import sklearn_digits

    if not 0.0 <= cfg.holdout < 1.0:
        raise ValueError(f"TinyBaseConfig.holdout must be in [0, 1), not {cfg.holdout}.")
    target = sklearn_digits()[1]
    rng = np.random.default_rng(10_000 + cfg.seed)
    held = [
        rng.permutation(np.flatnonzero(target == d))[: int(round(cfg.holdout * np.sum(target == d)))] for d in range(10)
    ]
    return np.sort(np.concatenate(held)).astype(np.int64)


def build_tokenizer(max_length: int = 16, words: tuple[str, ...] = WORDS, whole_words: tuple[str, ...] = ()):
    """A CLIP BPE tokenizer from an in-code vocabulary: characters, plus word tokens for `words` (left-to-right
    merges, the digits base's vocabulary) and `whole_words`, each given the merges that make it one token under the
    merges before it (so no later word splits an earlier one)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    ranks = {m: i for i, m in enumerate(merges)}
    for word in whole_words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def _bpe(pieces: list[str], ranks: dict) -> list[str]:
    """Byte-pair merging as the tokenizer applies it: the lowest-ranked adjacent pair first, until none applies."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_components(
    cfg: TinyBaseConfig = TinyBaseConfig(),
    whole_words: tuple[str, ...] = (),
    vae_blocks: int = 2,
    vae_channels: tuple[int, ...] | None = None,
) -> dict:
    """Untrained tiny components with SD 1.x's layout (deterministic for a config). The VAE downsamples by
    2 ** (vae_blocks - 1) (channels per block: `vae_channels`, default 32 then 64); the UNet's sample size follows."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(cfg.max_length, WORDS, whole_words)
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.max_length,
        )
    )
    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(
        block_out_channels=list(vae_channels or [32] + [64] * (vae_blocks - 1)),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * vae_blocks,
        up_block_types=["UpDecoderBlock2D"] * vae_blocks,
        norm_num_groups=8,
        sample_size=cfg.image_size,
    )
    torch.manual_seed(cfg.seed + 2)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (vae_blocks - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def pretrain(parts: dict, cfg: TinyBaseConfig, progress: bool = True) -> dict:
    """Train the VAE to reconstruct digits (`pretrain_digits`), then the UNet to denoise their latents under the generic caption (and,
    for `cfg.class_digits`, under their word)."""
    from montrage.data import digit_token, sklearn_digits

    target = sklearn_digits()[1]
    keep = pretrain_digits(cfg)
    images = digits_pixels(keep, cfg.image_size)
    labels = target[keep]
    captions = [cfg.caption] + [cfg.class_template.format(token=digit_token(d)) for d in range(10)]
    named = np.where(np.isin(labels, cfg.class_digits), labels + 1, 0)  # row 0 generic, row 1 + d for digit d
    return pretrain_on(parts, images, captions, np.zeros(len(labels), np.int64), named, cfg, progress, "tiny base")


def pretrain_on(
    parts: dict,
    images: torch.Tensor,
    captions: list[str],
    generic: np.ndarray,
    named: np.ndarray,
    cfg,
    progress: bool = True,
    desc: str = "base",
) -> dict:
    """Train the VAE on `images`, then the UNet (and the text encoder, unless `cfg.train_text_encoder` is False) to
    denoise their latents: image i under caption `captions[named[i]]` with probability `cfg.class_caption_prob`,
    else under `captions[generic[i]]`."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    vae, unet, sched = parts["vae"], parts["unet"], parts["scheduler"]
    torch.manual_seed(cfg.seed)

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate)
    vae.train()
    for _ in tqdm(range(cfg.vae_steps), desc=f"{desc}: VAE", disable=not progress):
        x = images[torch.randint(0, len(images), (cfg.batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)

    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    ids = parts["tokenizer"](
        captions, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt"
    ).input_ids
    generic, named = torch.as_tensor(generic), torch.as_tensor(named)
    text_encoder = parts["text_encoder"]
    train_text = getattr(cfg, "train_text_encoder", True)  # frozen: every word keeps its own (random) encoding
    text_encoder.requires_grad_(train_text)

    opt = torch.optim.AdamW(
        list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else []), lr=cfg.learning_rate
    )
    unet.train()
    text_encoder.train(train_text)
    for _ in tqdm(range(cfg.unet_steps), desc=f"{desc}: UNet", disable=not progress):
        pick = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        z = latents[pick]
        use_named = torch.rand(len(z), generator=g) < cfg.class_caption_prob
        cond = text_encoder(ids[torch.where(use_named, named[pick], generic[pick])])[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=g)
        pred = unet(sched.add_noise(z, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()
    text_encoder.eval()
    return parts


def save_pipeline(parts: dict, path: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def default_cache_dir() -> str:
    from platformdirs import user_cache_dir

    return os.environ.get("MONTRAGE_CACHE", user_cache_dir("montrage"))


def tiny_base_path(cfg: TinyBaseConfig | None = None, cache_dir: str | None = None, progress: bool = True) -> str:
    """Path of the cached tiny base for `cfg`, building and pre-training it first if needed (~1-2 min on 2 cores)."""
    cfg = cfg or TinyBaseConfig()
    return cached_base("tiny-base", cfg, lambda: pretrain(build_components(cfg), cfg, progress=progress), cache_dir)


BUILD_THREADS = 1  # float reductions depend on the thread count: a base is built on one, so it is the same anywhere


def cached_base(name: str, cfg, build, cache_dir: str | None = None) -> str:
    """`<cache>/<name>-<cfg digest>-<threads>t`, saved from `build()`'s components the first time it is asked for.

    The build runs on `BUILD_THREADS` torch threads whatever the machine has, so that a config names one set of
    weights (built on 2 threads and on 1, the same recipe gave different bases, and different benchmark figures)."""
    import torch

    root = cache_dir or default_cache_dir()
    path = os.path.join(root, f"{name}-{cfg.digest()}-{BUILD_THREADS}t")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        parts = build()
    finally:
        torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    save_pipeline(parts, tmp)
    with open(os.path.join(tmp, "montrage_tiny_base.json"), "w") as fh:
        json.dump(
            {"config": dataclasses.asdict(cfg), "seconds": round(time.time() - t0, 1), "threads": BUILD_THREADS},
            fh,
            indent=1,
        )
    try:
        os.rename(tmp, path)  # atomic: a concurrent builder loses the race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main() -> None:
    print(tiny_base_path())


if __name__ == "__main__":
    main()
