"""Origin-attribution benchmark on a pixel DDPM trained on digits: trajectory classifier vs the paper's baselines.

One seed: train `recipes/pixel_ddpm.py` on `members` digits (cached by config), take as many held-out digits
(external) and generations (generated), extract trajectory features at `timesteps` uniform timesteps, split every
class in half (train / test) and score on the test half:

  methods     ternary member / generated / external (one-vs-rest, member and generated positive, averaged;
              balanced accuracy of the predicted class): trajectory (loss + ‖∇x L‖² + ‖∇θ L‖²), trajectory_loss
              (loss only), pia_trajectory (loss with PIA's noise), gsa (per-tensor gradient norms), pixels
              (model-blind); loss_threshold and pia (single-t threshold attacks) scored as member-vs-rest.
  membership  the same methods on member vs external only (the paper's Table 2 setting).
  claims      (a) generated images are flagged as members by loss thresholding more often than members are;
              (b) loss features spread over the whole trajectory beat every contiguous window of the same size
                  ("Goldilocks" ablation, Table 3); (c) gradient features add over loss-only features.
  model_attribution  (with --attribution) a second model B of the same recipe: generations of A / of B / external,
              told apart from the features under both models (ModelAttributor) and by the lowest-loss rule.

Run: `python -m montrage.recipes.bench_origin --out origin_results.json` (2 idle CPU cores: ≈ 9 min with training,
≈ 2.5 min once the model is cached in `<out>_work/`; `--attribution` adds ≈ 8 min); several seeds: one run per
`--seed`. Smoke: `--members 24 --steps 30 --timesteps 4 --sample-steps 10` (≈ 25 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

ORIGINS = ("member", "generated", "external")
METRIC_KEYS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy")


def window_grids(num_train_timesteps: int, count: int, windows: int) -> list[list[int]]:
    """`windows` contiguous, equal parts of [0, T), each sampled at `count` evenly spaced timesteps: the same query
    budget as the uniform grid, concentrated in one part of the trajectory (the paper's t = 0..249, 250..499, ...)."""
    width = num_train_timesteps / windows
    return [sorted({int(k * width + np.floor(i * width / count)) for i in range(count)}) for k in range(windows)]


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def _metrics(rep: dict) -> dict:
    return {k: float(rep[k]) for k in METRIC_KEYS}


def run_origin_bench(out: str, members: int = 200, seed: int = 0, timesteps: int = 20, steps: int = 1000,
                     sampler: str = "ddpm", sample_steps: int = 100, windows: int = 4, batch_size: int = 64,
                     C: float = 1.0, workdir: str | None = None, threads: int | None = None,
                     attribution: bool = False, progress: bool = True) -> dict:
    """Run the benchmark for one seed and write `out` (JSON) and a figure next to it (`.png`).

    `attribution=True` also trains a second model (seed + 1, its own members) and scores model attribution: which
    of the two generated an image, or neither (external), from the features under both (≈ +12 min)."""
    from montrage.origin.baselines import ThresholdAttack, gsa_features, pia_spec, pixel_features
    from montrage.origin.classifier import LinearProbe, feature_matrix
    from montrage.origin.featurefile import write_features
    from montrage.origin.features import FeatureSpec, default_timesteps, trajectory_features
    from montrage.origin.metrics import binary_report, ovr_report
    from montrage.origin.model import load_diffusion_model
    from montrage.recipes.pixel_ddpm import (PixelDDPMConfig, digits_images, sample_images, split_digits,
                                             train_pixel_ddpm)

    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.time()
    workdir = workdir or os.path.splitext(out)[0] + "_work"
    cfg = PixelDDPMConfig(members=members, steps=steps, seed=seed)
    t = time.time()
    model_dir = train_pixel_ddpm(os.path.join(workdir, f"pixel-ddpm-{cfg.digest()}"), cfg, progress=progress)
    seconds = {"train": time.time() - t}
    member_idx, rest = split_digits(members, seed)
    t = time.time()
    generated = sample_images(model_dir, members, seed=seed + 1000, sampler=sampler, steps=sample_steps,
                              progress=progress)
    seconds["sample"] = time.time() - t
    images = {"member": digits_images(member_idx), "generated": generated, "external": digits_images(rest[:members])}
    pixels = torch.cat([images[o] for o in ORIGINS])
    labels = np.concatenate([[o] * len(images[o]) for o in ORIGINS])
    model = load_diffusion_model(model_dir)
    T = int(model.scheduler.config.num_train_timesteps)
    grid = default_timesteps(T, timesteps)

    t = time.time()
    full = trajectory_features(model, pixels, FeatureSpec(tuple(grid), layer_norms=True), batch_size=batch_size,
                               progress=progress)
    seconds["features"] = time.time() - t
    pia = trajectory_features(model, pixels, pia_spec(grid), batch_size=batch_size, progress=progress)
    wgrids = window_grids(T, timesteps, windows)
    union = sorted(set(grid).union(*wgrids))
    loss_only = trajectory_features(model, pixels, FeatureSpec(tuple(union), families=("loss",)),
                                    batch_size=batch_size, progress=progress)
    seconds["baseline_features"] = time.time() - t - seconds["features"]
    feature_dir = os.path.join(workdir, f"features-{cfg.digest()}-{sampler}{sample_steps}")
    row_ids = [f"{lab}/{k}" for k, lab in enumerate(labels)]  # kept for re-analysis (rows: member, generated, external)
    for name, fs in (("trajectory", full), ("pia", pia), ("loss_windows", loss_only)):
        write_features(os.path.join(feature_dir, f"{name}.h5"), dataclasses.replace(fs, ids=row_ids))

    # per-class half split, the same rows for every method
    train_rows, test_rows = [], []
    for k, o in enumerate(ORIGINS):
        rows = np.flatnonzero(labels == o)
        a, b = _split(len(rows), seed * 7919 + k)
        train_rows.append(rows[a])
        test_rows.append(rows[b])
    tr, te = np.concatenate(train_rows), np.concatenate(test_rows)
    y_tr, y_te = labels[tr], labels[te]
    is_member_te = y_te == "member"
    mx_tr = np.isin(y_tr, ("member", "external"))  # membership task: members vs external only
    mx_te = np.isin(y_te, ("member", "external"))

    def probe_results(X: np.ndarray) -> tuple[dict, dict]:
        """Ternary report, and member-vs-external report of a probe trained on those two classes only."""
        probe = LinearProbe(C=C).fit(X[tr], y_tr)
        tern = ovr_report(probe.predict_proba(X[te]), y_te, probe.classes)
        binary = LinearProbe(C=C).fit(X[tr][mx_tr], y_tr[mx_tr])
        p = binary.predict_proba(X[te][mx_te])[:, binary.classes.index("member")]
        mem = binary_report(p, y_te[mx_te] == "member", predictions=p >= 0.5)
        return tern, mem

    matrices = {
        "trajectory": feature_matrix(full)[0],
        "trajectory_loss": feature_matrix(full, ("loss",))[0],
        "pia_trajectory": feature_matrix(pia, ("loss",))[0],
        "gsa": gsa_features(full)[0],
        "pixels": pixel_features(pixels),
    }
    methods, membership, details = {}, {}, {}
    for name, X in matrices.items():
        tern, mem = probe_results(X)
        methods[name] = {**_metrics(tern), "task": "ternary"}
        details[name] = tern["per_class"]
        membership[name] = {**_metrics(mem), "task": "member-vs-external"}
    attacks = {}
    for name, fs in (("loss_threshold", full), ("pia", pia)):
        losses = fs.values["loss"]
        attack = ThresholdAttack().fit(losses[tr][mx_tr], y_tr[mx_tr] == "member", fs.timesteps)
        attacks[name] = attack
        s = attack.score(losses[te])
        methods[name] = {**_metrics(binary_report(s, is_member_te, attack.predict(losses[te]))),
                         "task": "member-vs-rest", "t": attack.t}
        membership[name] = {**_metrics(binary_report(s[mx_te], is_member_te[mx_te], attack.predict(losses[te])[mx_te])),
                            "task": "member-vs-external", "t": attack.t}

    claims = {
        "a_generated_flagged_more_than_members": _claim_a(attacks["loss_threshold"], full, tr, te, y_tr, y_te, labels),
        "b_whole_trajectory_beats_windows": _claim_b(loss_only, grid, wgrids, probe_results),
        "c_gradients_add_over_loss": {
            "holds": bool(methods["trajectory"]["auc"] > methods["trajectory_loss"]["auc"]),
            "ternary": {"all_features": methods["trajectory"], "loss_only": methods["trajectory_loss"]},
            "membership": {"all_features": membership["trajectory"], "loss_only": membership["trajectory_loss"]},
        },
    }
    n_images = len(pixels)
    model_attribution = None
    if attribution:
        t = time.time()
        model_attribution = _model_attribution(model, full, images, labels, cfg, workdir, sampler, sample_steps,
                                               batch_size, C, progress)
        seconds["model_attribution"] = time.time() - t
    result = {
        "methods": methods,
        "membership": membership,
        "per_class": details,
        "claims": claims,
        "model_attribution": model_attribution,
        "throughput": {"images": n_images, "timesteps": len(grid), "feature_seconds": round(seconds["features"], 2),
                       "images_per_second": round(n_images / seconds["features"], 3),
                       "features": "loss, ‖∇x L‖², ‖∇θ L‖² (all UNet parameters, per-tensor norms kept)",
                       "torch_threads": torch.get_num_threads()},
        "config": {"members": members, "seed": seed, "timesteps": grid, "steps": steps, "sampler": sampler,
                   "sample_steps": sample_steps, "windows": wgrids, "batch_size": batch_size, "C": C,
                   "model": model_dir, "train_per_class": len(tr) // 3, "test_per_class": len(te) // 3,
                   "classifier": "z-scored log features + L2 logistic regression (sklearn lbfgs)"},
        "features_dir": feature_dir,
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.time() - t_start, 1)},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    try:
        result["figure"] = _figure(os.path.splitext(out)[0] + ".png", full, labels, result)
    except Exception as err:  # a figure is a convenience; never lose the numbers over it
        result["figure"] = f"not written: {err}"
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    if progress:
        print(format_table(result))
    return result


