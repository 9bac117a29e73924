"""`montrage bench counterfactual`: remove each method's top-K training images, retrain, and see the query's loss rise.

The gold standard of attribution (AbU, FastGDA on MSCOCO), here at CPU scale. One monitored customization run
(the attribution benchmark's, digits or icons) gives every method's scores for its held-out queries. Then, for a
sample of single-concept queries, the LoRA customization is re-run without that query's top-K images of each
method, and without K random ones, and the query's diffusion loss at fixed (t, epsilon) points is compared with
the same retraining on every image: delta L = L(without top-K) - L(all). The retraining is one lean loop for every
run (the benchmark's LoRA, learning rate, batch and exemplar weighting; the same number of optimizer steps; the
same seed), coupled with the full run: the same batches, noise and timesteps, the removed images' samples dropped
(`montrage.bench.retraining`), so a larger rise means the removed images mattered more to that generation.
`--leave-one-out` retrains once per training image instead and judges every query (`montrage.bench.leave_one_out`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from montrage.bench.retraining import POINTS, RETRAINING, Retrainer, fixed_points
from montrage.errors import MontrageError

METHODS = (
    "montrage",
    "montrage-gated",
    "montrage-gated-similarity",
    "montrage-final-epoch",
    "final-epoch-similarity",
    "pixel-cosine",
    "trak",
    "d-trak",
    "tracin",
    "datainf",
    "random",
)
QUERY_KINDS = ("concept", "image")  # single-concept held-out queries: "a photo of X" / "an icon in the style of X",
# and per-image ones ("an icon of a printer in the style of X")


def pick_queries(kinds: list[str], queries, n: int, seed: int, wanted=QUERY_KINDS) -> np.ndarray:
    """n single-concept query rows of the `wanted` kinds, spread over the concepts (seeded)."""
    bad = sorted(set(wanted) - set(QUERY_KINDS))
    if bad or not wanted:
        raise MontrageError(f"--query-kinds {','.join(wanted)}: choose one or both of {', '.join(QUERY_KINDS)}.")
    kind = np.array([k for k in kinds for _ in queries.seeds])
    w = np.array(queries.weight_matrix())
    rows = np.flatnonzero(np.isin(kind, list(wanted)))
    if not len(rows):
        raise MontrageError(f"the benchmark has no held-out queries of kind {', '.join(wanted)}.")
    rng = np.random.default_rng(seed)
    by_concept = {c: rng.permutation(rows[np.argmax(w[rows], axis=1) == c]).tolist() for c in range(w.shape[1])}
    out = []
    while len(out) < min(n, len(rows)):
        for c in sorted(by_concept):
            if by_concept[c] and len(out) < n:
                out.append(by_concept[c].pop(0))
    return np.array(sorted(out))


def run_counterfactual(
    out: str,
    dataset: str = "digits",
    concepts: list[int] = (1, 4, 7, 9),
    images_per_concept: int = 8,
    themes: list[str] | None = None,
    pretrain_themes: list[str] | None = None,
    icons_dir: str | None = None,
    icons_per_theme: int = 12,
    num_queries: int = 8,
    ks: tuple[float, ...] = (0.05, 0.10),
    seed: int = 0,
    epochs: int = 6,
    methods: list[str] | None = None,
    progress: bool = True,
    pretrain_text_encoder: str = "frozen",
    query_kinds: tuple[str, ...] = QUERY_KINDS,
    resume: bool = False,
    leave_one_out: bool = False,
) -> dict:
    """Run the monitored customization, score its queries with every method, and retrain per (method, query, K).
    `query_kinds`: which single-concept queries to sample (`QUERY_KINDS`); `resume`: keep the (method, query, K)
    results of an unfinished `out` from the same benchmark and retrain only the rest. `leave_one_out`: retrain once
    without each training image instead, and judge every method's top-K on every query of `query_kinds`
    (`montrage.bench.leave_one_out`; `num_queries` is then unused)."""
    from tqdm.auto import tqdm

    from montrage.bench.attribution_run import run_seed
    from montrage.bench.attribution_setup import QUERY_SEEDS, prepare_dataset

    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise MontrageError(f"--methods names unknown methods {unknown}; known: {', '.join(METHODS)}.")
    icon_set = prepare_dataset(
        dataset,
        list(concepts),
        themes,
        pretrain_themes,
        icons_dir,
        icons_per_theme,
        progress,
        pretrain_text_encoder=pretrain_text_encoder,
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # the icon images live here until the retrainer has read them
        res = run_seed(
            seed,
            list(concepts),
            images_per_concept,
            epochs,
            None,
            tmp,
            QUERY_SEEDS,
            progress=progress,
            icon_set=icon_set,
            return_run=True,
        )
        run = res.pop("run")
        re = Retrainer(
            run["base"], run["examples"], run["weights"], run["resolution"], run["steps"], seed, run["hparams"]
        )
    scores = {m: s for m, s in run["scores"].items() if methods is None or m in methods}
    rows = pick_queries(
        run["kinds"], run["queries"], len(run["qpix"]) if leave_one_out else num_queries, seed, query_kinds
    )
    qpix, prompts = run["qpix"][rows], [run["prompts"][r] for r in rows]
    ids = [e.id for e in run["train"]]
    points = fixed_points(tuple(re.mean.shape[1:]), seed=seed)
    t = time.time()
    re.train()
    base_loss = re.query_loss(qpix, prompts, points)
    retrain_seconds = time.time() - t
    n = len(ids)
    names = list(scores) + (["random"] if methods is None or "random" in methods else [])
    config = {
        "dataset": dataset,
        "concepts": list(concepts) if dataset == "digits" else None,
        "themes": icon_set["themes"] if icon_set else None,
        "pretrain_themes": icon_set["pool"] if icon_set else None,
        "pretrain_text_encoder": icon_set["text_encoder"] if icon_set else None,
        "seed": seed,
        "epochs": epochs,
        "queries": len(rows),
        "query_kinds": list(query_kinds),
        "query_prompts": prompts,
        "query_rows": rows.tolist(),
        "k_fractions": list(ks),
        "points": POINTS,
        "retraining": RETRAINING,
        "methods": names,
        "train_images": n,
        "retrain_steps": run["steps"],
        "retrain_seconds": round(retrain_seconds, 1),
        "base_query_loss": base_loss.tolist(),
        "threads": torch.get_num_threads(),
        "command": "montrage bench counterfactual "
        + " ".join(
            [
                f"--dataset {dataset}",
                f"--themes {','.join(icon_set['themes'])}"
                if icon_set
                else f"--concepts {','.join(map(str, concepts))}",
                "--leave-one-out" if leave_one_out else f"--queries {num_queries}",
                f"--k {','.join(map(str, ks))}",
                f"--seed {seed}",
            ]
            + ([] if tuple(query_kinds) == QUERY_KINDS else [f"--query-kinds {','.join(query_kinds)}"])
        ),
    }
    if leave_one_out:
        query = (qpix, prompts, points, base_loss)
        from montrage.bench.leave_one_out import run_leave_one_out

        return run_leave_one_out(re, ids, scores, rows, query, ks, out, config, resume, t0, progress)
    deltas: dict[tuple, list] = {}
    earlier = {"seconds": 0.0, "retrainings": 0}  # what a resumed run had already done
    if resume and os.path.isfile(out):
        deltas, earlier = resumed_deltas(out, config)
    bar = tqdm(total=len(ks) * len(names) * len(rows), desc="counterfactual retrains", disable=not progress)
    bar.update(sum(map(len, deltas.values())))

    def done_so_far(retrainings: int, complete: bool) -> dict:
        seconds = round(earlier["seconds"] + time.time() - t0, 1)
        return dict(config, retrainings=earlier["retrainings"] + retrainings, seconds=seconds, complete=complete)

    def checkpoint(deltas: dict, retrainings: int, complete: bool) -> None:
        write_result(out, summarize(deltas), done_so_far(retrainings, complete))

    retrainings = retrain_without_top_k(
        re, ids, scores, names, rows, (qpix, prompts, points, base_loss), ks, seed, deltas, checkpoint, bar
    )
    bar.close()
    result = summarize(deltas)
    result["config"] = done_so_far(retrainings, True)
    print(format_counterfactual(result))
    return result


def retrain_without_top_k(
    re: Retrainer,
    ids: list[str],
    scores: dict[str, np.ndarray],
    names: list[str],
    rows: np.ndarray,
    query: tuple,
    ks: tuple[float, ...],
    seed: int,
    deltas: dict[tuple, list],
    after_query=None,
    bar=None,
) -> int:
    """Retrain without each method's (and K random) top-K images (`ids`: the scores' columns, in the store's order)
    per query and K, appending each loss rise to `deltas[(fraction, K, method)]`; slots that `deltas` already holds
    (a resumed run) are skipped. `query`: the queries' (pixels, prompts, fixed points, full-run losses);
    `after_query(deltas, retrainings, done)` runs after each query. Returns the number of retrainings (methods that
    remove the same images share one)."""
    qpix, prompts, points, base_loss = query
    n, rng = len(ids), np.random.default_rng(seed + 1)
    losses: dict[frozenset, np.ndarray] = {}  # removed ids -> every query's loss
    for frac in ks:
        k = k_images(frac, n)
        for j, r in enumerate(rows):  # queries outermost: a run cut short still has every method on the same queries
            for name in names:
                top = rng.choice(n, k, replace=False) if name == "random" else np.argsort(-scores[name][r])[:k]
                if len(deltas.get((frac, k, name), ())) > j:  # kept from the run being resumed
                    continue
                removed = frozenset(ids[i] for i in top)
                if removed not in losses:
                    re.train(removed)
                    losses[removed] = re.query_loss(qpix, prompts, points)
                deltas.setdefault((frac, k, name), []).append(float(losses[removed][j] - base_loss[j]))
                if bar is not None:
                    bar.update(1)
            if after_query is not None:
                after_query(deltas, len(losses), frac == ks[-1] and j == len(rows) - 1)
    return len(losses)


RESUME_FIELDS = ("command", "query_prompts", "retraining", "methods", "train_images", "retrain_steps", "points")


def resumed_deltas(out: str, config: dict) -> tuple[dict[tuple, list], dict]:
    """The per-query loss rises of an unfinished result file and the seconds and retrainings it took, refused
    unless it is this benchmark's (`resumable`)."""
    saved = resumable(out, config)
    old = saved["config"]
    fractions = {str(k): f for f in config["k_fractions"] for k in [k_images(f, config["train_images"])]}
    deltas = {
        (fractions[k], int(k), name): list(e["per_query"])
        for k, per in saved.get("by_k", {}).items()
        if k in fractions
        for name, e in per.items()
    }
    return deltas, {"seconds": float(old.get("seconds", 0.0)), "retrainings": int(old.get("retrainings", 0))}


