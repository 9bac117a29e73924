"""montrage's scores in the attribution benchmark: the store's attribution models fitted and scored beside the
baselines, the concept-gate candidates, rescoring a kept run, and the sweep over fit seeds."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from montrage import metrics
from montrage.bench.attribution_setup import RUN, SCORES, evaluate
from montrage.data import DataError
from montrage.probes import ProbeSet


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


def score_all(
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
    out = score_all(att, methods, saved, qpix, prompts, queries, fit_seeds, probe_features)
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

    seeds = noise_seeds(qpix)
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


def noise_seeds(pixels: torch.Tensor) -> list[int]:
    from montrage.attribution.query import query_seed

    return [query_seed(p) for p in pixels]