def _model_attribution(model_a, full, images, labels, cfg, workdir, sampler, sample_steps, batch_size, C,
                       progress) -> dict:
    """Generations of model A, of model B (same recipe, seed + 1, other members) and external digits, scored under
    both models; a ModelAttributor (classes A, B, external) and the training-free lowest-loss rule."""
    from montrage.origin.features import concat_feature_sets, trajectory_features
    from montrage.origin.metrics import balanced_accuracy
    from montrage.origin.model import load_diffusion_model
    from montrage.origin.model_attribution import ModelAttributor, lowest_loss_attribution
    from montrage.recipes.pixel_ddpm import sample_images, train_pixel_ddpm

    cfg_b = dataclasses.replace(cfg, seed=cfg.seed + 1)
    dir_b = train_pixel_ddpm(os.path.join(workdir, f"pixel-ddpm-{cfg_b.digest()}"), cfg_b, progress=progress)
    model_b = load_diffusion_model(dir_b)
    gen_b = sample_images(dir_b, cfg.members, seed=cfg.seed + 2000, sampler=sampler, steps=sample_steps,
                          progress=progress)
    under_a = concat_feature_sets([
        full.subset(labels == "generated"),
        trajectory_features(model_a, gen_b, full.spec, batch_size=batch_size, progress=progress),
        full.subset(labels == "external")])
    pixels = torch.cat([images["generated"], gen_b, images["external"]])
    under_b = trajectory_features(model_b, pixels, full.spec, batch_size=batch_size, progress=progress)
    y = np.concatenate([["A"] * len(images["generated"]), ["B"] * len(gen_b), ["external"] * len(images["external"])])
    tr, te = [], []
    for k, c in enumerate(("A", "B", "external")):
        rows = np.flatnonzero(y == c)
        a, b = _split(len(rows), cfg.seed * 7919 + 100 + k)
        tr.append(rows[a])
        te.append(rows[b])
    tr, te = np.concatenate(tr), np.concatenate(te)
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


