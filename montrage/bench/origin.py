"""Origin-attribution benchmark: trajectory classifier vs the paper's baselines, on two models, over seeds.

Two halves, each scored on a per-class half split (train / test) of member / generated / external images:

  pixel  (the default benchmark) `recipes/pixel_ddpm.py` trained on `members` digits (cached by config), as many of
         its generations, and as many external images: half held-out digits, half a shifted set (held-out digits
         rotated by 90°, a distribution the model never saw).
  lora   the tiny latent text-to-image base, pre-trained without half of every digit (`LORA_HOLDOUT`),
         LoRA-customized with `DiffusionFineTune` on `lora_per_concept` of those digits for each of `lora_concepts`
         (the members), generations of the customized model from the concept prompts, and external images (held-out
         digits of the same concepts, also new to the base, and rotated ones). Features under base + LoRA with the empty prompt, ∇θ = the LoRA; the
         fine-tune runs with MontrageCallback (deferred: adapter snapshots only) and the model is rebuilt from its
         store, as `montrage origin fit STORE` does.

Reported per half (one block each), every figure as the mean over seeds with its std (population, ddof 0):
  methods         ternary member / generated / external (one-vs-rest, member and generated positive, averaged;
                  balanced accuracy of the predicted class): trajectory (montrage's classifier: every default
                  feature family, C by cross-validation), trajectory_paper (the paper's loss + ‖∇x L‖² + ‖∇θ L‖²,
                  C fixed), ablations between the two (trajectory_paper_cv, trajectory_no_pia, trajectory_no_ref),
                  trajectory_loss (loss only), pia_trajectory (loss with PIA's noise), gsa (per-tensor gradient
                  norms), pixels (model-blind); loss_threshold and pia (single-t threshold attacks, t and τ fit on
                  train members vs external) scored as member-vs-rest; in the LoRA half also clid (the same rule on
                  CLiD's caption-minus-null/perturbed loss, each image under its natural caption),
                  trajectory_clid (montrage's classifier with CLiD's families added), snapshot_loss (the training
                  trajectory: the loss under the adapter of every stored epoch, read from the run's store) and
                  trajectory_snapshots (montrage's classifier with it added).
  member_vs_rest  the same-task comparison: every trained method's ternary classifier scored by its member probability
                  (predicted member = argmax) against the threshold attacks with t and τ fit on members vs rest,
                  all on the full test split.
  membership      member vs external only (the paper's Table 2 setting; probes trained on those two classes).
  member_vs_external  member vs held-out images of the members' own distribution only (the shifted set left out):
                  the split a user asks about, where pixels cannot help.
  claims          (a) generated images are flagged as members by loss thresholding more often than members are;
                  (b) loss features spread over the whole trajectory beat every contiguous window of the same size
                  ("Goldilocks" ablation, Table 3); (c) gradient features add over loss-only features (the paper's
                  features, trajectory_paper vs trajectory_loss); and the
                  acceptance check: trajectory vs loss_threshold and pia on AUC and TPR@1%FPR, as the issue states
                  it (ternary vs member-vs-rest) and on the same task (member_vs_rest).
  model_attribution  (pixel, with --attribution) a second model B of the same recipe: generations of A / of B /
                  external, told apart from the features under both models (ModelAttributor) and by the lowest-loss
                  rule.

Each seed's result is cached in `<out>_work/` by its config, so a later run with more seeds only computes the new
ones. Run: `montrage bench origin --seed 0,1,2 --out origin_results.json` (= `montrage bench origin`;
2 CPU cores: per seed ≈ 6 min to train the pixel DDPM, ≈ 1.5 min to fine-tune the LoRA, then 5-10 min of sampling and
features). Smoke: `--members 24 --steps 30 --timesteps 4 --sample-steps 10 --lora-per-concept 6 --lora-epochs 1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from montrage.bench.origin_eval import (
    BLOCKS,
    METRIC_KEYS,
    ORIGINS,
    aggregate,
    class_split,
    evaluate,
    extract_features,
    shifted_digits,
    throughput,
    window_grids,
)
from montrage.bench.origin_lora import LORA_HOLDOUT, LORA_PROMPTS, lora_seed
from montrage.bench.seeds import cached, key_path, parse_seeds
from montrage.errors import MontrageError

CACHE_VERSION = "v6"  # v6: the trajectory_gsa row


# --- the pixel-DDPM half ----------------------------------------------------------------------------------------------
def pixel_seed(
    seed: int,
    workdir: str,
    members: int = 200,
    timesteps: int = 20,
    steps: int = 1000,
    sampler: str = "ddpm",
    sample_steps: int = 100,
    windows: int = 4,
    batch_size: int = 64,
    C: float = 1.0,
    draws: int = 1,
    attribution: bool = False,
    progress: bool = True,
) -> dict:
    """One seed of the pixel half: train (or reuse) the DDPM, sample, extract, evaluate."""
    from montrage.origin.feature_set import default_timesteps
    from montrage.origin.model import load_diffusion_model
    from montrage.recipes.pixel_ddpm import (
        PixelDDPMConfig,
        digits_images,
        sample_images,
        split_digits,
        train_pixel_ddpm,
    )

    cfg = PixelDDPMConfig(members=members, steps=steps, seed=seed)
    t = time.time()
    model_dir = train_pixel_ddpm(os.path.join(workdir, f"pixel-ddpm-{cfg.digest()}"), cfg, progress=progress)
    seconds = {"train": time.time() - t}
    member_idx, rest = split_digits(members, seed)
    t = time.time()
    generated = sample_images(
        model_dir, members, seed=seed + 1000, sampler=sampler, steps=sample_steps, progress=progress
    )
    seconds["sample"] = time.time() - t
    n_held = members - members // 2
    external = torch.cat([digits_images(rest[:n_held]), shifted_digits(rest[n_held:members])])
    images = {"member": digits_images(member_idx), "generated": generated, "external": external}
    pixels = torch.cat([images[o] for o in ORIGINS])
    labels = np.concatenate([[o] * len(images[o]) for o in ORIGINS])
    sources = np.concatenate(
        [labels[: 2 * members], ["external:held-out"] * n_held, ["external:shifted"] * (members - n_held)]
    )
    model = load_diffusion_model(model_dir)
    T = int(model.scheduler.config.num_train_timesteps)
    grid = default_timesteps(T, timesteps)
    wgrids = window_grids(T, timesteps, windows)
    sets, secs = extract_features(model, pixels, grid, wgrids, draws, batch_size, progress)
    seconds.update({f"features_{k}": v for k, v in secs.items()})
    result = evaluate(sets, pixels, labels, sources, grid, wgrids, seed, C)
    if attribution:
        t = time.time()
        result["model_attribution"] = _model_attribution(
            model, sets["trajectory"], images, labels, cfg, workdir, sampler, sample_steps, batch_size, C, progress
        )
        seconds["model_attribution"] = time.time() - t
    result["throughput"] = throughput(
        len(pixels),
        grid,
        draws,
        secs["trajectory"],
        f"{', '.join(sets['trajectory'].spec.families)} (θ = all UNet parameters, per-tensor norms kept)",
    )
    result["config"] = {
        "members": members,
        "seed": seed,
        "timesteps": grid,
        "draws": draws,
        "steps": steps,
        "sampler": sampler,
        "sample_steps": sample_steps,
        "windows": wgrids,
        "batch_size": batch_size,
        "C": C,
        "model": model_dir,
        "external": f"{n_held} held-out digits + {members - n_held} held-out digits rotated by 90°",
    }
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["_figure_data"] = {
        "timesteps": grid,
        "labels": labels.tolist(),
        "log_loss": np.log(sets["trajectory"].values["loss"]).round(5).tolist(),
    }
    return result


def run_origin_bench(
    out: str,
    seeds=(0,),
    members: int = 200,
    timesteps: int = 20,
    steps: int = 1000,
    sampler: str = "ddpm",
    sample_steps: int = 100,
    windows: int = 4,
    batch_size: int = 64,
    C: float = 1.0,
    draws: int = 1,
    workdir: str | None = None,
    threads: int | None = None,
    attribution: bool = False,
    lora: bool = True,
    lora_concepts=(1, 4, 7, 9),
    lora_per_concept: int = 32,
    lora_epochs: int = 6,
    lora_repeats: int = 25,
    lora_gen_steps: int = 25,
    lora_prompt: str = "empty",
    pixel: bool = True,
    progress: bool = True,
) -> dict:
    """Run the benchmark for every seed (each cached in `workdir`), aggregate, write `out` (JSON) and a figure
    next to it (`.png`), and return the result. `pixel=False` runs only the LoRA half (its block is then `lora`,
    the top level holds no pixel figures)."""
    if not (pixel or lora):
        raise MontrageError("both halves are off: drop --no-pixel or --no-lora.")
    if lora_prompt not in LORA_PROMPTS:
        raise MontrageError(f"lora_prompt must be one of {LORA_PROMPTS}, not {lora_prompt!r}.")
    if threads:
        torch.set_num_threads(int(threads))
    seeds = parse_seeds(",".join(str(s) for s in seeds) if not isinstance(seeds, (str, int)) else seeds)
    t_start = time.time()
    workdir = workdir or os.path.splitext(out)[0] + "_work"
    pixel_args = dict(
        members=members,
        timesteps=timesteps,
        steps=steps,
        sampler=sampler,
        sample_steps=sample_steps,
        windows=windows,
        batch_size=batch_size,
        C=C,
        draws=draws,
        attribution=attribution,
    )
    lora_args = dict(
        concepts=tuple(int(c) for c in lora_concepts),
        per_concept=lora_per_concept,
        epochs=lora_epochs,
        repeats=lora_repeats,
        timesteps=timesteps,
        gen_steps=lora_gen_steps,
        windows=windows,
        batch_size=batch_size,
        C=C,
        draws=draws,
    )
    if lora_prompt != "empty":  # only then part of the cache key, so the empty-prompt results stay cached
        lora_args["prompt"] = lora_prompt
    pixel_runs, lora_runs = [], []
    for seed in seeds:
        if pixel:
            key = {"half": "pixel", "seed": seed, **pixel_args, "version": CACHE_VERSION}
            pixel_runs.append(
                cached(
                    key_path(workdir, "pixel", seed, key),
                    key,
                    lambda: pixel_seed(seed, workdir, progress=progress, **pixel_args),
                )
            )
            if progress:
                print(f"seed {seed} pixel: done")
        if lora:
            key = {
                "half": "lora",
                "seed": seed,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in lora_args.items()},
                "base_holdout": LORA_HOLDOUT,
                "version": CACHE_VERSION,
            }
            lora_runs.append(
                cached(
                    key_path(workdir, "lora", seed, key),
                    key,
                    lambda: lora_seed(seed, workdir, progress=progress, **lora_args),
                )
            )
            if progress:
                print(f"seed {seed} lora: done")
    figure_data = pixel_runs[0].get("_figure_data") if pixel_runs else None
    for r in pixel_runs:
        r.pop("_figure_data", None)
    result = {}
    if pixel:
        result = aggregate(pixel_runs)
        result["per_seed"] = {str(s): r for s, r in zip(seeds, pixel_runs)}
        config = {k: v for k, v in pixel_runs[0]["config"].items() if k not in ("seed", "model")}
        result["config"] = {
            **config,
            "seeds": seeds,
            "test_per_class": pixel_runs[0]["test_per_class"],
            "train_per_class": pixel_runs[0]["train_per_class"],
            "std": "population (ddof 0) over seeds",
            "classifier": "z-scored log features + L2 logistic regression (sklearn lbfgs)",
        }
    if lora:
        result["lora"] = aggregate(lora_runs)
        result["lora"]["per_seed"] = {str(s): r for s, r in zip(seeds, lora_runs)}
        config = {k: v for k, v in lora_runs[0]["config"].items() if k not in ("seed", "lora")}
        result["lora"]["config"] = {
            **config,
            "seeds": seeds,
            "test_per_class": lora_runs[0]["test_per_class"],
            "train_per_class": lora_runs[0]["train_per_class"],
        }
    result["seconds"] = {"total_this_run": round(time.time() - t_start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        if figure_data:
            result["figure"] = _figure(os.path.splitext(out)[0] + ".png", figure_data, result)
    except Exception as err:  # a figure is a convenience; never lose the numbers over it
        result["figure"] = f"not written: {err}"
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    if progress:
        print(format_table(result))
    return result


def _model_attribution(
    model_a, full, images, labels, cfg, workdir, sampler, sample_steps, batch_size, C, progress
) -> dict:
    """Generations of model A, of model B (same recipe, seed + 1, other members) and external digits, scored under
    both models; a ModelAttributor (classes A, B, external) and the training-free lowest-loss rule."""
    from montrage.origin.feature_set import concat_feature_sets
    from montrage.origin.features import trajectory_features
    from montrage.origin.metrics import balanced_accuracy
    from montrage.origin.model import load_diffusion_model
    from montrage.origin.model_attribution import ModelAttributor, lowest_loss_attribution
    from montrage.recipes.pixel_ddpm import sample_images, train_pixel_ddpm

    cfg_b = dataclasses.replace(cfg, seed=cfg.seed + 1)
    dir_b = train_pixel_ddpm(os.path.join(workdir, f"pixel-ddpm-{cfg_b.digest()}"), cfg_b, progress=progress)
    model_b = load_diffusion_model(dir_b)
    gen_b = sample_images(
        dir_b, cfg.members, seed=cfg.seed + 2000, sampler=sampler, steps=sample_steps, progress=progress
    )
    under_a = concat_feature_sets(
        [
            full.subset(labels == "generated"),
            trajectory_features(model_a, gen_b, full.spec, batch_size=batch_size, progress=progress),
            full.subset(labels == "external"),
        ]
    )
    pixels = torch.cat([images["generated"], gen_b, images["external"]])
    under_b = trajectory_features(model_b, pixels, full.spec, batch_size=batch_size, progress=progress)
    y = np.concatenate([["A"] * len(images["generated"]), ["B"] * len(gen_b), ["external"] * len(images["external"])])
    tr, te = class_split(y, cfg.seed, ("A", "B", "external"), offset=100)
    att = ModelAttributor(["A", "B"], C=C).fit([under_a.subset(tr), under_b.subset(tr)], y[tr])
    pred = att.predict([under_a.subset(te), under_b.subset(te)])
    gen = np.isin(y[te], ("A", "B"))
    lowest = np.asarray(["A", "B"])[lowest_loss_attribution([under_a.subset(te), under_b.subset(te)])]
    return {
        "accuracy_per_source": {c: float(np.mean(pred[y[te] == c] == c)) for c in ("A", "B", "external")},
        "balanced_accuracy": balanced_accuracy(y[te], pred),
        "lowest_loss_accuracy_on_generations": float(np.mean(lowest[gen] == y[te][gen])),
        "test_per_class": int(len(te) // 3),
    }


def _figure(path: str, data: dict, result: dict) -> str:
    """Left: log loss along the trajectory by origin (first seed, pixel half); right: ternary AUC and balanced
    accuracy of every method, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ts = np.asarray(data["timesteps"])
    logl = np.asarray(data["log_loss"])
    labels = np.asarray(data["labels"])
    centre = logl.mean(axis=0)  # per-t mean over all images: the classes' differences are what matters
    for o in ORIGINS:
        d = logl[labels == o] - centre
        sem = d.std(0) / np.sqrt(len(d))
        ax[0].plot(ts, d.mean(0), label=o)
        ax[0].fill_between(ts, d.mean(0) - 2 * sem, d.mean(0) + 2 * sem, alpha=0.2)
    ax[0].axhline(0, color="grey", lw=0.5)
    ax[0].set(
        xlabel="timestep t",
        ylabel="log L_t minus its mean over all images (± 2 s.e.)",
        title="pixel DDPM: loss along the trajectory, by origin",
    )
    ax[0].legend()
    names = list(result["methods"])
    x = np.arange(len(names))
    for k, key in enumerate(("auc", "balanced_accuracy")):
        ax[1].bar(
            x + 0.4 * k - 0.2,
            [result["methods"][m][key] for m in names],
            width=0.4,
            label=key,
            yerr=[result["methods"][m]["std"][key] for m in names],
            capsize=2,
        )
    ax[1].set_xticks(x, names, rotation=30, ha="right")
    ax[1].set(
        ylim=(0, 1.15),
        title=f"pixel DDPM, {len(result['config']['seeds'])} seeds (ternary; thresholds: member vs rest)",
    )
    ax[1].legend(loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(result: dict) -> str:
    """Every block of both halves as `mean ± std`, then the claims."""
    lines = []
    halves = ([("pixel DDPM", result)] if result.get("per_seed") else []) + (
        [("LoRA-customized tiny text-to-image", result["lora"])] if result.get("lora") else []
    )
    for title, half in halves:
        lines.append(f"== {title} ({len(half['per_seed'])} seeds) ==")
        lines.append(f"{'method [block]':34s} {'task':19s}" + "".join(f"{k:>19s}" for k in METRIC_KEYS))
        for block in BLOCKS:
            for name, r in half[block].items():
                label = name if block == "methods" else f"{name} [{block}]"
                lines.append(
                    f"{label:34s} {r['task']:19s}" + "".join(f"{r[k]:11.3f} ± {r['std'][k]:.3f}" for k in METRIC_KEYS)
                )
        c = half["claims"]
        a, b = c["a_generated_flagged_more_than_members"], c["b_whole_trajectory_beats_windows"]
        rates = {o: round(v["mean"], 3) for o, v in a["flagged_as_member"].items()}
        lines.append(f"(a) generated flagged more than members: {a['holds']} ({a['holds_in_seeds']} seeds) {rates}")
        lines.append(
            f"(b) whole trajectory beats every window: {b['holds']} ({b['holds_in_seeds']} seeds; uniform "
            f"{b['uniform']['membership_auc']['mean']:.3f}, windows "
            + ", ".join(f"{k} {v['membership_auc']['mean']:.3f}" for k, v in b["windows"].items())
            + ")"
        )
        cc = c["c_gradients_add_over_loss"]
        lines.append(
            f"(c) gradients add over loss: {cc['holds']} ({cc['holds_in_seeds']} seeds; ternary AUC "
            f"{cc['auc_ternary']['loss_only'][0]:.3f} -> {cc['auc_ternary']['all_features'][0]:.3f})"
        )
        acc = c["acceptance_trajectory_beats_thresholds"]
        lines.append(
            f"acceptance, trajectory beats loss_threshold and pia on AUC and TPR@1%FPR: as stated "
            f"{acc['as_stated']['holds']}, same task {acc['same_task']['holds']} "
            f"({acc['holds_in_seeds']} seeds both)"
        )
        if half.get("model_attribution"):
            m = half["model_attribution"]
            lines.append(
                f"model attribution (A / B / external): balanced accuracy "
                f"{m['balanced_accuracy']['mean']:.3f} ± {m['balanced_accuracy']['std']:.3f}"
            )
        tp = half["throughput"]
        lines.append(
            f"feature extraction: {tp['images_per_second']:.2f} images/s ({tp['timesteps']} timesteps x "
            f"{tp['draws']} draws, {tp['features']}, {tp['torch_threads']} torch threads)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="montrage bench origin",
        description="origin-attribution benchmark: pixel DDPM and LoRA-customized tiny "
        "text-to-image model on digits, over seeds",
    )
    p.add_argument("--out", default="origin_results.json")
    p.add_argument("--seed", default="0", help="seed, or several (0,1,2 or 0-2): mean ± std over them")
    p.add_argument("--members", type=int, default=200, help="pixel: member digits the DDPM trains on")
    p.add_argument("--timesteps", type=int, default=20)
    p.add_argument("--draws", type=int, default=1, help="ε draws per (image, t), features averaged")
    p.add_argument("--steps", type=int, default=1000, help="pixel: DDPM training steps (batch 128)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--C",
        type=float,
        default=1.0,
        help="fixed C of the paper-recipe probes and baselines "
        "(montrage's `trajectory` chooses its own by cross-validation)",
    )
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA-customized half")
    p.add_argument("--no-pixel", action="store_true", help="skip the pixel-DDPM half (run only the LoRA half)")
    p.add_argument(
        "--lora-prompt",
        default="empty",
        choices=list(LORA_PROMPTS),
        help="text condition of the LoRA half's features (every model-based method): the empty prompt, "
        "or each image's caption 'a photo of <word>' (training caption / generation prompt / the "
        "external digit's concept caption)",
    )
    p.add_argument("--lora-concepts", default="1,4,7,9")
    p.add_argument("--lora-per-concept", type=int, default=32, help="LoRA members per concept")
    p.add_argument("--lora-epochs", type=int, default=6)
    p.add_argument("--lora-repeats", type=int, default=25, help="passes over the members per epoch")
    p.add_argument("--lora-gen-steps", type=int, default=25, help="DDIM steps of the LoRA generations")
    p.add_argument("--workdir", default=None, help="models and per-seed results cache (default: <out>_work/)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--attribution", action="store_true", help="also train a second model and score model attribution")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    result = run_origin_bench(
        args.out,
        seeds=parse_seeds(args.seed),
        members=args.members,
        timesteps=args.timesteps,
        steps=args.steps,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        windows=args.windows,
        batch_size=args.batch_size,
        C=args.C,
        draws=args.draws,
        workdir=args.workdir,
        threads=args.threads,
        attribution=args.attribution,
        lora=not args.no_lora,
        lora_concepts=[int(c) for c in args.lora_concepts.split(",")],
        lora_per_concept=args.lora_per_concept,
        lora_epochs=args.lora_epochs,
        lora_repeats=args.lora_repeats,
        lora_gen_steps=args.lora_gen_steps,
        lora_prompt=args.lora_prompt,
        pixel=not args.no_pixel,
        progress=not args.quiet,
    )
    if args.quiet:
        print(format_table(result))


if __name__ == "__main__":
    main()
