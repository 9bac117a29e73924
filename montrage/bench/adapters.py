"""Which fine-tune made it? Model attribution among K LoRA adapters of one base, or none of them, from their stores.

Per seed: K customers LoRA-fine-tune the tiny base on their own digits of the same concepts (the LoRA half's recipe,
`montrage.bench.origin_lora.train_lora`, customer k with seed 100·seed + k, so each draws its own members and training noise),
each monitored by MontrageCallback (deferred: adapter snapshots only). The images: `per_class` generations of each
adapter from the concept prompts, and as many "none" images, half real digits of the concepts that no customer
trained on and half generations of the base model without any adapter. Every image's features are computed under
each adapter, the model rebuilt from its store (`store_diffusion_model`, one at a time, so memory holds one
model), and the methods are scored on a per-class half split:

  montrage            ModelAttributor: [features under adapter 1 | ... | adapter K] (montrage's default families)
                      into one linear softmax over K + 1 classes, C by cross-validation
  montrage_relative   the same on [mean over adapters | each adapter minus the mean | relative mean log-loss]
                      (`relative=True`)
  montrage_snapshots  montrage with each adapter's training trajectory (`loss_snapshots`) added
  lowest_loss         the training-free rule: the adapter with the lowest mean log-loss, "none" when even that is
                      above a threshold fit on the training half
  pixels              a model-blind linear probe on the pixels

`--condition caption` computes every feature under the image's prompt instead of the empty prompt (an adapter is
trained under its captions, so that is where it differs from the others).

Metrics: balanced accuracy over the K + 1 classes, per-class accuracy, and the accuracy among the adapters'
generations alone (which adapter, "none" counting as wrong). Run: `montrage bench adapters --seed 0,1,2`
(= `montrage bench adapters`); each seed is cached in `<out>_work/`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from montrage.bench.origin_eval import class_split
from montrage.bench.origin_lora import LoraBenchConfig, lora_split, split_pool, train_lora
from montrage.bench.seeds import mean_std, parse_seeds, seed_runs
from montrage.errors import MontrageError

CACHE_VERSION = "v3"
METHODS = ("montrage", "montrage_relative", "montrage_snapshots", "lowest_loss", "pixels")


def _generate(model, prompts, seeds, steps: int, guidance: float) -> torch.Tensor:
    from montrage.data import quantize
    from montrage.generate import build_pipeline, generate_probes
    from montrage.probes import ProbeSet

    probes = ProbeSet(tuple(prompts), tuple({} for _ in prompts), tuple(seeds))
    pipe = build_pipeline(model.tokenizer, model.text_encoder, model.vae, model.unet, model.scheduler)
    with torch.no_grad():
        return quantize(generate_probes(pipe, probes, model.image_size, steps, guidance, batch_size=64))


def _report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    from montrage.origin.metrics import balanced_accuracy

    gen = np.isin(y_true, names)
    return {
        "balanced_accuracy": round(balanced_accuracy(y_true, y_pred), 4),
        "accuracy_per_class": {c: round(float(np.mean(y_pred[y_true == c] == c)), 4) for c in list(names) + ["none"]},
        "accuracy_on_generations": round(float(np.mean(y_pred[gen] == y_true[gen])), 4),
    }


def adapters_seed(
    seed: int,
    workdir: str,
    adapters: int = 3,
    concepts=(1, 4, 7, 9),
    per_concept: int = 16,
    epochs: int = 4,
    repeats: int = 25,
    learning_rate: float = 1e-2,
    rank: int = 8,
    per_class: int = 64,
    timesteps: int = 10,
    gen_steps: int = 25,
    guidance: float = 3.0,
    batch_size: int = 64,
    condition: str = "empty",
    base_config=None,
    progress: bool = True,
) -> dict:
    """One seed: train (or reuse) the K adapters, generate, featurize under each, score every method.

    `condition`: the text condition of every feature, "empty" (the prompt of an image is unknown) or "caption" (each
    image's prompt: a generation's own, "a photo of <word>" of a real digit's class)."""
    from montrage.data import digit_token, sklearn_digits
    from montrage.origin.baselines import pixel_features
    from montrage.origin.classifier import LogisticModel, feature_matrix
    from montrage.origin.feature_set import SNAPSHOT_FAMILIES, FeatureSpec, default_families, default_timesteps
    from montrage.origin.features import trajectory_features
    from montrage.origin.from_store import snapshot_rows, store_diffusion_model
    from montrage.origin.model import load_diffusion_model
    from montrage.origin.model_attribution import ModelAttributor, fit_none_threshold, lowest_loss_attribution
    from montrage.recipes.pixel_ddpm import digits_images

    if condition not in ("empty", "caption"):
        raise MontrageError(f"condition must be 'empty' or 'caption', not {condition!r}.")
    if adapters < 2:
        raise MontrageError(f"model attribution needs at least 2 adapters, not {adapters}.")
    t0 = time.time()
    cfgs = [
        LoraBenchConfig(tuple(concepts), per_concept, epochs, repeats, learning_rate, rank, 100 * seed + k)
        for k in range(adapters)
    ]
    trained = [train_lora(cfg, workdir, progress, base_config) for cfg in cfgs]
    base, stores = trained[0][0], [store for _, _, store in trained]
    seconds = {"fine_tune": time.time() - t0}
    names = [f"adapter{k}" for k in range(adapters)]
    prompts = [f"a photo of {digit_token(d)}" for d in concepts]
    per_prompt = -(-per_class // len(prompts))

    t = time.time()
    groups, labels, captions = [], [], []
    for k, store in enumerate(stores):  # each adapter's generations, seeds disjoint across adapters and seeds
        model = store_diffusion_model(store)
        seeds = [20_000 + 1000 * seed + 100 * k + j for j in range(per_prompt)]
        groups.append(_generate(model, prompts, seeds, gen_steps, guidance)[:per_class])
        labels += [names[k]] * per_class
        captions += [p for p in prompts for _ in seeds][:per_class]
        del model
    half = per_class // 2
    pool = split_pool(base_config)
    used = {i for cfg in cfgs for i in lora_split(cfg, pool)[0]}  # real "none" digits are no customer's members
    candidates = np.flatnonzero(np.isin(sklearn_digits()[1], concepts))
    if pool is not None:  # a base with digits held out: "none" digits are new to it, as the members are
        candidates = np.intersect1d(candidates, pool)
    held = np.asarray([i for i in candidates if i not in used])
    rng = np.random.default_rng(seed)
    base_model = load_diffusion_model(base)
    size = base_model.image_size
    real = rng.permutation(held)[:half]
    base_seeds = [30_000 + 1000 * seed + j for j in range(-(-half // len(prompts)))]
    none = torch.cat(
        [digits_images(real, size), _generate(base_model, prompts, base_seeds, gen_steps, guidance)[: per_class - half]]
    )
    captions += [f"a photo of {digit_token(int(sklearn_digits()[1][i]))}" for i in real]
    captions += [p for p in prompts for _ in base_seeds][: per_class - half]
    del base_model
    groups.append(none)
    labels += ["none"] * len(none)
    sources = labels[: -len(none)] + ["none:real"] * half + ["none:base_generation"] * (len(none) - half)
    pixels = torch.cat(groups)
    assert len(captions) == len(pixels) == len(labels)
    labels, sources = np.asarray(labels), np.asarray(sources)
    seconds["generate"] = time.time() - t

    t = time.time()
    under = []  # montrage's default families and the training trajectory, in one pass per adapter
    for store in stores:
        model = store_diffusion_model(store)
        grid = default_timesteps(int(model.scheduler.config.num_train_timesteps), timesteps)
        spec = FeatureSpec(
            tuple(grid), families=default_families(model) + SNAPSHOT_FAMILIES, snapshots=snapshot_rows(model)
        )
        caps = captions if condition == "caption" else None
        under.append(trajectory_features(model, pixels, spec, captions=caps, batch_size=batch_size, progress=progress))
        del model
    seconds["features"] = time.time() - t

    tr, te = class_split(labels, seed, tuple(names) + ("none",), offset=300)
    families = tuple(f for f in under[0].spec.families if f not in SNAPSHOT_FAMILIES)
    results = {}
    att = ModelAttributor(names, families=families, C="auto").fit([fs.subset(tr) for fs in under], labels[tr])
    predictions = {"montrage": att.predict([fs.subset(te) for fs in under])}
    rel = ModelAttributor(names, families=families, C="auto", relative=True).fit(
        [fs.subset(tr) for fs in under], labels[tr]
    )
    predictions["montrage_relative"] = rel.predict([fs.subset(te) for fs in under])
    X = np.concatenate(
        [feature_matrix(fs, families)[0] for fs in under] + [feature_matrix(fs, SNAPSHOT_FAMILIES)[0] for fs in under],
        axis=1,
    )
    predictions["montrage_snapshots"] = LogisticModel(C="auto").fit(X[tr], labels[tr]).predict(X[te])
    tau = fit_none_threshold([fs.subset(tr) for fs in under], labels[tr], names)
    pick = lowest_loss_attribution([fs.subset(te) for fs in under], none_above=tau)
    predictions["lowest_loss"] = np.asarray(names + ["none"])[pick]
    Xp = pixel_features(pixels)
    predictions["pixels"] = LogisticModel(C="auto").fit(Xp[tr], labels[tr]).predict(Xp[te])
    for name, pred in predictions.items():
        results[name] = _report(labels[te], pred, names)
        results[name]["none_accuracy_per_source"] = {  # real digits vs the base model's own generations
            src: round(float(np.mean(pred[sources[te] == src] == "none")), 4)
            for src in ("none:real", "none:base_generation")
        }
    return {
        "methods": results,
        "test_per_class": int(np.sum(labels[te] == "none")),
        "config": {
            "adapters": adapters,
            "concepts": list(concepts),
            "per_concept": per_concept,
            "epochs": epochs,
            "repeats": repeats,
            "rank": rank,
            "per_class": per_class,
            "timesteps": list(grid),
            "families": list(families),
            "snapshots": list(under[0].spec.snapshots),
            "adapter_seeds": [c.seed for c in cfgs],
            "gen_steps": gen_steps,
            "guidance_scale": guidance,
            "condition": condition,
            "none": f"{half} held-out real digits + {len(none) - half} generations of the base",
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std (population) over seeds of every method's balanced accuracy and generation accuracy."""
    out = {}
    for name in per_seed[0]["methods"]:
        row = {}
        for key in ("balanced_accuracy", "accuracy_on_generations"):
            m, sd = mean_std([r["methods"][name][key] for r in per_seed])
            row[key], row[f"{key}_std"] = m, sd
        out[name] = row
    return out


def run_adapters_bench(
    out: str, seeds=(0,), workdir: str | None = None, threads: int | None = None, progress: bool = True, **kwargs
) -> dict:
    """Every seed (cached in `workdir`), aggregated; writes `out` (JSON) and returns it."""
    t = time.time()

    def compute(seed, workdir, **kw):  # progress is not part of a seed's cache key
        return adapters_seed(seed, workdir, progress=progress, **kw)

    runs = seed_runs("adapters", out, seeds, workdir, CACHE_VERSION, compute, threads, **kwargs)
    result = {
        "methods": aggregate(runs),
        "per_seed": {str(s): r for s, r in zip(seeds, runs)},
        "config": {
            **runs[0]["config"],
            "seeds": list(seeds),
            "test_per_class": runs[0]["test_per_class"],
            "std": "population (ddof 0) over seeds",
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": {"total_this_run": round(time.time() - t, 1)},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    if progress:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    k = result["config"]["adapters"]
    lines = [
        f"which of {k} adapters made it, or none ({k + 1} classes, chance {1 / (k + 1):.2f}); "
        f"seeds {result['config']['seeds']}, {result['config']['test_per_class']} test images per class",
        f"{'method':20s} {'balanced acc':>16s} {'acc on generations':>20s}",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"{name:20s} {r['balanced_accuracy']:8.3f} ± {r['balanced_accuracy_std']:.3f} "
            f"{r['accuracy_on_generations']:12.3f} ± {r['accuracy_on_generations_std']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="montrage bench adapters", description="which of K LoRA adapters of one base made an image, or none"
    )
    p.add_argument("--out", default="adapters_results.json")
    p.add_argument("--seed", default="0", help="seed, or several (0,1,2 or 0-2): mean ± std over them")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--concepts", default="1,4,7,9")
    p.add_argument("--per-concept", type=int, default=16, help="members per concept of each adapter")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--per-class", type=int, default=64, help="images per class (each adapter, and none)")
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument(
        "--condition",
        default="empty",
        choices=["empty", "caption"],
        help="text condition of the features: the empty prompt, or each image's prompt",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    result = run_adapters_bench(
        a.out,
        parse_seeds(a.seed),
        workdir=a.workdir,
        threads=a.threads,
        progress=not a.quiet,
        adapters=a.adapters,
        concepts=tuple(int(c) for c in a.concepts.split(",")),
        per_concept=a.per_concept,
        epochs=a.epochs,
        repeats=a.repeats,
        per_class=a.per_class,
        timesteps=a.timesteps,
        gen_steps=a.gen_steps,
        **({"condition": a.condition} if a.condition != "empty" else {}),
    )
    if a.quiet:
        print(format_table(result))


if __name__ == "__main__":
    main()