def _claim_a(attack, full, tr, te, y_tr, y_te, labels) -> dict:
    """Share of each class flagged "member" by the loss-threshold attack (t and τ fit on train members vs external),
    at the chosen t and at every t of the grid (the paper's Table 1)."""
    from montrage.origin.metrics import best_threshold

    losses = full.values["loss"]
    flagged = attack.predict(losses[te])
    rates = {o: float(np.mean(flagged[y_te == o])) for o in ORIGINS}
    per_t = {}
    mx = np.isin(y_tr, ("member", "external"))
    for j, t in enumerate(full.timesteps):
        thr = best_threshold(-losses[tr][mx, j], y_tr[mx] == "member")
        f = -losses[te, j] >= thr
        per_t[str(t)] = {o: float(np.mean(f[y_te == o])) for o in ORIGINS}
    mean_log_loss = {o: float(np.mean(np.log(losses[labels == o]))) for o in ORIGINS}
    share = float(np.mean([v["generated"] > v["member"] for v in per_t.values()]))
    return {"holds": bool(rates["generated"] > rates["member"]), "t": attack.t, "flagged_as_member": rates,
            "share_of_timesteps_where_it_holds": share, "flagged_per_t": per_t, "mean_log_loss": mean_log_loss}


def _claim_b(loss_only, grid, wgrids, probe_results) -> dict:
    """Loss-only linear probe on the uniform grid vs on each window of the same number of timesteps."""
    from montrage.origin.classifier import feature_matrix

    def score(ts):
        tern, mem = probe_results(feature_matrix(loss_only.at_timesteps(ts), ("loss",))[0])
        return {"membership_auc": mem["auc"], "ternary_auc": tern["auc"], "membership_tpr@1%fpr": mem["tpr@1%fpr"]}

    uniform = score(grid)
    wins = {f"t={w[0]}..{w[-1]}": score(w) for w in wgrids}
    best = max(wins.values(), key=lambda r: r["membership_auc"])
    best_tern = max(r["ternary_auc"] for r in wins.values())
    return {"holds": bool(uniform["membership_auc"] > best["membership_auc"]),
            "holds_ternary": bool(uniform["ternary_auc"] > best_tern),
            "uniform": uniform, "windows": wins}


