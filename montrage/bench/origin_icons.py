"""The origin benchmark's LoRA half on human-made artwork: icon themes, each image with its own caption.

Per seed: the art base (pre-trained on themes of other families, `montrage.bench.attribution_setup.prepare_dataset`) is
LoRA-customized on `per_theme` icons of each of `themes` (captions "an icon of a <content> in the style of
<token>"), monitored by MontrageCallback (deferred: adapter snapshots). Members: those icons. Generated: one
generation per member caption. External: held-out icons of the same themes (half as many as the members; the
same-distribution split, `member_vs_external`) and as many icons of `shifted_themes`, styles neither the base nor
the LoRA saw. Every image keeps its natural caption for CLiD. Scored exactly as the digits LoRA half
(`montrage.bench.origin_eval.evaluate`: methods, member_vs_rest, membership, member_vs_external, claims).

Run: `montrage bench origin-icons --seed 0,1,2 --out origin_icons.json` (icon themes installed,
see docs/results.md, "Real artwork").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import torch

from montrage.bench.origin_eval import aggregate, evaluate, extract_features, throughput, window_grids
from montrage.bench.origin_lora import LoraBenchConfig, fine_tune_with_store
from montrage.bench.seeds import parse_seeds, seed_runs
from montrage.errors import MontrageError

THEMES = ("Tango", "oxygen", "breeze", "Papirus")  # customized (theme set A's first four)
SHIFTED = ("elementary", "Adwaita")  # set A's other two: external styles
CACHE_VERSION = "v1"


def icon_split(themes, shifted_themes, per_theme: int, seed: int, root: str, icons_dir: str | None):
    """Members, held-out (same themes) and shifted (other themes) examples, rasterized under `root`."""
    from montrage.recipes import icons

    icons_dir = icons_dir or icons.ICONS_DIR
    half = per_theme // 2
    own = icons.build_icon_set(
        list(themes),
        os.path.join(root, "themes"),
        icons_per_theme=per_theme + half,
        icons_dir=icons_dir,
        seed=seed,
        shared=False,
    )
    rng = np.random.default_rng(seed)
    members, held = [], []
    for t in themes:
        rows = [e for e in own if e.concept == t]
        if len(rows) < per_theme + half:
            raise MontrageError(
                f"icon theme {t!r} has {len(rows)} usable icons; --per-theme must be at most {2 * len(rows) // 3}."
            )
        order = rng.permutation(len(rows))
        members += [rows[i] for i in order[:per_theme]]
        held += [rows[i] for i in order[per_theme : per_theme + half]]
    per_shifted = -(-len(held) // len(shifted_themes))
    other = icons.build_icon_set(
        list(shifted_themes),
        os.path.join(root, "shifted"),
        icons_per_theme=per_shifted,
        icons_dir=icons_dir,
        seed=seed,
        shared=False,
    )
    return members, held, other[: len(held)]


def icons_lora_seed(
    seed: int,
    workdir: str,
    themes=THEMES,
    shifted_themes=SHIFTED,
    per_theme: int = 16,
    epochs: int = 6,
    repeats: int = 40,
    learning_rate: float = 1e-2,
    rank: int = 8,
    timesteps: int = 20,
    gen_steps: int = 25,
    guidance: float = 3.0,
    windows: int = 4,
    batch_size: int = 64,
    C: float = 1.0,
    draws: int = 1,
    icons_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """One seed of the icons LoRA half: customize (or reuse), generate from the member captions, extract, evaluate."""
    from montrage.bench.attribution_setup import prepare_dataset
    from montrage.data import quantize, read_example
    from montrage.generate import build_pipeline, generate_probes
    from montrage.origin.feature_set import default_timesteps
    from montrage.origin.from_store import store_diffusion_model
    from montrage.probes import ProbeSet
    from montrage.recipes import icons

    themes, shifted_themes = list(themes), list(shifted_themes)
    prepared = prepare_dataset("icons", [], themes + shifted_themes, None, icons_dir, per_theme, progress)
    base = prepared["base"]
    cfg = LoraBenchConfig((), per_theme, epochs, repeats, learning_rate, rank, seed)
    key = json.dumps(
        {"cfg": dataclasses.asdict(cfg), "themes": themes, "shifted": shifted_themes, "base": base}, sort_keys=True
    )
    out = os.path.join(workdir, "lora-icons-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    members, held, shifted = icon_split(
        themes, shifted_themes, per_theme, seed, os.path.join(out, "data"), prepared["icons_dir"]
    )
    t = time.time()
    weights, store = fine_tune_with_store(
        members, {th: icons.theme_token(th) for th in themes}, base, out, cfg, resolution=icons.SIZE, progress=progress
    )
    seconds = {"fine_tune": time.time() - t}
    model = store_diffusion_model(store)
    size = model.image_size
    t = time.time()
    prompts = tuple(e.caption for e in members)
    probes = ProbeSet(prompts, tuple({} for _ in prompts), (10_000 + 1000 * seed,))
    pipe = build_pipeline(model.tokenizer, model.text_encoder, model.vae, model.unet, model.scheduler)
    with torch.no_grad():
        generated = quantize(generate_probes(pipe, probes, size, gen_steps, guidance, batch_size=64))
    seconds["generate"] = time.time() - t

    def read(examples):
        return torch.stack([read_example(e, size) for e in examples])

    images = {"member": read(members), "generated": generated, "external": read(held + shifted)}
    pixels = torch.cat([images[o] for o in ("member", "generated", "external")])
    labels = np.concatenate([[o] * len(images[o]) for o in ("member", "generated", "external")])
    sources = np.concatenate(
        [
            labels[: len(members) + len(generated)],
            ["external:held-out"] * len(held),
            ["external:shifted"] * len(shifted),
        ]
    )
    natural = [e.caption for e in members] + list(prompts) + [e.caption for e in held + shifted]
    T = int(model.scheduler.config.num_train_timesteps)
    grid, wgrids = default_timesteps(T, timesteps), window_grids(T, timesteps, windows)
    sets, secs = extract_features(model, pixels, grid, wgrids, draws, batch_size, progress, None, clid_captions=natural)
    seconds.update({f"features_{k}": v for k, v in secs.items()})
    result = evaluate(sets, pixels, labels, sources, grid, wgrids, seed, C)
    result["throughput"] = throughput(
        len(pixels), grid, draws, secs["trajectory"], ", ".join(sets["trajectory"].spec.families)
    )
    result["config"] = {
        **dataclasses.asdict(cfg),
        "themes": themes,
        "shifted_themes": shifted_themes,
        "pool": prepared["pool"],
        "base": base,
        "timesteps": grid,
        "draws": draws,
        "windows": wgrids,
        "generation": {
            "prompts": "one per member caption",
            "sampler": "ddim",
            "steps": gen_steps,
            "guidance_scale": guidance,
        },
        "condition": "empty prompt (CLiD: each image's own caption)",
        "batch_size": batch_size,
        "C": C,
        "external": f"{len(held)} held-out icons of the themes + {len(shifted)} icons of {', '.join(shifted_themes)}",
    }
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return result


def run(
    out: str, seeds, workdir: str | None = None, threads: int | None = None, progress: bool = True, **kwargs
) -> dict:
    """Every seed (cached in `workdir`), aggregated as the digits halves are; writes `out`."""
    t = time.time()

    def compute(seed, workdir, **kw):  # progress is not part of a seed's cache key
        return icons_lora_seed(seed, workdir, progress=progress, **kw)

    runs = seed_runs("icons", out, seeds, workdir, CACHE_VERSION, compute, threads, **kwargs)
    result = aggregate(runs)
    result["per_seed"] = {str(s): r for s, r in zip(seeds, runs)}
    result["config"] = {
        **{k: v for k, v in runs[0]["config"].items() if k != "seed"},
        "seeds": list(seeds),
        "test_per_class": runs[0]["test_per_class"],
        "train_per_class": runs[0]["train_per_class"],
        "torch_threads": torch.get_num_threads(),
    }
    result["seconds"] = {"total_this_run": round(time.time() - t, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"lora": result}, fh, indent=1)
    return {"lora": result}


def main(argv: list[str] | None = None) -> None:
    from montrage.bench.origin import format_table

    p = argparse.ArgumentParser(
        prog="montrage bench origin-icons", description="origin benchmark, LoRA half on icon themes (art base)"
    )
    p.add_argument("--out", default="origin_icons.json")
    p.add_argument("--seed", default="0")
    p.add_argument("--themes", default=",".join(THEMES), help="customized themes (the members' styles)")
    p.add_argument("--shifted-themes", default=",".join(SHIFTED), help="themes of the shifted external images")
    p.add_argument("--per-theme", type=int, default=16, help="member icons per theme")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--timesteps", type=int, default=20)
    p.add_argument("--icons-dir", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    result = run(
        a.out,
        parse_seeds(a.seed),
        workdir=a.workdir,
        threads=a.threads,
        progress=not a.quiet,
        themes=tuple(t for t in a.themes.split(",") if t),
        per_theme=a.per_theme,
        shifted_themes=tuple(t for t in a.shifted_themes.split(",") if t),
        epochs=a.epochs,
        repeats=a.repeats,
        timesteps=a.timesteps,
        icons_dir=a.icons_dir,
    )
    print(format_table(result))


if __name__ == "__main__":
    main()
