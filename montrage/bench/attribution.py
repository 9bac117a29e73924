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

import dataclasses
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from montrage import metrics
from montrage.data import DataError, digit_token, image_token, scan_concept_folder
from montrage.encode import CAPTION
from montrage.probes import ProbeSet

TEMPLATES = {"exemplar": "a photo of {token}", "tokens": "a photo of {token} {image_token}"}
PROBE_SEEDS = {"exemplar": [0, 1, 2, 3], "tokens": [0, 1]}
LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0"]
QUERY_SEEDS = [100, 101, 102, 103, 104, 105, 106, 107]
EXEMPLAR_REPEATS = 8
SCORES, RUN = "scores.npz", "run.json"  # a kept run's saved method scores and query set, for `rescore_seed`
FINE_TUNE = {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-2}  # the benchmark's customization


PROMPTS = {"concept": "a photo of {token}", "mixture": "a photo of {a} and {b}", "image": "a photo of {token} {image}"}
ICON_PROMPTS = {
    "concept": "an icon in the style of {token}",
    "mixture": "an icon in the style of {a} and {b}",
    "image": "an icon of a {image} in the style of {token}",
}


def build_probes(
    examples,
    tokens: dict[str, str],
    per_image: list,
    seeds: list[int],
    mixtures: bool = True,
    exemplars: dict[str, str] | None = None,
    prompts: dict[str, str] = PROMPTS,
) -> tuple[ProbeSet, list[str]]:
    """Concept, mixture and per-image prompts with their ground truth, and each prompt's kind.

    `per_image`: (example, the words that name it: its image token, or an icon's content). `exemplars`: concept ->
    id of the image over-sampled in training (AbC-style customization toward an exemplar), the within-concept ground
    truth of that concept's prompts. `prompts`: the format of each kind (`PROMPTS`, `ICON_PROMPTS`).
    """
    concepts = sorted(tokens)
    exemplars = exemplars or {}
    texts, weights, within, kinds = [], [], [], []
    for c in concepts:
        texts.append(prompts["concept"].format(token=tokens[c]))
        weights.append({c: 1.0})
        within.append({exemplars[c]: 1.0} if c in exemplars else {})
        kinds.append("concept")
    if mixtures:
        for i, a in enumerate(concepts):
            for b in concepts[i + 1 :]:
                texts.append(prompts["mixture"].format(a=tokens[a], b=tokens[b]))
                weights.append({a: 0.5, b: 0.5})
                within.append({})
                kinds.append("mixture")
    for ex, tok in per_image:
        texts.append(prompts["image"].format(token=tokens[ex.concept], image=tok))
        weights.append({ex.concept: 1.0})
        within.append({ex.id: 1.0})
        kinds.append("image")
    return ProbeSet(tuple(texts), tuple(weights), tuple(seeds), tuple(concepts), tuple(within)), kinds


