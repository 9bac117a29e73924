"""The origin benchmark's LoRA half: a LoRA fine-tune of the tiny base with MontrageCallback (deferred: adapter
snapshots only), the model rebuilt from its store, members / generations / external images, and one seed's
evaluation. `train_lora` is shared with the icons half and the adapters benchmark."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import torch

from montrage.bench.origin_eval import ORIGINS, evaluate, extract_features, shifted_digits, throughput, window_grids
from montrage.errors import MontrageError
from montrage.store import SCHEMA_VERSION

LORA_PROMPTS = ("empty", "caption")  # text condition of the LoRA half's features (see lora_seed)
LORA_HOLDOUT = 0.5  # the LoRA half's base pre-trains on half of every digit; members and held-out come from the rest


# --- the LoRA half -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoraBenchConfig:
    concepts: tuple[int, ...] = (1, 4, 7, 9)
    per_concept: int = 32
    epochs: int = 6
    repeats: int = 25
    learning_rate: float = 1e-2
    rank: int = 8
    seed: int = 0

    def digest(self) -> str:
        # the store's schema version too: a cached fine-tune whose store this montrage cannot read is redone
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + f"|lora-v2|schema-{SCHEMA_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def lora_split(cfg: LoraBenchConfig, pool=None) -> tuple[list[int], list[int], list[int]]:
    """Member, held-out external and shifted (to be rotated) digit indices: per concept, a seeded permutation of its
    digits (those in `pool`, e.g. the base's `held_out_digits`; all when None) gives `per_concept` members, then
    half as many held-out and half as many shifted images."""
    from montrage.data import sklearn_digits

    target = sklearn_digits()[1]
    allowed = np.ones(len(target), bool) if pool is None else np.isin(np.arange(len(target)), pool)
    rng = np.random.default_rng(cfg.seed)
    half = cfg.per_concept // 2
    member, held, shifted = [], [], []
    for d in cfg.concepts:
        idx = rng.permutation(np.flatnonzero((target == d) & allowed))
        if len(idx) < 2 * cfg.per_concept:
            which = "images" if pool is None else "images the base did not pre-train on"
            raise MontrageError(
                f"digit {d} has {len(idx)} {which}; --lora-per-concept must be at most {len(idx) // 2}."
            )
        member += idx[: cfg.per_concept].tolist()
        held += idx[cfg.per_concept : cfg.per_concept + half].tolist()
        shifted += idx[cfg.per_concept + half : cfg.per_concept + 2 * half].tolist()
    return member, held, shifted


def split_pool(base_config) -> np.ndarray | None:
    """The digits a split may draw from: those the base held out of pre-training (all when it held none out)."""
    from montrage.recipes.tiny_base import held_out_digits

    return held_out_digits(base_config) if base_config is not None and base_config.holdout else None


def fine_tune_with_store(
    examples,
    tokens: dict[str, str],
    base: str,
    out: str,
    cfg: LoraBenchConfig,
    resolution: int | None = None,
    progress: bool = True,
) -> tuple[str, str]:
    """LoRA-fine-tune `base` on `examples` (their captions), monitored by MontrageCallback in deferred mode (the
    store holds the adapter of every epoch, nothing encoded); cached in `out`. Returns (LoRA file, store)."""
    weights = os.path.join(out, "pytorch_lora_weights.safetensors")
    store = os.path.join(out, "store.h5")
    meta = os.path.join(out, "montrage_lora_bench.json")
    if os.path.isfile(weights) and os.path.isfile(meta) and os.path.isfile(store):
        return weights, store
    import pytorch_lightning as pl

    from montrage.callbacks import MontrageCallback
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune

    class Members(ConceptDataModule):
        def examples(self):
            return examples

        def concept_tokens(self):
            return tokens

    t = time.time()
    pl.seed_everything(cfg.seed, verbose=False)
    module = DiffusionFineTune(
        pretrained_model=base, lora_rank=cfg.rank, lora_alpha=cfg.rank, learning_rate=cfg.learning_rate
    )
    data = Members(
        batch_size=32, repeats=cfg.repeats, seed=cfg.seed, **({"resolution": resolution} if resolution else {})
    )
    monitor = MontrageCallback(store_path=store, mode="deferred", probe_seeds=[0], log_to_wandb=False, overwrite=True)
    pl.Trainer(
        max_epochs=cfg.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[monitor],
    ).fit(module, data)
    module.save_weights(out)
    with open(meta, "w") as fh:
        json.dump(
            {
                "config": dataclasses.asdict(cfg),
                "members": [e.id for e in examples],
                "seconds": round(time.time() - t, 1),
            },
            fh,
        )
    return weights, store


def train_lora(cfg: LoraBenchConfig, workdir: str, progress: bool = True, base_config=None) -> tuple[str, str, str]:
    """Fine-tune the tiny base (`base_config`: another tiny base, e.g. one with digits held out of pre-training, or
    an untrained one in tests) on the member digits (captions 'a photo of <word>') with `fine_tune_with_store`.
    Returns (base path, LoRA file, store)."""
    from montrage.data import TrainExample, digit_token, sklearn_digits
    from montrage.recipes.tiny_base import tiny_base_path

    base = tiny_base_path(base_config, progress=progress)
    out = os.path.join(workdir, f"lora-{cfg.digest()}" + ("" if base_config is None else f"-{base_config.digest()}"))
    members, _, _ = lora_split(cfg, split_pool(base_config))
    target = sklearn_digits()[1]
    examples = [
        TrainExample(
            id=f"digits/{i}",
            concept=f"digit{target[i]}",
            caption=f"a photo of {digit_token(int(target[i]))}",
            path=f"sklearn:digits/{i}",
        )
        for i in members
    ]
    tokens = {f"digit{d}": digit_token(d) for d in cfg.concepts}
    return (base,) + fine_tune_with_store(examples, tokens, base, out, cfg, progress=progress)


def lora_seed(
    seed: int,
    workdir: str,
    concepts=(1, 4, 7, 9),
    per_concept: int = 32,
    epochs: int = 6,
    repeats: int = 25,
    learning_rate: float = 1e-2,
    rank: int = 8,
    timesteps: int = 20,
    gen_steps: int = 25,
    guidance: float = 3.0,
    windows: int = 4,
    batch_size: int = 64,
    C: float = 1.0,
    draws: int = 1,
    prompt: str = "empty",
    progress: bool = True,
    base_config=None,
) -> dict:
    """One seed of the LoRA half: fine-tune (or reuse), generate from the concept prompts, extract, evaluate.

    `base_config` None: the tiny base pre-trained without `LORA_HOLDOUT` of every digit, members and held-out
    external images drawn from those, so both are new to the base and only the fine-tune tells them apart.

    `prompt`: the text condition of every model-based feature. "empty": the empty prompt for all images; "caption":
    each image's natural caption, "a photo of <word>" of its digit: the training caption for members, the generation
    prompt for generations, the concept caption of the digit's class for external images."""
    from montrage.data import digit_token, quantize, sklearn_digits
    from montrage.generate import build_pipeline, generate_probes
    from montrage.origin.feature_set import default_timesteps
    from montrage.origin.from_store import store_diffusion_model
    from montrage.probes import ProbeSet
    from montrage.recipes.pixel_ddpm import digits_images
    from montrage.recipes.tiny_base import TinyBaseConfig

    if prompt not in LORA_PROMPTS:
        raise MontrageError(f"prompt must be one of {LORA_PROMPTS}, not {prompt!r}.")
    base_config = base_config or TinyBaseConfig(holdout=LORA_HOLDOUT)
    cfg = LoraBenchConfig(tuple(int(c) for c in concepts), per_concept, epochs, repeats, learning_rate, rank, seed)
    t = time.time()
    base, weights, store = train_lora(cfg, workdir, progress, base_config)
    seconds = {"fine_tune": time.time() - t}
    model = store_diffusion_model(store)  # base + final adapter; the store's other snapshots give loss_snapshots
    member_idx, held_idx, shifted_idx = lora_split(cfg, split_pool(base_config))
    size = model.image_size
    t = time.time()
    prompts = tuple(f"a photo of {digit_token(d)}" for d in cfg.concepts)
    probes = ProbeSet(prompts, tuple({} for _ in prompts), tuple(10_000 + 1000 * seed + k for k in range(per_concept)))
    pipe = build_pipeline(model.tokenizer, model.text_encoder, model.vae, model.unet, model.scheduler)
    with torch.no_grad():
        generated = quantize(generate_probes(pipe, probes, size, gen_steps, guidance, batch_size=64))
    seconds["generate"] = time.time() - t
    external = torch.cat([digits_images(held_idx, size), shifted_digits(shifted_idx, size)])
    images = {"member": digits_images(member_idx, size), "generated": generated, "external": external}
    pixels = torch.cat([images[o] for o in ORIGINS])
    labels = np.concatenate([[o] * len(images[o]) for o in ORIGINS])
    sources = np.concatenate(
        [
            labels[: len(member_idx) + len(generated)],
            ["external:held-out"] * len(held_idx),
            ["external:shifted"] * len(shifted_idx),
        ]
    )
    T = int(model.scheduler.config.num_train_timesteps)
    grid = default_timesteps(T, timesteps)
    wgrids = window_grids(T, timesteps, windows)
    target = sklearn_digits()[1]
    caption = lambda i: f"a photo of {digit_token(int(target[i]))}"  # noqa: E731 (the training caption)
    natural = (
        [caption(i) for i in member_idx]
        + [p for p, _ in probes.items()]
        + [caption(i) for i in list(held_idx) + list(shifted_idx)]
    )
    assert len(natural) == len(pixels)
    captions = natural if prompt == "caption" else None
    sets, secs = extract_features(
        model, pixels, grid, wgrids, draws, batch_size, progress, captions, clid_captions=natural
    )  # CLiD always compares each image's own caption
    seconds.update({f"features_{k}": v for k, v in secs.items()})
    result = evaluate(sets, pixels, labels, sources, grid, wgrids, seed, C)
    n_lora = sum(p.numel() for n, p in model.unet.named_parameters() if p.requires_grad)
    result["throughput"] = throughput(
        len(pixels),
        grid,
        draws,
        secs["trajectory"],
        f"{', '.join(sets['trajectory'].spec.families)} (θ = the LoRA, {n_lora} parameters), via the VAE",
    )
    result["config"] = {
        **dataclasses.asdict(cfg),
        "timesteps": grid,
        "draws": draws,
        "windows": wgrids,
        "generation": {"prompts": list(prompts), "sampler": "ddim", "steps": gen_steps, "guidance_scale": guidance},
        "base": base,
        "lora": weights,
        "store": store,
        "condition": "empty prompt"
        if captions is None
        else "per-image caption 'a photo of <word>' (members: training caption, generated: generation "
        "prompt, external: the digit's concept caption)",
        "batch_size": batch_size,
        "C": C,
        "external": f"{len(held_idx)} held-out digits of the concepts + {len(shifted_idx)} rotated by 90°",
        "base_holdout": base_config.holdout,  # > 0: members and external digits are none of the base's
    }
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return result
