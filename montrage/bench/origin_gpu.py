"""Feature-extraction throughput of trajectory origin attribution at the paper's scale: a CIFAR-size pixel DDPM.

The paper extracts, for every image, the loss, ‖∇x L‖² and ‖∇θ L‖² (θ = every weight) at each of the T = 1000
timesteps of a DDPM-CIFAR10 UNet: one forward and one per-sample backward pass per (image, t). This script times
exactly that with montrage's extractor (`trajectory_features`, torch.func per-sample gradients) on:

  --size cifar  Ho et al.'s DDPM-CIFAR10 architecture as a diffusers UNet2DModel (32x32x3, channels 128/256/256/256,
                2 layers per block, attention at 16x16; 35.7 M parameters), random weights unless --model is given
                (a local DDPMPipeline folder, e.g. a downloaded google/ddpm-cifar10-32: the weights do not change
                the cost);
  --size tiny   a 2-block, 8x8 UNet with attention, for a CPU smoke test (tests/test_origin.py runs it).

`montrage bench origin-gpu --device cuda --out origin_gpu.json` (defaults: cifar, 16 images, the
full 1000-step grid, θ = all, batch 64 (image, t) pairs per vmap call, float32). It prints and writes images/s,
(image, t) pairs/s, the peak GPU memory and the time the paper's budget (3 x 1000 images, full grid) would take
at this rate.
Lower --batch-size if the per-sample gradients (batch x 35.7 M floats) do not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from montrage.errors import MontrageError

SIZES = {
    "cifar": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ),
    "tiny": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ),
}
PAPER_IMAGES = 3000  # 1000 member + 1000 generated + 1000 external (the paper's per-class budget)


def build_model(size: str = "cifar", model: str | None = None, seed: int = 0):
    """A DiffusionModel: the DDPM-CIFAR10-shaped (or tiny) UNet with random weights, or the one saved at `model`."""
    from diffusers import DDPMScheduler, UNet2DModel

    from montrage.components import DiffusionModel
    from montrage.origin.model import load_diffusion_model

    if model:
        return load_diffusion_model(model)
    if size not in SIZES:
        raise MontrageError(f"--size must be one of {', '.join(SIZES)}, not {size!r}.")
    torch.manual_seed(seed)
    unet = UNet2DModel(in_channels=3, out_channels=3, **SIZES[size]).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return DiffusionModel(unet, scheduler, f"random-ddpm-{size}")


def run_throughput(
    size: str = "cifar",
    device: str = "cpu",
    images: int = 16,
    timesteps: int = 1000,
    batch_size: int = 64,
    params: str = "all",
    dtype: str = "float32",
    model: str | None = None,
    warmup: bool = True,
    progress: bool = True,
) -> dict:
    """Time `trajectory_features` on `images` random images at `timesteps` uniform timesteps (1000 = every t)."""
    from montrage.origin.feature_set import FeatureSpec, default_timesteps
    from montrage.origin.features import trajectory_features

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda was asked for, but torch sees no CUDA device on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run with --device cpu."
        )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    m = build_model(size, model)
    m.unet.to(device)
    if torch_dtype != torch.float32:
        m.unet.to(torch_dtype)
    n_params = sum(p.numel() for p in m.unet.parameters())
    T = int(m.scheduler.config.num_train_timesteps)
    grid = default_timesteps(T, timesteps)
    res = m.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((images, m.image_channels, res, res), generator=g) * 2 - 1
    spec = FeatureSpec(tuple(grid), params=params)
    if warmup:  # kernels, allocator and vmap tracing, outside the timed run
        trajectory_features(
            m,
            pixels[:1],
            FeatureSpec(tuple(grid[: min(len(grid), batch_size)]), params=params),
            batch_size=batch_size,
            progress=False,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fs = trajectory_features(m, pixels, spec, batch_size=batch_size, progress=progress)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in fs.values.values())
    result = {
        "size": size if not model else f"loaded from {model}",
        "device": device if not device.startswith("cuda") else f"{device} ({torch.cuda.get_device_name(0)})",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "unet_parameters": n_params,
        "image_size": res,
        "dtype": dtype,
        "params": params,
        "images": images,
        "timesteps": len(grid),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 4),
        "pairs_per_second": round(images * len(grid) / seconds, 1),
        # the paper's 3 x 1000 images on the full T = 1000 grid, at this run's (image, t) rate
        "paper_budget_hours": round(PAPER_IMAGES * T / (images * len(grid) / seconds) / 3600, 2),
        "features_finite": finite,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.startswith("cuda")
        else None,
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="montrage bench origin-gpu",
        description="trajectory-feature throughput on a CIFAR-size DDPM (full T = 1000 grid)",
    )
    p.add_argument("--size", default="cifar", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=1000, help="uniform grid size (1000 = every timestep)")
    p.add_argument("--batch-size", type=int, default=64, help="(image, t) pairs per call = per-sample gradients held")
    p.add_argument("--params", default="all", choices=["all", "trainable"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", default=None, help="a DDPMPipeline folder to load instead of random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_throughput(
        args.size,
        args.device,
        args.images,
        args.timesteps,
        args.batch_size,
        args.params,
        args.dtype,
        args.model,
        progress=not args.quiet,
    )
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
