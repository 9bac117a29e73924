"""`montrage bench counterfactual --leave-one-out`: the causal effect of every training image alone, then every
method's top-K judged on it.

Retraining once per method, query and K limits the benchmark to a handful of queries, too few to rank methods
whose rises differ by less than their query-to-query spread. Leaving each training image out once (N coupled
retrainings) gives the loss rise of every held-out query for every image; a method's top-K rise is then estimated
as the sum of its K images' rises, for all single-concept queries at once. The sum is exact for K = 1 (always
reported) and when removals do not interact; the top-K mode of the same benchmark measures how far they do
(`docs/results.md`)."""

from __future__ import annotations

import os
import time

import numpy as np

ESTIMATE = "additive: a top-K set's rise is the sum of its images' leave-one-out rises"
CEILING = "leave-one-out"  # the K images with the largest rises: the best any method's top-K can do


def leave_one_out(re, ids: list[str], query: tuple, done: list | None = None, after_each=None, bar=None) -> np.ndarray:
    """(N, Q) rise of every query's loss when training image `ids[i]` alone is left out of the coupled retraining
    `re` (`Retrainer`). `query`: (pixels, prompts, fixed points, full-run losses); `done`: rows of a resumed run;
    `after_each(rows_so_far)` runs after each retraining."""
    qpix, prompts, points, base = query
    rows = [np.asarray(r, dtype=float) for r in (done or [])]
    if bar is not None:
        bar.update(len(rows))
    for x in ids[len(rows) :]:
        re.train(frozenset([x]))
        rows.append(re.query_loss(qpix, prompts, points) - base)
        if after_each is not None:
            after_each(rows)
        if bar is not None:
            bar.update(1)
    return np.stack(rows)


def additive_deltas(loo: np.ndarray, scores: dict[str, np.ndarray], rows: np.ndarray, ks: list[tuple]) -> dict:
    """{(fraction, K, method): per-query rises} estimated from `loo` (N, Q) for the query rows `rows` of `scores`
    (method: (all queries, N)), for each (fraction, K) of `ks`. `random` is the expectation over random K-sets
    (K times the mean rise), `CEILING` the K largest rises."""
    deltas: dict[tuple, list] = {}
    for frac, k in ks:
        for name, s in scores.items():
            top = np.argsort(-np.asarray(s)[rows], axis=1)[:, :k]
            deltas[(frac, k, name)] = np.take_along_axis(loo.T, top, axis=1).sum(axis=1).tolist()
        deltas[(frac, k, "random")] = (k * loo.mean(axis=0)).tolist()
        deltas[(frac, k, CEILING)] = (-np.sort(-loo, axis=0)[:k]).sum(axis=0).tolist()
    return deltas


def run_leave_one_out(re, ids, scores, rows, query, ks, out, config, resume, t0, progress) -> dict:
    """`run_counterfactual`'s leave-one-out mode: N retrainings, written after each, then every method judged."""
    from tqdm.auto import tqdm

    from montrage.bench.counterfactual import format_counterfactual, k_images, resumable, summarize, write_result

    config = dict(config, estimate=ESTIMATE)
    earlier, done = 0.0, []  # seconds and rows of the run being resumed
    if resume and os.path.isfile(out):
        saved = resumable(out, config)["config"]
        earlier, done = float(saved.get("seconds", 0.0)), saved.get("leave_one_out", [])
    pairs = [(1, 1)] + [(f, k) for f in ks if (k := k_images(f, len(ids))) > 1]  # K = 1 is exact, no estimate

    def write(loo_rows, complete: bool) -> dict:
        loo = np.asarray(loo_rows, dtype=float).reshape(-1, len(rows))
        result = summarize(additive_deltas(loo, scores, rows, pairs)) if complete else {"methods": {}, "by_k": {}}
        seconds = round(earlier + time.time() - t0, 1)
        full = dict(config, retrainings=1 + len(loo_rows), seconds=seconds, complete=complete)
        write_result(out, result, dict(full, leave_one_out=loo.tolist()))
        return dict(result, config=full)

    bar = tqdm(total=len(ids), desc="leave-one-out retrains", disable=not progress)
    loo = leave_one_out(re, ids, query, done, lambda r: write(r, False), bar)
    bar.close()
    result = write(loo, True)
    print(format_counterfactual(result))
    return result