def resumable(out: str, config: dict) -> dict:
    """The saved result `out`, refused unless it is this benchmark's: the same command, queries, retraining
    protocol, methods and training set, and full-run losses that agree."""
    try:
        with open(out) as fh:
            saved = json.load(fh)
        old = saved["config"]
    except (OSError, ValueError, KeyError) as e:
        raise MontrageError(f"--resume: {out!r} is not a counterfactual result ({e}); pass another --out.") from e
    methods = old.get("methods") or {m for per in saved.get("by_k", {}).values() for m in per}  # before "methods"
    old, new = dict(old, methods=sorted(methods)), dict(config, methods=sorted(config["methods"]))
    for field in RESUME_FIELDS:
        a, b = old.get(field), new[field]
        if a != b:
            raise MontrageError(
                f"--resume: {out!r} was made by another benchmark (config.{field} is {a!r}, this run's is {b!r}); "
                "pass another --out, or leave out --resume to start again."
            )
    if not np.allclose(old.get("base_query_loss", []), config["base_query_loss"], rtol=1e-3, atol=1e-6):
        raise MontrageError(
            f"--resume: the full retraining's query losses differ from those in {out!r} (another torch build or "
            "thread count?); leave out --resume to start again."
        )
    return saved


def k_images(frac: float, n: int) -> int:
    """How many images `--k` FRAC removes from n: a fraction (< 1) of them, at least one, or a count."""
    return int(frac) if frac >= 1 else max(1, int(round(frac * n)))


