"""A small pixel-space DDPM on scikit-learn digits, trained on a member subset: the origin-attribution test bed.

The seed paper studies pixel DDPMs (Ho et al.); this is the CPU-sized version. A diffusers `UNet2DModel` with
block channels (32, 64), one layer per block, on 16x16 digits, trained with a plain torch loop on `members` digits
drawn by the seed, so that there are known members, held-out real digits (external) and generations.

Choices (documented because origin features depend on them):
- 3 channels: the grey digit is repeated to RGB, so members, generations and user PNGs share montrage's RGB image
  path (`load_image`, PNG files) with the latent models; the extra cost is only in the first and last conv.
- Pixels are quantised to 8 bits (what a PNG holds) for training and for every image the benchmark scores, so an
  image saved to disk and read back is bit-identical to the one scored.
- DDPM linear β schedule 1e-4..0.02 over T = 1000 (Ho et al.), ε-prediction, AdamW, no EMA.
- Deterministic for a seed on a given machine and thread count: seeded init, batches, timesteps and noise.

Measured on 2 idle CPU cores (batch 128): ≈ 0.36 s/step, 1,000 steps ≈ 6 min (several times slower when other
jobs share the cores). Memorization at the defaults (200 members, 1,000 steps, lr 1e-3; member vs 200 held-out
digits): a one-timestep, one-ε loss threshold reaches AUC ≈ 0.66-0.69 (best t ≈ 100-200), the mean loss over 10
timesteps x 4 ε draws ≈ 0.76 (lr 2e-3: 0.71) -- below DESIGN.md's "≈ 0.94 after 1,000 steps", whose measurement
protocol is not recorded, but in between chance and saturation, so that methods can be told apart.
Saved with `DDPMPipeline.save_pretrained` (model_index.json, unet/, scheduler/) plus `montrage_pixel_ddpm.json`
(config, member indices, loss curve), so `montrage.origin.load_diffusion_model` and diffusers both load it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from montrage.errors import MontrageError

META_NAME = "montrage_pixel_ddpm.json"


@dataclasses.dataclass(frozen=True)
class PixelDDPMConfig:
    members: int = 200
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    image_size: int = 16
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    num_train_timesteps: int = 1000
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_digits(members: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Member indices and the held-out rest of scikit-learn's 1,797 digits, by a seeded permutation."""
    from montrage.data import sklearn_digits

    n = len(sklearn_digits()[1])
    if not 0 < members < n:
        raise MontrageError(f"members must be between 1 and {n - 1}, not {members}.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:members]), np.sort(perm[members:])


def digits_images(indices, size: int = 16, channels: int = 3) -> torch.Tensor:
    """Digits (N, channels, size, size) in [-1, 1], 8-bit quantised."""
    from montrage.data import digits_pixels, quantize

    x = quantize(digits_pixels(np.asarray(indices), size))
    return x[:, :1] if channels == 1 else x


def build_unet(cfg: PixelDDPMConfig):
    from diffusers import UNet2DModel

    torch.manual_seed(cfg.seed)
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(cfg.block_out_channels),
        up_block_types=("UpBlock2D",) * len(cfg.block_out_channels),
        norm_num_groups=8,
    )


def build_scheduler(cfg: PixelDDPMConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def read_meta(path: str) -> dict | None:
    meta = os.path.join(path, META_NAME)
    if not os.path.isfile(meta):
        return None
    with open(meta) as fh:
        return json.load(fh)


def train_pixel_ddpm(out_dir: str, cfg: PixelDDPMConfig = PixelDDPMConfig(), progress: bool = True) -> str:
    """Train on cfg.members digits and save to out_dir; an existing model of the same config is reused as is."""
    from diffusers import DDPMPipeline
    from tqdm.auto import tqdm

    meta = read_meta(out_dir)
    if (
        meta is not None
        and meta.get("digest") == cfg.digest()
        and os.path.isfile(os.path.join(out_dir, "model_index.json"))
    ):
        return out_dir
    members, _ = split_digits(cfg.members, cfg.seed)
    data = digits_images(members, cfg.image_size, cfg.channels)
    unet, sched = build_unet(cfg), build_scheduler(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate)
    losses = []
    unet.train()
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="pixel DDPM", disable=not progress)
    for step in bar:
        x = data[torch.randint(0, len(data), (cfg.batch_size,), generator=g)]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (len(x),), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pixel-ddpm-", dir=parent)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp)
    with open(os.path.join(tmp, META_NAME), "w") as fh:
        json.dump(
            {
                "config": dataclasses.asdict(cfg),
                "digest": cfg.digest(),
                "member_indices": members.tolist(),
                "seconds": round(time.time() - t0, 1),
                "seconds_per_step": round((time.time() - t0) / max(cfg.steps, 1), 4),
                "loss_every_50": [round(float(np.mean(losses[i : i + 50])), 5) for i in range(0, len(losses), 50)],
            },
            fh,
            indent=1,
        )
    if os.path.isdir(out_dir):  # a model of another config: replace it, but never an unrelated folder
        if meta is None and os.listdir(out_dir):
            shutil.rmtree(tmp)
            raise MontrageError(
                f"{out_dir!r} exists and is not a pixel DDPM written by this recipe: pass a new folder."
            )
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


@torch.no_grad()
def sample_images(
    model_dir: str,
    n: int,
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int = 100,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """n generations (n, C, H, W) in [-1, 1], 8-bit quantised, of the pixel DDPM saved in `model_dir`.

    `sampler="ddpm"`: ancestral sampling on `steps` respaced timesteps (1000 = the full chain); "ddim": DDIM (η=0,
    which draws no noise). Deterministic for a seed.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    from montrage.data import quantize

    if sampler not in ("ddpm", "ddim"):
        raise MontrageError(f"sampler must be 'ddpm' or 'ddim', not {sampler!r}")
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval()
    train_sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    sched = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(train_sched.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size, ch = unet.config.sample_size, unet.config.in_channels
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"sampling ({sampler}, {steps} steps)", disable=not progress):
        x = torch.randn((min(batch_size, n - start), ch, size, size), generator=g)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
        out.append(x)
    return quantize(torch.cat(out))


def save_pngs(images: torch.Tensor, folder: str, prefix: str = "img") -> list[str]:
    """Write images in [-1, 1] as 8-bit PNGs (RGB, or L for one channel); returns the paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        path = os.path.join(folder, f"{prefix}_{i:05d}.png")
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--members", type=int, default=200)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=0, help="also write this many generations as PNGs")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--export-digits", action="store_true", help="also write members/ and external/ PNGs")
    args = p.parse_args(argv)
    cfg = PixelDDPMConfig(members=args.members, steps=args.steps, seed=args.seed)
    path = train_pixel_ddpm(args.out, cfg)
    print(path)
    if args.export_digits:
        members, rest = split_digits(cfg.members, cfg.seed)
        save_pngs(digits_images(members), os.path.join(args.out, "images", "member"), "member")
        save_pngs(digits_images(rest[: cfg.members]), os.path.join(args.out, "images", "external"), "external")
    if args.samples:
        imgs = sample_images(path, args.samples, seed=args.seed + 1, sampler=args.sampler, steps=args.sample_steps)
        save_pngs(imgs, os.path.join(args.out, "images", "generated"), "generated")


if __name__ == "__main__":
    main()