def _figure(path: str, full, labels, result) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ts = np.asarray(full.timesteps)
    logl = np.log(full.values["loss"])
    centre = logl.mean(axis=0)  # per-t mean over all images: the classes' differences are what matters
    for o in ORIGINS:
        d = logl[labels == o] - centre
        sem = d.std(0) / np.sqrt(len(d))
        ax[0].plot(ts, d.mean(0), label=o)
        ax[0].fill_between(ts, d.mean(0) - 2 * sem, d.mean(0) + 2 * sem, alpha=0.2)
    ax[0].axhline(0, color="grey", lw=0.5)
    ax[0].set(xlabel="timestep t", ylabel="log L_t minus its mean over all images (± 2 s.e.)",
              title="loss along the trajectory, by origin")
    ax[0].legend()
    names = [m for m in result["methods"]]
    x = np.arange(len(names))
    for k, key in enumerate(("auc", "balanced_accuracy")):
        ax[1].bar(x + 0.4 * k - 0.2, [result["methods"][m][key] for m in names], width=0.4, label=key)
    ax[1].set_xticks(x, names, rotation=30, ha="right")
    ax[1].set(ylim=(0, 1.15), title="test split (ternary; threshold attacks: member vs rest)")
    ax[1].legend(loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(result: dict) -> str:
    lines = [f"{'method':18s} {'task':20s}" + "".join(f"{k:>20s}" for k in METRIC_KEYS)]
    for section in ("methods", "membership"):
        for name, r in result[section].items():
            lines.append(f"{name:18s} {r['task']:20s}" + "".join(f"{r[k]:20.3f}" for k in METRIC_KEYS))
    c = result["claims"]
    lines.append(f"(a) generated flagged more than members: {c['a_generated_flagged_more_than_members']['holds']} "
                 f"{c['a_generated_flagged_more_than_members']['flagged_as_member']}")
    lines.append(f"(b) whole trajectory beats every window: {c['b_whole_trajectory_beats_windows']['holds']} "
                 f"(uniform {c['b_whole_trajectory_beats_windows']['uniform']['membership_auc']:.3f}, windows "
                 + ", ".join(f"{k} {v['membership_auc']:.3f}" for k, v in c['b_whole_trajectory_beats_windows']['windows'].items()) + ")")
    lines.append(f"(c) gradients add over loss: {c['c_gradients_add_over_loss']['holds']}")
    if result.get("model_attribution"):
        m = result["model_attribution"]
        lines.append(f"model attribution (A / B / external): balanced accuracy {m['balanced_accuracy']:.3f}, per source "
                     f"{m['accuracy_per_source']}, lowest-loss rule on generations {m['lowest_loss_accuracy_on_generations']:.3f}")
    lines.append(f"feature extraction: {result['throughput']['images_per_second']} images/s "
                 f"({result['throughput']['timesteps']} timesteps, loss + both gradient norms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="origin-attribution benchmark on a pixel DDPM trained on digits")
    p.add_argument("--out", default="origin_results.json")
    p.add_argument("--members", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=int, default=20)
    p.add_argument("--steps", type=int, default=1000, help="DDPM training steps (batch 128)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--workdir", default=None, help="where the trained model is cached (default: <out>_work/)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--attribution", action="store_true", help="also train a second model and score model attribution")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    result = run_origin_bench(args.out, members=args.members, seed=args.seed, timesteps=args.timesteps, steps=args.steps,
                     sampler=args.sampler, sample_steps=args.sample_steps, windows=args.windows,
                     batch_size=args.batch_size, C=args.C, workdir=args.workdir, threads=args.threads,
                     attribution=args.attribution, progress=not args.quiet)
    if args.quiet:
        print(format_table(result))


if __name__ == "__main__":
    main()