def _mean_se(d) -> tuple[float, float]:
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def summarize(deltas: dict[tuple, list]) -> dict:
    """Mean and standard error of the loss rise per (K, method); the smallest K also at the top level. Beside
    montrage, each method's paired lead over it (its rise minus montrage's on the same queries): the query-to-query
    spread of the rises cancels there, so the comparison is sharper than two means' standard errors."""
    result: dict = {"methods": {}, "by_k": {}}
    for (frac, k, name), d in deltas.items():
        mean, se = _mean_se(d)
        entry = {"k": k, "k_fraction": frac, "delta_loss": mean, "queries_done": len(d), "delta_loss_se": se}
        ref = deltas.get((frac, k, "montrage"))
        if ref is not None and name != "montrage":
            m = min(len(d), len(ref))
            entry["lead_over_montrage"], entry["lead_over_montrage_se"] = _mean_se(np.subtract(d[:m], ref[:m]))
        entry["per_query"] = d
        result["by_k"].setdefault(str(k), {})[name] = entry
        result["methods"].setdefault(name, entry)
    return result


def write_result(out: str, result: dict, config: dict) -> None:
    """Rewrite the result file whole (via a temporary file), so it is never half-written."""
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(result, config=config), fh, indent=1)
    os.replace(tmp, out)


