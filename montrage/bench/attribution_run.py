"""One seed of the attribution benchmark: the monitored customization, its held-out queries, and every method's
scores on them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from montrage.bench.attribution_scores import add_gated, fit_default, noise_seeds, score_all, score_montrage
from montrage.bench.attribution_setup import (
    EXEMPLAR_REPEATS,
    FINE_TUNE,
    ICON_PROMPTS,
    LAYERS,
    PROBE_SEEDS,
    PROMPTS,
    RUN,
    SCORES,
    TEMPLATES,
    build_probes,
    split_images,
)
from montrage.data import DataError, digit_token, scan_concept_folder
from montrage.encode import CAPTION


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
        q = sm.trajectory(qpix, noise_seeds(qpix), [last], q_prompts)
        t = {layer: att.store.train_features(layer)[last:] for layer in att.store.layers}
        centre = {k: v[last:] for k, v in att.centre.items()}
        return pair_features(q, t, centre, "final").mean(axis=-1)

    timed("final-epoch-similarity", final_similarity)
    timed("pixel-cosine", lambda: pixel.pixel_cosine(qpix, train_pix))

    unet, vae, sched = sm.model.unet, sm.model.vae, sm.model.scheduler
    for name, p in unet.named_parameters():  # gradient baselines differentiate the adapter only
        p.requires_grad_("lora_" in name)
    grad_t = [100, 300, 500, 700, 900]

    # the text encoder is not adapted, so each side's conditions are the same at every epoch
    query = (qpix, [int(s) for s in noise_seeds(qpix)], sm.cond(sm.prompts(len(qpix), q_prompts)))
    training = (train_pix, [int(s) for s in noise_seeds(train_pix)], sm.cond(sm.prompts(len(train_pix), t_prompts)))

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
    out = score_all(att, methods, saved, qpix, q_prompts, queries, fit_seeds, probe_features)
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
