"""`montrage bench scale`: store bytes, fit time and memory, and query latency against the number of training images.

Stores beyond the digits are synthetic but shaped like a real deferred LoRA run at montrage's defaults: the tiny
base's real model and adapter layout (so queries encode for real), one layer of 128 features (what the default
projection stores for any layer) at 3 timesteps, 20 snapshots, 10 concepts and 20 probes; the features are
concept centres plus per-image offsets that drift over the snapshots, so compression and ranks behave as on real
data. Each fit runs in its own process (peak RSS is its own).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SNAPSHOTS, CONCEPTS, F, TIMESTEPS = 20, 10, 128, [200, 500, 800]


def synthetic_store(
    path: str, n: int, snapshots: int = SNAPSHOTS, seed: int = 0, block: int = 16384, base: str | None = None
) -> dict:
    """Write a store of n monitored images over the model at `base` (default: the tiny base); returns its facts."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from montrage.bench import synthetic_run
    from montrage.components import load_components, model_identity
    from montrage.data import TrainExample
    from montrage.probes import default_probes
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.store import StoreSpec, StoreWriter

    base = base or tiny_base_path()
    components = load_components(base)
    unet = components.unet
    targets = ["to_k", "to_out.0", "to_q", "to_v"]
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    lora = {k: v.detach().float() for k, v in get_peft_model_state_dict(unet).items()}
    concepts = [f"c{k}" for k in range(CONCEPTS)]
    train = [
        TrainExample(f"img/{i}", concepts[i % CONCEPTS], "a photo", f"sklearn:digits/{i % 1797}") for i in range(n)
    ]
    probes = default_probes({c: c for c in concepts}, "a photo of {token}", [0, 1], mixtures=False)
    T = len(TIMESTEPS)
    spec = StoreSpec(
        model=model_identity(unet, os.path.basename(base)),
        layers=["mid_block"],
        feature_dims={"mid_block": F},
        timesteps=TIMESTEPS,
        pooling="mean_max",
        probes=probes,
        train=train,
        thumbnail_size=16,
        lora_names=list(lora),
        lora_shapes=[list(v.shape) for v in lora.values()],
        config=synthetic_run(components, base, ["mid_block"], TIMESTEPS, "mean_max", targets),
    )
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CONCEPTS, T, F)).astype(np.float32)
    drift = rng.normal(size=(CONCEPTS, T, F)).astype(np.float32)
    flat = torch.cat([v.flatten() for v in lora.values()]).numpy()
    labels = np.arange(n) % CONCEPTS
    P = len(probes)
    primary = [concepts.index(c) for c in probes.primary_concepts()]
    t0 = time.perf_counter()
    w = StoreWriter(path, spec, overwrite=True)
    for e in range(snapshots):
        w.begin_epoch()
        for start in range(0, n, block):
            stop = min(n, start + block)
            r = np.random.default_rng([seed, e, start])
            offsets = np.random.default_rng([seed, start]).normal(size=(stop - start, T, F)).astype(np.float32)
            c = labels[start:stop]
            x = centres[c] + 0.05 * e * drift[c] + offsets + 0.3 * r.normal(size=offsets.shape).astype(np.float32)
            w.write_train_rows("mid_block", slice(start, stop), x)
        pf = centres[primary] + 0.05 * e * drift[primary] + rng.normal(size=(P, T, F)).astype(np.float32)
        w.commit_epoch(e, 100 * e, {"mid_block": pf}, np.zeros((P, 16, 16, 3), np.uint8), flat + 0.001 * e)
    w.close()
    from montrage.store import StoreReader

    with StoreReader(path) as s:
        feature_bytes = int(s.summary()["datasets"]["train/features/mid_block"]["bytes"])
    return {
        "write_seconds": time.perf_counter() - t0,
        "feature_bytes": feature_bytes,
        "file_bytes": os.path.getsize(path),
        "bytes_per_image_snapshot_layer": feature_bytes / (n * snapshots),
    }


def _fit(path: str, steps: int) -> dict:
    from montrage.attribution.fit import fit_attribution

    t = time.perf_counter()
    report = fit_attribution(path, steps=steps, probes="stored", progress=False)
    return {
        "fit_seconds": time.perf_counter() - t,
        "fit_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "index_seconds": report.get("index_seconds", 0.0),
    }


