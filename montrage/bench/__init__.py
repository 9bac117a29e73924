"""Benchmarks: each module measures one question and is run as `montrage bench NAME [flags]` (its own flags:
`montrage bench NAME --help`). They use the recipes' bases and data; the library never imports them."""

from __future__ import annotations

BENCHMARKS = {
    "overhead": "epoch time with vs without the monitor (inline and deferred), side by side",
    "query": "query latency against the training-set size (synthetic stores)",
    "scale": "fit time, query latency and memory at 1k-100k training images (synthetic stores)",
    "memory": "peak memory of a monitored run, small vs large monitored subset",
    "attribution": "MONTRAGE against post-hoc attribution baselines (digits or icon themes)",
    "counterfactual": "retrain without each method's top-K images; the query's loss rise",
    "origin": "origin attribution: pixel DDPM and LoRA halves on digits, every baseline",
    "origin_icons": "origin attribution, LoRA half on icon themes (per-image captions)",
    "origin_gpu": "trajectory-feature throughput on a CIFAR-size DDPM (for a GPU)",
    "adapters": "which of K LoRA adapters of one base made an image, or none",
    "memorization": "the memorization guard's similarity on a normal and an over-trained run",
}


def comma_list(text: str | None, kind=str) -> list | None:
    """'a, b,c' -> ['a', 'b', 'c'] (each converted by `kind`); None or '' -> None."""
    return [kind(t.strip()) for t in text.split(",") if t.strip()] if text else None


def synthetic_run(components, base: str, layers, timesteps, pooling: str, targets) -> dict:
    """The run description of a synthetic store over `base` (benchmarks that write stores without training): a
    LoRA of rank 8 on `targets`, the demo's sampler settings."""
    from montrage.family import make_family
    from montrage.store import AdapterSetup, RunDescription

    family = make_family(components.parts, None, None, 16)
    return RunDescription(
        model_path=base,
        resolution=16,
        **family.describe(),
        noise_points=[float(family.noise_point(t)) for t in timesteps],
        adapters={"unet": AdapterSetup(r=8, lora_alpha=8.0, target_modules=list(targets))},
        layers=list(layers),
        timesteps=list(timesteps),
        pooling=pooling,
        encode_prompt="",
        num_inference_steps=10,
        guidance_scale=3.0,
        thumbnail_size=16,
    ).to_dict()
