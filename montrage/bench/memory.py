"""`montrage bench memory`: the Monitor's peak memory against the number of monitored images, side by side.

A folder of `--images` synthetic 256 px images (digits, upscaled, on coloured noise) is monitored by a random-weight
model with SD's VAE downsampling (x8: 32 x 32 latents); each size runs in its own process, which reports its peak RSS
(ru_maxrss) above the RSS it had before the Monitor was made, and the size of the latent cache. Memory O(batch)
means the larger run's peak exceeds the smaller's by at most its latent cache (memory-mapped pages count as RSS).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def write_images(root: str, n: int, size: int = 256) -> str:
    """n PNGs in root/<concept>/ (4 concepts): digits upsampled to `size` on seeded coloured noise."""
    import numpy as np
    from PIL import Image

    from montrage.data import sklearn_digits

    images, target = sklearn_digits()
    rng = np.random.default_rng(0)
    for k in range(n):
        folder = os.path.join(root, f"c{k % 4}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{k:05d}.png")
        if os.path.exists(path):
            continue
        digit = np.kron(images[k % len(images)] / 16.0, np.ones((size // 8, size // 8)))
        base = rng.integers(0, 90, (size, size, 3)).astype(np.float64)
        arr = np.clip(base + digit[..., None] * 200, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path)
    return root


def tiny_256_pipeline():
    """Random-weight SD-layout parts sized for 256 px: VAE downsampling x8, a small UNet on 32 x 32 latents."""
    from diffusers import StableDiffusionPipeline

    from montrage.recipes.tiny_base import TinyBaseConfig, build_components

    parts = build_components(TinyBaseConfig(image_size=256), vae_blocks=4, vae_channels=(8, 16, 16, 16))
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False).eval()
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def _variant(folder: str, monitored: int, workdir: str, snapshots: int) -> dict:
    import torch

    from montrage import Monitor

    torch.set_num_threads(int(os.environ.get("MONTRAGE_BENCH_THREADS", "2")))
    pipe = tiny_256_pipeline()
    from montrage.sources import image_source

    source = image_source(folder)
    before = _rss_mib()
    t0 = time.perf_counter()
    m = Monitor(
        os.path.join(workdir, f"store{monitored}.h5"),
        pipe,
        source,
        monitor_images=monitored,
        every_n_steps=1,
        probe_seeds=[0],
        num_inference_steps=2,
        guidance_scale=1.0,
        thumbnail_size=16,
        log_to_wandb=False,
        progress=False,
        overwrite=True,
        mode="inline",
    )
    m.start()
    for step in range(1, snapshots):
        m.maybe_snapshot(step)
    cache = m.latent_cache_bytes
    m.close()
    return {
        "monitored_images": monitored,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(_rss_mib(), 1),
        "monitor_peak_mib": round(_rss_mib() - before, 1),
        "latent_cache_mib": round(cache / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "snapshots": snapshots,
        "source_images": len(source),
    }


def run_memory(
    images: int = 4000, small: int = 500, snapshots: int = 2, out: str | None = None, workdir: str | None = None
) -> dict:
    """Peak monitor memory at `small` and `images` monitored images of one folder, each in its own process."""
    work = workdir or tempfile.mkdtemp(prefix="montrage-memory-")
    folder = write_images(os.path.join(work, "images"), images)
    runs = []
    for n in (small, images):
        proc = subprocess.run(
            [sys.executable, "-m", "montrage.bench.memory", "--variant", folder, str(n), work, str(snapshots)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory variant {n} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, b = runs
    bound = a["monitor_peak_mib"] + b["latent_cache_mib"]
    result = {
        "runs": runs,
        "resolution": 256,
        "bound_mib": round(bound, 1),
        "within_bound": b["monitor_peak_mib"] <= bound,
        "growth_mib": round(b["monitor_peak_mib"] - a["monitor_peak_mib"], 1),
        "command": f"montrage bench memory --images {images} --small {small}",
    }
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="montrage bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=4000, help="images in the folder, all monitored in the large run")
    p.add_argument("--small", type=int, default=500, help="monitored images in the small run")
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    print(json.dumps(run_memory(images=a.images, small=a.small, out=a.out), indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        print(json.dumps(_variant(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
    else:
        raise SystemExit(main())
