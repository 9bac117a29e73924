"""Per-seed benchmark results: seeds parsed from `--seed 0,1,2` or `0-2`, each seed's result cached by its
config, means and stds."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from montrage.errors import MontrageError


def parse_seeds(text) -> list[int]:
    """'0,1,2' or '0-2' (or an int) -> [0, 1, 2]."""
    if isinstance(text, int):
        return [text]
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                seeds.extend(range(int(a), int(b) + 1))
            else:
                seeds.append(int(part))
        except ValueError as err:
            raise MontrageError(f"--seed takes integers like 0 or 0,1,2 or 0-2, not {text!r}.") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise MontrageError(f"--seed needs distinct seeds, got {text!r}.")
    return seeds


# --- seeds: cache, aggregate ------------------------------------------------------------------------------------------
def cached(path: str, key: dict, compute) -> dict:
    """The result stored at `path` when it was computed for the same `key`, else `compute()` (then stored)."""
    if os.path.isfile(path):
        with open(path) as fh:
            stored = json.load(fh)
        if stored.get("cache_key") == key:
            return stored["result"]
    result = compute()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"cache_key": key, "result": result}, fh)
    os.replace(tmp, path)
    return result


def cached_seeds(name: str, seeds, workdir: str, version: str, compute, **kwargs) -> list[dict]:
    """`compute(seed, **kwargs)` for every seed, each cached in `workdir` by its arguments (a config object with a
    `digest` stands for itself)."""
    runs = []
    for seed in seeds:
        key = {
            "seed": seed,
            "version": version,
            **{
                k: v.digest() if hasattr(v, "digest") else list(v) if isinstance(v, tuple) else v
                for k, v in kwargs.items()
            },
        }
        runs.append(cached(key_path(workdir, name, seed, key), key, lambda: compute(seed, **kwargs)))
    return runs


def seed_runs(name: str, out: str, seeds, workdir: str | None, version: str, compute, threads=None, **kwargs):
    """A benchmark's seeds: on `threads` torch threads, each `compute(seed, workdir, **kwargs)` cached in `workdir`
    (default: beside `out`)."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    workdir = workdir or os.path.splitext(out)[0] + "_work"
    return cached_seeds(name, seeds, workdir, version, lambda seed, **kw: compute(seed, workdir, **kw), **kwargs)


def key_path(workdir: str, half: str, seed: int, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(workdir, f"result-{half}-seed{seed}-{digest}.json")


def mean_std(values) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(np.nanmean(arr)), float(np.nanstd(arr))