def format_counterfactual(result: dict) -> str:
    lines = [f"{'method':28s}{'K':>5s}{'delta L':>12s}{'s.e.':>10s}{'lead over montrage':>22s}"]
    for k, per in result["by_k"].items():
        for name, r in sorted(per.items(), key=lambda kv: -kv[1]["delta_loss"]):
            lead = r.get("lead_over_montrage")
            lead = "" if lead is None else f"{lead:+.5f} ± {r['lead_over_montrage_se']:.5f}"
            lines.append(f"{name:28s}{r['k']:5d}{r['delta_loss']:12.5f}{r['delta_loss_se']:10.5f}{lead:>22s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from montrage.bench import comma_list
    from montrage.bench.attribution import add_dataset_arguments

    p = argparse.ArgumentParser(
        prog="montrage bench counterfactual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataset_arguments(p, "1,4,7,9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="counterfactual.json")
    p.add_argument("--queries", type=int, default=8, help="held-out queries retrained for")
    p.add_argument(
        "--k",
        default="0.05,0.1",
        help="removed images, as fractions of the training set (< 1) or counts, comma-separated",
    )
    p.add_argument(
        "--methods", default=None, help=f"methods to retrain for (default: all, and random): {', '.join(METHODS)}"
    )
    p.add_argument(
        "--query-kinds",
        default=",".join(QUERY_KINDS),
        help="single-concept held-out queries to sample: concept (a concept's or style's own prompt), image "
        "(per-image prompts), or both",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results of an unfinished --out from the same benchmark and retrain only the rest",
    )
    p.add_argument(
        "--leave-one-out",
        action="store_true",
        help="retrain once without each training image and judge every method's top-K on every single-concept "
        "query (the sum of its images' rises) instead of retraining per method, query and K; --queries is unused",
    )
    a = p.parse_args(argv)
    run_counterfactual(
        a.out,
        a.dataset,
        comma_list(a.concepts, int),
        a.images_per_concept,
        comma_list(a.themes),
        comma_list(a.pretrain_themes),
        a.icons_dir,
        a.icons_per_theme,
        a.queries,
        tuple(comma_list(a.k, float)),
        a.seed,
        a.epochs,
        comma_list(a.methods),
        pretrain_text_encoder=a.pretrain_text_encoder,
        query_kinds=tuple(comma_list(a.query_kinds)),
        resume=a.resume,
        leave_one_out=a.leave_one_out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