def split_images(examples, name=lambda k, ex: image_token(k)) -> tuple[list, list]:
    """Per concept, the first half of its images are named by probes, the second half only by held-out queries;
    `name(k, example)` gives the words that name a concept's k-th image (default: its image token)."""
    probe, held = [], []
    by_concept: dict[str, list] = {}
    for ex in examples:
        by_concept.setdefault(ex.concept, []).append(ex)
    for c in sorted(by_concept):
        items = [(ex, name(k, ex)) for k, ex in enumerate(by_concept[c])]
        half = max(1, len(items) // 2)
        probe += items[:half]
        held += items[half:]
    return probe, held


def evaluate(
    scores: np.ndarray,
    queries: ProbeSet,
    kinds: list[str],
    train,
    concepts: list[str],
    image_metric: str = "within_token",
) -> dict:
    """All metrics of one method's (Q, N) image scores on the held-out queries (`kinds` from `build_probes`); the
    per-image queries' within-concept figures are named `image_metric` (`within_token`, `within_content`)."""
    train_concepts = [e.concept for e in train]
    ids = [e.id for e in train]
    cs = metrics.concept_scores_from_images(scores, train_concepts, concepts)
    w = np.array(queries.weight_matrix())
    kind = np.array([k for k in kinds for _ in queries.seeds])
    ex = [d for d in queries.exemplars for _ in queries.seeds]
    has_exemplar = np.array([bool(d) for d in ex])
    single, mixture = kind == "concept", kind == "mixture"
    own = np.array(train_concepts)[None, :] == np.array(concepts)[np.argmax(w, axis=1)][:, None]
    out = {
        "top1": metrics.top1_accuracy(cs[single], np.argmax(w[single], axis=1)),
        "auc": metrics.mean_auc(scores[single], own[single]),
        "mixture_spearman": metrics.mixture_spearman(cs[mixture], w[mixture]) if mixture.any() else float("nan"),
    }
    exemplar = np.array([[i in d for i in ids] for d in ex])
    for prefix, rows in (("within", single & has_exemplar), (image_metric, kind == "image")):
        if rows.any():
            out[f"{prefix}_recall@1"] = metrics.within_recall_at_k(scores[rows], exemplar[rows], own[rows], 1)
            out[f"{prefix}_recall@5"] = metrics.within_recall_at_k(scores[rows], exemplar[rows], own[rows], 5)
            out[f"{prefix}_map"] = metrics.within_map(scores[rows], exemplar[rows], own[rows])
    return {k: float(v) for k, v in out.items()}


def run_seed(
    seed: int,
    concepts: list[int],
    images_per_concept: int,
    epochs: int,
    data_dir: str | None,
    workdir: str,
    query_seeds: list[int],
    within: str = "exemplar",
    exemplar_repeats: int = EXEMPLAR_REPEATS,
    progress: bool = False,
    steps: int = 400,
    repeats: int | None = None,
    projection_width: int | None = None,
    icon_set: dict | None = None,
    fit_seeds: list[int] | None = None,
    return_run: bool = False,
) -> dict:
    """One customization run monitored by the callback, then every method on its held-out queries.

    icon_set ({themes, pool, icons_dir, icons_per_theme}): customize the art base (pre-trained on `pool`) to icon
    themes instead of the digits base to digits; besides the concept and mixture prompts, per-image prompts name an
    icon's content ("an icon of a printer in the style of X", ground truth: X's printer), the `within_content` figures.

    within="exemplar": each concept's first image is over-sampled `exemplar_repeats` x in training (AbC-style
    customization toward an exemplar); one-concept prompts carry it as within-concept ground truth.
    within="tokens": captions carry a per-image token ("a photo of seven kb"); per-image prompts carry their image.
    The two are separate runs because they contradict each other: in an exemplar run, "seven kb" still looks like
    the exemplar, not like kb.
    """
    import pytorch_lightning as pl

    from montrage.attribution.pairs import pair_features
    from montrage.attribution.query import Attributor
    from montrage.baselines import gradients, pixel
    from montrage.callbacks import MontrageCallback
    from montrage.data import ConceptImageDataset, digits_examples
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune

    if within not in TEMPLATES:
        raise DataError(f"within must be one of {sorted(TEMPLATES)}, not {within!r}.")
    template, probe_seeds = TEMPLATES[within], PROBE_SEEDS[within]
    diagnostics = icon_set["diagnostics"] if icon_set is not None else {}
    base, resolution, prompts, image_metric = "tiny", 16, PROMPTS, "within_token"
    if icon_set is not None:
        from montrage.recipes import icons

        examples = icons.build_icon_set(
            icon_set["themes"],
            os.path.join(workdir, "icons"),
            icon_set["icons_per_theme"],
            icons_dir=icon_set["icons_dir"],
            seed=seed,
        )
        tokens = {c: icons.theme_token(c) for c in sorted({e.concept for e in examples})}
        base = icon_set["base"]
        resolution, prompts, image_metric = icons.SIZE, ICON_PROMPTS, "within_content"
        # icons are named by their content in either construction
        probe_images, held_images = split_images(examples, lambda k, ex: icons.content_words(icons.icon_of(ex)))
    elif data_dir:
        examples = scan_concept_folder(data_dir, template)
        tokens = {c: c for c in sorted({e.concept for e in examples})}
    else:
        examples = digits_examples(concepts, images_per_concept, template, offset=seed * images_per_concept)
        tokens = {f"digit{d}": digit_token(d) for d in concepts}
    exemplars = {c: next(e.id for e in examples if e.concept == c) for c in tokens} if within == "exemplar" else {}
    if icon_set is None:
        probe_images, held_images = ([], []) if within == "exemplar" else split_images(examples)
    weights = [exemplar_repeats if e.id in exemplars.values() else 1 for e in examples]
    repeats = repeats or max(1, round(2560 / sum(weights)))  # ~80 steps of 32 per epoch
    probes, _ = build_probes(examples, tokens, probe_images, seeds=probe_seeds, exemplars=exemplars, prompts=prompts)
    queries, kinds = build_probes(
        examples, tokens, held_images, seeds=query_seeds, exemplars=exemplars, prompts=prompts
    )
    probe_file = os.path.join(workdir, "probes.json")
    with open(probe_file, "w") as fh:
        json.dump(
            {
                "probes": [
                    {"prompt": p, "concepts": w, "exemplars": e}
                    for p, w, e in zip(probes.prompts, probes.weights, probes.exemplars)
                ],
                "seeds": probe_seeds,
            },
            fh,
        )

    class FixedData(ConceptDataModule):
        def examples(self):
            return examples

        def concept_tokens(self):
            return tokens

    timings = {}
    t0 = time.time()
    pl.seed_everything(seed, verbose=False)
    module = DiffusionFineTune(pretrained_model=base, **FINE_TUNE)
    data = FixedData(batch_size=32, repeats=repeats, seed=seed, resolution=resolution)
    data.dataset = ConceptImageDataset(examples, data.hparams.resolution, repeats, weights)  # setup() keeps it
    store_path = os.path.join(workdir, "store.h5")
    lrs = []

    class LrLog(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"] * trainer.num_training_batches)

    cb = MontrageCallback(
        store_path=store_path,
        probe_file=probe_file,
        num_inference_steps=10,
        guidance_scale=3.0,
        thumbnail_size=16,
        overwrite=True,
        log_to_wandb=False,
        layers=LAYERS,
        pooling="mean_max",
        encode_prompt=CAPTION,
        mode="inline",  # queries come with their prompts
        projection_width=projection_width,
    )
    pl.Trainer(
        max_epochs=epochs,
        callbacks=[cb, LrLog()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
    ).fit(module, data)
    timings["fine_tune"] = time.time() - t0

    t0 = time.time()
    probe_features = fit_default(store_path, steps, seed, progress)
    timings["fit"] = time.time() - t0
    att = Attributor.from_store(store_path)
    sm = att.model
    qpix = sm.generate(queries, att.store.num_epochs - 1)
    train = att.train
    train_pix = ConceptImageDataset(train, sm.resolution).pixels
    concept_names = sorted(tokens)
    q_prompts = [p for p, _ in queries.items()]  # every method that reads text sees the query's prompt
    t_prompts = [e.caption for e in train]  # and each training image's caption
    methods: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t = time.time()
        methods[name] = np.asarray(fn())
        seconds[name] = time.time() - t

    score_montrage(att, qpix, q_prompts, methods, seconds)

    def final_similarity():
        last = att.store.num_epochs - 1
        q = sm.trajectory(qpix, _seeds(qpix), [last], q_prompts)
        t = {layer: att.store.train_features(layer)[last:] for layer in att.store.layers}
        centre = {k: v[last:] for k, v in att.centre.items()}
        return pair_features(q, t, centre, "final").mean(axis=-1)

    timed("final-epoch-similarity", final_similarity)
    timed("pixel-cosine", lambda: pixel.pixel_cosine(qpix, train_pix))

    unet, vae, sched = sm.components.unet, sm.components.vae, sm.components.scheduler
    for name, p in unet.named_parameters():  # gradient baselines differentiate the adapter only
        p.requires_grad_("lora_" in name)
    grad_t = [100, 300, 500, 700, 900]

    # the text encoder is not adapted, so each side's conditions are the same at every epoch
    query = (qpix, [int(s) for s in _seeds(qpix)], sm.cond(sm.prompts(len(qpix), q_prompts)))
    training = (train_pix, [int(s) for s in _seeds(train_pix)], sm.cond(sm.prompts(len(train_pix), t_prompts)))

    def grads(side, output, row):
        pix, keys, cond = side
        sm.set_epoch(row)
        return gradients.lora_gradient_features(
            unet, vae, sched, pix, cond, grad_t, keys, output=output, proj_dim=256, proj_seed=seed
        )

    last = att.store.num_epochs - 1
    timed("trak", lambda: gradients.trak_scores(grads(query, "loss", last), grads(training, "loss", last)))
    timed("d-trak", lambda: gradients.trak_scores(grads(query, "sq_norm", last), grads(training, "sq_norm", last)))
    rows = list(range(1, att.store.num_epochs))
    timed(
        "tracin",
        lambda: gradients.tracin_scores(
            [grads(query, "loss", r) for r in rows], [grads(training, "loss", r) for r in rows], lrs[: len(rows)]
        ),
    )
    timed("datainf", lambda: gradients.datainf_scores(grads(query, "loss", last), grads(training, "loss", last)))
    saved = {
        "seed": seed,
        "steps": steps,
        "queries": dataclasses.asdict(queries),
        "kinds": kinds,
        "concepts": concept_names,
        "image_metric": image_metric,
        "seconds": seconds,
        "timings": timings,
        "num_probes": len(probes),
        "repeats": repeats,
        "exemplars": exemplars,
        "diagnostics": diagnostics,
    }
    add_gated(methods, seconds, [e.concept for e in train], concept_names)
    np.savez(os.path.join(workdir, SCORES), **methods)  # what `rescore_seed` needs to refit montrage alone
    with open(os.path.join(workdir, RUN), "w") as fh:
        json.dump(saved, fh)
    out = _score_all(att, methods, saved, qpix, q_prompts, queries, fit_seeds, probe_features)
    att.close()
    if return_run:  # what a counterfactual retraining needs: the recipe, the queries and every method's scores
        steps_per_epoch = math.ceil(len(data.dataset) / data.hparams.batch_size)
        out["run"] = {
            "scores": methods,
            "qpix": qpix,
            "prompts": q_prompts,
            "queries": queries,
            "kinds": kinds,
            "train": train,
            "examples": examples,
            "weights": weights,
            "base": base,
            "resolution": resolution,
            "steps": steps_per_epoch * epochs,
            "hparams": dict(module.hparams),
        }
    return out


def fit_default(store_path: str, steps: int, seed: int, progress: bool = False) -> dict[str, np.ndarray]:
    """Fit the store's own attribution models; returns the probes' trajectories, which every refit of the store
    (`fit_seed_sweep`) shares."""
    from montrage.attribution.fit import fit_attribution, probe_trajectories
    from montrage.store import StoreReader
    from montrage.store_model import StoreModel

    with StoreReader(store_path) as store:
        probe_features = probe_trajectories(StoreModel(store))
    fit_attribution(store_path, steps=steps, seed=seed, progress=progress, probe_features=probe_features)
    return probe_features


def score_montrage(att, qpix: torch.Tensor, prompts: list[str], methods: dict, seconds: dict) -> None:
    """montrage and its final-epoch ablation on the queries, timed, into `methods` and `seconds`."""
    for name, fast in (("montrage", False), ("montrage-final-epoch", True)):
        t = time.time()
        methods[name] = np.asarray(att.image_scores(qpix, fast=fast, prompts=prompts))
        seconds[name] = time.time() - t


GATED = {"montrage-gated": "montrage", "montrage-gated-similarity": "final-epoch-similarity"}  # name: within-ranker


def gated_scores(scores: np.ndarray, within: np.ndarray, train_concepts: list[str], concepts: list[str]) -> np.ndarray:
    """(Q, N) scores that rank concepts as `scores` does (mean image score per concept) and, within a concept,
    images as `within` does: -(concept rank) + the image's within-concept rank share in [0, 1). A candidate answer
    to "which images": montrage decides whose style, a within-concept ranker which works."""
    labels = np.asarray(train_concepts)
    cs = metrics.concept_scores_from_images(scores, train_concepts, concepts)
    concept_rank = np.argsort(np.argsort(-np.nan_to_num(cs, nan=-np.inf), axis=1), axis=1)
    out = np.zeros(scores.shape)
    for j, c in enumerate(concepts):
        cols = labels == c
        if cols.any():
            share = np.argsort(np.argsort(within[:, cols], axis=1), axis=1) / cols.sum()
            out[:, cols] = share - concept_rank[:, [j]]
    return out


def add_gated(methods: dict, seconds: dict, train_concepts: list[str], concepts: list[str]) -> None:
    for name, ranker in GATED.items():
        if "montrage" in methods and ranker in methods:
            methods[name] = gated_scores(methods["montrage"], methods[ranker], train_concepts, concepts)
            seconds[name] = seconds["montrage"] + seconds[ranker]


def _score_all(
    att,
    methods: dict,
    saved: dict,
    qpix: torch.Tensor,
    prompts: list[str],
    queries: ProbeSet,
    fit_seeds: list[int] | None,
    probe_features: dict[str, np.ndarray],
) -> dict:
    """Every method's metrics on the queries, and the fit-seed sweep: one seed's result."""
    train = att.train
    score = lambda sc: evaluate(sc, queries, saved["kinds"], train, saved["concepts"], saved["image_metric"])  # noqa: E731
    results = {name: {**score(s), "seconds": saved["seconds"][name]} for name, s in methods.items()}
    sweep = (
        fit_seed_sweep(att.store.path, att, qpix, prompts, fit_seeds, saved["steps"], score, probe_features)
        if fit_seeds
        else None
    )
    keep = ("timings", "num_probes", "repeats", "exemplars", "diagnostics")
    return {
        "methods": results,
        "fit_seeds": sweep,
        "num_queries": len(queries),
        "num_train_images": len(train),
        **{k: saved[k] for k in keep},
    }


def rescore_seed(workdir: str, fit_seeds: list[int] | None = None) -> dict:
    """Refit montrage on a kept run (`--keep`) and score it again beside the baselines' saved scores: a change of
    the attribution model measured on the same stores, queries and baselines, without re-running the rest."""
    from montrage.attribution.query import Attributor

    store_path = os.path.join(workdir, "store.h5")
    for name in (RUN, SCORES):
        if not os.path.isfile(os.path.join(workdir, name)):
            raise DataError(f"{os.path.join(workdir, name)!r} is missing: rescoring needs a run kept with --keep.")
    with open(os.path.join(workdir, RUN)) as fh:
        saved = json.load(fh)
    with np.load(os.path.join(workdir, SCORES)) as npz:
        methods = {k: npz[k] for k in npz.files}
    queries = ProbeSet(**{k: tuple(v) for k, v in saved["queries"].items()})
    t = time.time()
    probe_features = fit_default(store_path, saved["steps"], saved["seed"])
    saved["timings"]["fit"] = time.time() - t
    att = Attributor.from_store(store_path)
    qpix = att.model.generate(queries, att.store.num_epochs - 1)
    prompts = [p for p, _ in queries.items()]
    score_montrage(att, qpix, prompts, methods, saved["seconds"])
    add_gated(methods, saved["seconds"], [e.concept for e in att.train], saved["concepts"])
    out = _score_all(att, methods, saved, qpix, prompts, queries, fit_seeds, probe_features)
    att.close()
    return out


def fit_seed_sweep(
    store_path: str,
    att,
    qpix: torch.Tensor,
    prompts: list[str],
    fit_seeds: list[int],
    steps: int,
    score,
    probe_features: dict[str, np.ndarray],
) -> dict:
    """Refit the attribution models on the same store with each fit seed; per mode, every metric per seed and the
    within-concept spread (max - min). The queries are encoded once; `probe_features` from `fit_default`."""
    from montrage.attribution.fit import fit_attribution
    from montrage.attribution.query import Attributor

    seeds = _seeds(qpix)
    last = att.store.num_epochs - 1
    traj = {False: att.model.trajectory(qpix, seeds, list(range(last + 1)), prompts)}
    traj[True] = {k: v[-1:] for k, v in traj[False].items()}
    out: dict = {}
    for fs in fit_seeds:
        model_dir = os.path.join(os.path.dirname(store_path), f"fit_seed{fs}")
        fit_attribution(
            store_path, out_dir=model_dir, steps=steps, seed=fs, progress=False, probe_features=probe_features
        )
        other = Attributor.from_store(store_path, model_dir=model_dir)
        for name, fast in (("montrage", False), ("montrage-final-epoch", True)):
            metrics_ = score(other.score_trajectories(traj[fast], fast)[0])
            for k, v in metrics_.items():
                out.setdefault(name, {}).setdefault(k, []).append(v)
        other.close()
    for name, per in out.items():
        for k in [k for k in per if k.endswith("_map") or k == "top1"]:
            per[f"{k}_spread"] = float(np.nanmax(per[k]) - np.nanmin(per[k]))
    return {"seeds": list(fit_seeds), **out}


def _seeds(pixels: torch.Tensor) -> list[int]:
    from montrage.attribution.query import query_seed

    return [query_seed(p) for p in pixels]


def prepare_dataset(
    dataset: str,
    concepts: list[int],
    themes: list[str] | None,
    pretrain_themes: list[str] | None,
    icons_dir: str | None,
    icons_per_theme: int,
    progress: bool = True,
    data_dir: str | None = None,
    pretrain_text_encoder: str = "frozen",
) -> dict | None:
    """Check the dataset flags and build the base once: the icon set's description for `run_seed` (None: digits or
    a folder)."""
    from montrage.recipes.tiny_base import tiny_base_path

    if dataset == "icons":
        from montrage.recipes import icons
        from montrage.recipes.art_base import ArtBaseConfig, art_base_path, default_pool, family, style_response

        icons_dir = icons_dir or icons.ICONS_DIR
        if not themes or len(themes) < 2:
            raise DataError(
                "--dataset icons needs --themes with at least two installed icon themes, e.g. "
                f"--themes Tango,oxygen,breeze,Papirus; installed in {icons_dir!r}: "
                f"{', '.join(icons.installed_themes(icons_dir)) or 'none'}."
            )
        themes = list(icons.resolve_themes(themes, icons_dir))
        pool = (
            list(icons.resolve_themes(pretrain_themes, icons_dir))
            if pretrain_themes
            else default_pool(themes, icons_dir)
        )
        shared = sorted({family(t) for t in pool} & {family(t) for t in themes})
        if shared:
            raise DataError(
                f"--pretrain-themes {', '.join(pool)} share a family ({', '.join(shared)}) with --themes; "
                "the art base must not know a customized style: choose pre-training themes of other families."
            )
        if pretrain_text_encoder not in ("train", "frozen"):
            raise DataError(f"--pretrain-text-encoder must be train or frozen, not {pretrain_text_encoder!r}.")
        cfg = ArtBaseConfig(themes=tuple(sorted(pool)), train_text_encoder=pretrain_text_encoder == "train")
        base = art_base_path(pool, icons_dir, cfg, progress=progress)
        style = ICON_PROMPTS["concept"]
        diagnostics = {
            name: style_response(base, [style.format(token=icons.theme_token(t)) for t in group])
            for name, group in (("style_response", themes), ("pool_style_response", pool))
        }
        return {
            "themes": themes,
            "pool": pool,
            "icons_dir": icons_dir,
            "icons_per_theme": icons_per_theme,
            "base": base,
            "text_encoder": pretrain_text_encoder,
            "diagnostics": diagnostics,
        }
    if dataset != "digits":
        raise DataError(f"--dataset must be digits or icons, not {dataset!r}.")
    if data_dir is None and len(concepts) < 2:
        raise DataError("--concepts needs at least two digits, e.g. 1,4,7,9.")
    tiny_base_path(progress=progress)
    return None


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
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(format_table(agg))
    return result


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

    p = argparse.ArgumentParser(
        prog="montrage bench attribution", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataset_arguments(p, "0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--seed", default="0", help="seed, or several comma-separated (mean ± std)")
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
        seeds=comma_list(a.seed, int),
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