def _time(fn, repeats: int) -> float:
    """Median ms of `repeats` calls after a warm-up (page cache, lazy loads), as a long-lived service would see."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def run_scale(
    sizes=(1000, 10000, 100000), steps: int = 400, repeats: int = 15, out: str | None = None, workdir: str | None = None
) -> dict:
    import torch

    from montrage.attribution.query import Attributor

    torch.set_num_threads(int(os.environ.get("MONTRAGE_BENCH_THREADS", "2")))
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in sizes:
            path = os.path.join(tmp, f"store{n}.h5")
            facts = synthetic_store(path, n)
            proc = subprocess.run(
                [sys.executable, "-m", "montrage.bench.scale", "_fit", path, str(steps)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"fit failed:\n{proc.stderr[-3000:]}")
            fit = json.loads(proc.stdout.strip().splitlines()[-1])
            att = Attributor.from_store(path)
            E = att.store.num_epochs
            rng = np.random.default_rng(1)
            q1 = {"mid_block": rng.normal(size=(E, 1, len(TIMESTEPS), F)).astype(np.float32)}
            q100 = {"mid_block": rng.normal(size=(E, 100, len(TIMESTEPS), F)).astype(np.float32)}
            image = torch.rand(1, 3, 16, 16) * 2 - 1
            row = {
                "train_images": n,
                "snapshots": E,
                "layers": 1,
                "features": F,
                "timesteps": len(TIMESTEPS),
                "bytes_per_image_snapshot_layer": round(facts["bytes_per_image_snapshot_layer"], 1),
                "store_bytes": facts["file_bytes"],
                "exact": n <= len(att.index.reference),
                "query_ms_fast": round(_time(lambda: att.score_trajectories(q1, fast=True), repeats), 2),
                "query_ms_full": round(_time(lambda: att.score_trajectories(q1, fast=False), repeats), 2),
                "batch_query_ms_fast": round(_time(lambda: att.score_trajectories(q100, fast=True), 1) / 100, 2),
                "batch_query_ms_full": round(_time(lambda: att.score_trajectories(q100, fast=False), 1) / 100, 2),
                "query_ms_fast_with_encode": round(_time(lambda: att.query(image, fast=True), repeats), 1),
                "query_ms_full_with_encode": round(_time(lambda: att.query(image, fast=False), repeats), 1),
                "fit_seconds": round(fit["fit_seconds"], 1),
                "fit_index_seconds": round(fit["index_seconds"], 1),
                "fit_peak_rss_mib": round(fit["fit_peak_rss_mib"], 1),
            }
            final = {"mid_block": q1["mid_block"][-1]}
            row["shortlist_search_ms"] = round(_time(lambda: att.index.shortlist(final, att.centre, 1000), repeats), 2)
            idx = os.path.join(att.model_dir, "index")
            row["index_bytes"] = sum(os.path.getsize(os.path.join(idx, f)) for f in os.listdir(idx))
            pixels = torch.rand(64, 3, 16, 16) * 2 - 1
            t = time.perf_counter()
            att.model.trajectory(pixels, list(range(64)), [E - 1])
            row["encode_images_per_s"] = round(64 / (time.perf_counter() - t), 1)  # one snapshot, tiny base, CPU
            att.close()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            import shutil

            os.remove(path)
            shutil.rmtree(att.model_dir, ignore_errors=True)
    result = {
        "command": f"montrage bench scale --sizes {','.join(map(str, sizes))}",
        "rows": rows,
        "extrapolation_1m": extrapolate(rows),
    }
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def extrapolate(rows: list[dict], n: int = 1_000_000) -> dict | None:
    """On paper, from the largest indexed size: bytes grow linearly; the fit's index build and statistics pass grow
    linearly while its optimizer steps do not; a query's shortlist search grows linearly, its rerank does not."""
    big = [r for r in rows if not r.get("exact")]
    if not big:
        return None
    r = big[-1]
    k = n / r["train_images"]
    steps = r["fit_seconds"] - r["fit_index_seconds"]
    return {
        "train_images": n,
        "store_gb": round(r["store_bytes"] * k / 1e9, 1),
        "index_gb": round(r["index_bytes"] * k / 1e9, 1),
        "fit_seconds_upper": round(r["fit_index_seconds"] * k + steps * k, 0),
        "fit_seconds_if_steps_constant": round(r["fit_index_seconds"] * k + steps, 0),
        "query_ms_fast": round(r["query_ms_fast"] + r["shortlist_search_ms"] * (k - 1), 1),
        "query_ms_full": round(r["query_ms_full"] + r["shortlist_search_ms"] * (k - 1), 1),
        "index_nn_mib_in_memory": round(n * 4 * r["features"] * r["timesteps"] * r["layers"] / 2**20, 0),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="montrage bench scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes", default="1000,10000,100000", help="training-set sizes (synthetic stores), comma-separated"
    )
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    print(json.dumps(run_scale(tuple(int(n) for n in a.sizes.split(",")), out=a.out), indent=1))
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_fit":
    print(json.dumps(_fit(sys.argv[2], int(sys.argv[3]))))
if __name__ == "__main__" and (len(sys.argv) < 2 or not sys.argv[1].startswith("_")):
    raise SystemExit(main())
