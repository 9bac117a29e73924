"""`montrage bench attribution`: MONTRAGE against post-hoc baselines on ground truth built by construction.

Per seed: LoRA-customize the tiny base to digit concepts with MontrageCallback monitoring probes -- one concept
("a photo of seven") and two concepts ("a photo of one and seven", 0.5 each) -- then generate held-out queries with
the final model (seeds never used by probes) and score every method on them. Every method that reads text gets the
query's prompt and the training captions. Within-concept ground truth comes from one of two constructions:

  exemplar (default): each concept's first image is over-sampled in training (AbC-style customization toward an
                      exemplar); it is the within-concept target of that concept's prompts.
  tokens:             captions carry a per-image token ("a photo of seven kb"); probes also name half of the images
                      ("a photo of seven kb", exemplar kb), queries name the other half.

  between-concept: top-1 concept accuracy and AUC (images of the query's concept are positives) on one-concept
                   queries; Spearman between concept scores and the prompt's weights on two-concept queries;
  within-concept:  recall@1/@5 and mAP of the exemplar among the images of its concept.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from montrage.bench.attribution_run import run_seed
from montrage.bench.attribution_scores import rescore_seed
from montrage.bench.attribution_setup import (
    EXEMPLAR_REPEATS,
    LAYERS,
    PROBE_SEEDS,
    QUERY_SEEDS,
    TEMPLATES,
    prepare_dataset,
)
from montrage.encode import CAPTION


def run_attribution_bench(
    out: str,
    concepts: list[int],
    images_per_concept: int = 8,
    epochs: int = 6,
    seeds: list[int] = [0],
    repeats: int | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    keep: str | None = None,
    within: str = "exemplar",
    exemplar_repeats: int = EXEMPLAR_REPEATS,
    projection_width: int | None = None,
    dataset: str = "digits",
    themes: list[str] | None = None,
    pretrain_themes: list[str] | None = None,
    icons_dir: str | None = None,
    icons_per_theme: int = 16,
    fit_seeds: list[int] | None = None,
    pretrain_text_encoder: str = "frozen",
    rescore: str | None = None,
) -> dict:
    """Run every seed, print a table, write `out`. `keep`: a folder in which each seed's store is kept; `rescore`:
    such a folder, whose runs are not repeated: montrage alone is refitted and every method scored again.
    dataset="icons": customize the art base to the icon `themes` (pre-trained on `pretrain_themes`, default: one
    theme of each other installed family)."""
    icon_set = prepare_dataset(
        dataset,
        concepts,
        themes,
        pretrain_themes,
        icons_dir,
        icons_per_theme,
        progress,
        data_dir,
        pretrain_text_encoder,
    )
    per_seed = {}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            if keep:
                tmp = os.path.join(keep, f"seed{seed}")
                os.makedirs(tmp, exist_ok=True)
            t = time.time()
            if rescore:
                per_seed[seed] = rescore_seed(os.path.join(rescore, f"seed{seed}"), fit_seeds)
            else:
                per_seed[seed] = run_seed(
                    seed,
                    concepts,
                    images_per_concept,
                    epochs,
                    data_dir,
                    tmp,
                    QUERY_SEEDS,
                    within,
                    exemplar_repeats,
                    progress=progress,
                    repeats=repeats,
                    projection_width=projection_width,
                    icon_set=icon_set,
                    fit_seeds=fit_seeds,
                )
            if progress:
                print(f"seed {seed}: {time.time() - t:.0f} s", flush=True)
                if per_seed[seed]["diagnostics"]:
                    print(
                        "diagnostics:", json.dumps({k: round(v, 4) for k, v in per_seed[seed]["diagnostics"].items()})
                    )
                print(
                    format_table({m: {k: (v, 0.0) for k, v in r.items()} for m, r in per_seed[seed]["methods"].items()})
                )
    names = list(next(iter(per_seed.values()))["methods"])
    keys = list(next(iter(per_seed.values()))["methods"][names[0]])
    agg = {
        m: {
            k: (
                float(np.nanmean([per_seed[s]["methods"][m][k] for s in seeds])),
                float(np.nanstd([per_seed[s]["methods"][m][k] for s in seeds])),
            )
            for k in keys
        }
        for m in names
    }
    result = {
        "methods": {m: {k: v[0] for k, v in agg[m].items()} for m in names},
        "std": {m: {k: v[1] for k, v in agg[m].items()} for m in names},
        "config": {
            "concepts": concepts,
            "images_per_concept": images_per_concept,
            "epochs": epochs,
            "seeds": seeds,
            "repeats": repeats,
            "within": within,
            "exemplar_repeats": exemplar_repeats if within == "exemplar" else None,
            "data_dir": data_dir,
            "base": "tiny",
            "lora_rank": 8,
            "probe_seeds": PROBE_SEEDS[within],
            "query_seeds": QUERY_SEEDS,
            "template": TEMPLATES[within],
            "layers": LAYERS,
            "pooling": "mean_max",
            "encode_prompt": CAPTION,
            "projection_width": projection_width,
            "dataset": dataset,
            "rescored": rescore is not None,
        },
        "per_seed": {str(s): r for s, r in per_seed.items()},
    }
    if fit_seeds:
        result["fit_seed_spread"] = {
            m: {
                k: max(per_seed[s]["fit_seeds"][m][k] for s in seeds)
                for k in per_seed[seeds[0]]["fit_seeds"][m]
                if k.endswith("_spread")
            }
            for m in ("montrage", "montrage-final-epoch")
        }
        result["config"]["fit_seeds"] = fit_seeds
        print("fit-seed spread (max - min over fit seeds; worst run seed):", json.dumps(result["fit_seed_spread"]))
    if icon_set is not None:
        from montrage.recipes.icons import TEMPLATE as ICON_TEMPLATE

        result["config"].update(
            {
                "themes": icon_set["themes"],
                "pretrain_themes": icon_set["pool"],
                "pretrain_text_encoder": icon_set["text_encoder"],
                "icons_dir": icon_set["icons_dir"],
                "icons_per_theme": icons_per_theme,
                "base": "art",
                "template": ICON_TEMPLATE,
                "concepts": None,
                "images_per_concept": None,
            }
        )
    result["config"]["base_weights_sha"] = base_weights_sha(result["config"]["base"], icon_set)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(format_table(agg))
    return result


def base_weights_sha(base: str, icon_set: dict | None) -> str:
    """The fingerprint of the base the run customized, so that a rerun can tell whether it drew the same weights."""
    from montrage.components import load_model
    from montrage.recipes.fine_tune import resolve_pretrained

    return load_model(icon_set["base"] if icon_set is not None else resolve_pretrained(base)).identity()["weights_sha"]


def format_table(agg: dict) -> str:
    keys = [
        "top1",
        "auc",
        "mixture_spearman",
        "within_recall@1",
        "within_map",
        "within_token_map",
        "within_content_map",
        "seconds",
    ]
    keys = [k for k in keys if any(k in vals for vals in agg.values())]
    lines = [f"{'method':24s}" + "".join(f"{k:>20s}" for k in keys)]
    for m, vals in agg.items():
        cells = []
        for k in keys:
            mean, std = vals.get(k, (float("nan"), 0.0))
            cells.append(f"{mean:8.3f} ± {std:5.3f}".rjust(20))
        lines.append(f"{m:24s}" + "".join(cells))
    return "\n".join(lines)


def add_dataset_arguments(p, concepts_default: str) -> None:
    """The flags that choose the customization run (shared with `montrage bench counterfactual`)."""
    p.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "icons"],
        help="digits on the digits base, or installed icon themes on the art base",
    )
    p.add_argument("--concepts", default=concepts_default, help="digits: the digit concepts, comma-separated")
    p.add_argument("--images-per-concept", type=int, default=8, help="digits: training images per concept")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    p.add_argument("--themes", default=None, help="icons: the customized icon themes, comma-separated")
    p.add_argument(
        "--pretrain-themes",
        default=None,
        help="icons: the art base's pre-training themes (default: one installed theme of every other family)",
    )
    p.add_argument(
        "--pretrain-text-encoder",
        default="frozen",
        choices=["frozen", "train"],
        help="icons: leave the art base's text encoder as built while its UNet pre-trains (as Stable "
        "Diffusion's UNet learns on a frozen CLIP; the default), or train it with the UNet",
    )
    p.add_argument("--icons-dir", default=None, help="icons: folder of icon themes (default /usr/share/icons)")
    p.add_argument("--icons-per-theme", type=int, default=16, help="icons: training icons per theme")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from montrage.bench import comma_list
    from montrage.bench.seeds import parse_seeds

    p = argparse.ArgumentParser(
        prog="montrage bench attribution", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataset_arguments(p, "0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--seed", default="0", help="seed, or several (0,1,2 or 0-2): mean ± std over them")
    p.add_argument("--out", default="attribution_results.json")
    p.add_argument("--data-dir", default=None, help="digits: an image folder with one subfolder per concept instead")
    p.add_argument("--repeats", type=int, default=None, help="passes over the images per epoch")
    p.add_argument("--keep", default=None, help="keep each seed's store and models in this folder")
    p.add_argument(
        "--rescore",
        default=None,
        help="a --keep folder whose runs are scored again with montrage refitted (the baselines' saved "
        "scores reused; same flags as the kept run)",
    )
    p.add_argument(
        "--fit-seeds",
        default=None,
        help="also refit the attribution model with each of these seeds (comma-separated) on every run's "
        "store and report the spread",
    )
    p.add_argument(
        "--within",
        default="exemplar",
        choices=["exemplar", "tokens"],
        help="within-concept ground truth (an over-sampled exemplar, or per-image tokens)",
    )
    p.add_argument(
        "--exemplar-repeats",
        type=int,
        default=EXEMPLAR_REPEATS,
        help="how many times more often each concept's exemplar image is seen",
    )
    p.add_argument(
        "--projection-width",
        default="none",
        help="store features through a random projection to this width ('none': unprojected; the "
        "benchmark's pooled features are 128 wide)",
    )
    a = p.parse_args(argv)
    run_attribution_bench(
        a.out,
        comma_list(a.concepts, int),
        images_per_concept=a.images_per_concept,
        epochs=a.epochs,
        seeds=parse_seeds(a.seed),
        repeats=a.repeats,
        data_dir=a.data_dir,
        keep=a.keep,
        within=a.within,
        exemplar_repeats=a.exemplar_repeats,
        projection_width=None if a.projection_width in (None, "none") else int(a.projection_width),
        dataset=a.dataset,
        themes=comma_list(a.themes),
        pretrain_themes=comma_list(a.pretrain_themes),
        icons_dir=a.icons_dir,
        icons_per_theme=a.icons_per_theme,
        fit_seeds=comma_list(a.fit_seeds, int),
        pretrain_text_encoder=a.pretrain_text_encoder,
        rescore=a.rescore,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
