"""The origin benchmark's evaluation, shared by its halves: timestep grids, the shifted set, feature extraction,
every method on one seed's train / test split in the four blocks, the paper's claims, and the mean ± std over
seeds."""

from __future__ import annotations

import time

import numpy as np
import torch

from montrage.bench.seeds import mean_std

ORIGINS = ("member", "generated", "external")


METRIC_KEYS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy")


BLOCKS = ("methods", "member_vs_rest", "membership", "member_vs_external")


ATTACKS = ("loss_threshold", "pia")


def window_grids(num_train_timesteps: int, count: int, windows: int) -> list[list[int]]:
    """`windows` contiguous, equal parts of [0, T), each sampled at `count` evenly spaced timesteps: the same query
    budget as the uniform grid, concentrated in one part of the trajectory (the paper's t = 0..249, 250..499, ...)."""
    width = num_train_timesteps / windows
    return [sorted({int(k * width + np.floor(i * width / count)) for i in range(count)}) for k in range(windows)]


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def _metrics(rep: dict) -> dict:
    return {k: float(rep[k]) for k in METRIC_KEYS}


def shifted_digits(indices, size: int = 16) -> torch.Tensor:
    """The shifted external set: digits rotated by 90° (8-bit quantised like every scored image)."""
    from montrage.recipes.pixel_ddpm import digits_images

    return torch.rot90(digits_images(indices, size), 1, dims=(2, 3)).contiguous()


# --- features and evaluation shared by both halves ------------------------------------------------------------------
def extract_features(
    model,
    pixels: torch.Tensor,
    grid: list[int],
    wgrids: list[list[int]],
    draws: int,
    batch_size: int,
    progress: bool,
    captions: list[str] | None = None,
    clid_captions: list[str] | None = None,
) -> tuple[dict, dict]:
    """montrage's default trajectory features (with per-tensor norms for GSA; their PIA-noise losses `loss_pia` are
    also PIA's input), and losses on the union of the uniform grid and the windows (claim b); seconds for each. `captions`: one
    text condition per image (latent models), the same for every feature set, so every model-based method sees the
    same conditioning. `clid_captions`: each image's own caption, for CLiD's families (set `clid`)."""
    from montrage.origin.baselines import clid_spec
    from montrage.origin.feature_set import FeatureSpec, default_families
    from montrage.origin.features import trajectory_features
    from montrage.origin.from_store import snapshot_rows

    seconds, sets = {}, {}
    union = sorted(set(grid).union(*wgrids))
    specs = {
        "trajectory": FeatureSpec(tuple(grid), families=default_families(model), layer_norms=True, draws=draws),
        "loss_windows": FeatureSpec(tuple(union), families=("loss",), draws=draws),
    }
    if clid_captions is not None:
        specs["clid"] = clid_spec(grid, draws)
    rows = snapshot_rows(model)
    if len(rows) >= 2:  # a model rebuilt from its store: the loss under every stored adapter
        specs["snapshots"] = FeatureSpec(tuple(grid), families=("loss_snapshots",), draws=draws, snapshots=rows)
    for name, spec in specs.items():
        t = time.time()
        sets[name] = trajectory_features(
            model,
            pixels,
            spec,
            captions=clid_captions if name == "clid" else captions,
            batch_size=batch_size,
            progress=progress,
        )
        seconds[name] = time.time() - t
    return sets, seconds


def class_split(labels: np.ndarray, seed: int, classes=ORIGINS, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half of each class for training, the other half for testing; the same rows for every method."""
    train_rows, test_rows = [], []
    for k, o in enumerate(classes):
        rows = np.flatnonzero(labels == o)
        a, b = _split(len(rows), seed * 7919 + offset + k)
        train_rows.append(rows[a])
        test_rows.append(rows[b])
    return np.concatenate(train_rows), np.concatenate(test_rows)


def evaluate(
    sets: dict,
    pixels: torch.Tensor,
    labels: np.ndarray,
    sources: np.ndarray,
    grid: list[int],
    wgrids: list[list[int]],
    seed: int,
    C: float,
) -> dict:
    """Every method on the test split: the methods / member_vs_rest / membership blocks, per-class figures of the
    probes, and the claims."""
    from montrage.origin.baselines import ThresholdAttack, clid_losses, gsa_features, pixel_features
    from montrage.origin.classifier import LogisticModel, feature_matrix, present_families
    from montrage.origin.feature_set import CLID_FAMILIES, FAMILIES, PIA_FAMILIES, REFERENCE_FAMILIES, SNAPSHOT_FAMILIES
    from montrage.origin.metrics import binary_report, ovr_report

    full, loss_only = sets["trajectory"], sets["loss_windows"]
    tr, te = class_split(labels, seed)
    y_tr, y_te = labels[tr], labels[te]
    is_member_te = y_te == "member"
    mx_tr = np.isin(y_tr, ("member", "external"))  # membership task: members vs external only
    mx_te = np.isin(y_te, ("member", "external"))
    # member vs held-out images of the members' own distribution: the split pixels cannot tell apart
    same = np.isin(sources, ("member", "external:held-out"))
    sx_tr, sx_te = same[tr], same[te]

    def classifier_results(X: np.ndarray, C=C) -> tuple[dict, dict, dict, dict]:
        """Ternary report, its member-vs-rest report (member probability), the member-vs-external report of a
        model trained on those two classes only, and the member-vs-held-out one (likewise, without the shifted set)."""
        model = LogisticModel(C=C).fit(X[tr], y_tr)
        proba = model.predict_proba(X[te])
        tern = ovr_report(proba, y_te, model.classes)
        p_member = proba[:, model.classes.index("member")]
        vs_rest = binary_report(
            p_member, is_member_te, predictions=np.argmax(proba, axis=1) == model.classes.index("member")
        )
        binary = LogisticModel(C=C).fit(X[tr][mx_tr], y_tr[mx_tr])
        p = binary.predict_proba(X[te][mx_te])[:, binary.classes.index("member")]
        mem = binary_report(p, y_te[mx_te] == "member", predictions=p >= 0.5)
        held = LogisticModel(C=C).fit(X[tr][sx_tr], y_tr[sx_tr])
        p = held.predict_proba(X[te][sx_te])[:, held.classes.index("member")]
        return tern, vs_rest, mem, binary_report(p, y_te[sx_te] == "member", predictions=p >= 0.5)

    def ternary_and_membership(X: np.ndarray) -> tuple[dict, dict]:
        tern, _, mem, _ = classifier_results(X)
        return tern, mem

    everything = present_families(full)
    # name: (matrix, C). `trajectory` is montrage's classifier (every default family, C by cross-validation);
    # `trajectory_paper` the paper's recipe (loss, ∇x, ∇θ; C fixed); the rest are ablations between the two.
    matrices = {
        "trajectory": (feature_matrix(full, everything)[0], "auto"),
        "trajectory_paper": (feature_matrix(full, FAMILIES)[0], C),
        "trajectory_paper_cv": (feature_matrix(full, FAMILIES)[0], "auto"),
        "trajectory_no_pia": (feature_matrix(full, tuple(f for f in everything if f not in PIA_FAMILIES))[0], "auto"),
        "trajectory_loss": (feature_matrix(full, ("loss",))[0], C),
        "pia_trajectory": (feature_matrix(full, ("loss_pia",))[0], C),
        "gsa": (gsa_features(full)[0], C),
        "pixels": (pixel_features(pixels), C),
    }
    if any(f in everything for f in REFERENCE_FAMILIES):
        no_ref = tuple(f for f in everything if f not in REFERENCE_FAMILIES)
        matrices["trajectory_no_ref"] = (feature_matrix(full, no_ref)[0], "auto")
    if "clid" in sets:  # CLiD's discrepancies as a feature family of montrage's classifier
        matrices["trajectory_clid"] = (
            np.concatenate([matrices["trajectory"][0], feature_matrix(sets["clid"], CLID_FAMILIES)[0]], axis=1),
            "auto",
        )
    if "snapshots" in sets:  # the training trajectory (loss under each stored adapter), alone and added
        snap = feature_matrix(sets["snapshots"], SNAPSHOT_FAMILIES)[0]
        matrices["snapshot_loss"] = (snap, "auto")
        matrices["trajectory_snapshots"] = (np.concatenate([matrices["trajectory"][0], snap], axis=1), "auto")
    # GSA's per-tensor gradient norms as a family of montrage's classifier (a candidate for the default)
    matrices["trajectory_gsa"] = (np.concatenate([matrices["trajectory"][0], matrices["gsa"][0]], axis=1), "auto")
    blocks = {b: {} for b in BLOCKS}
    per_class = {}
    for name, (X, c) in matrices.items():
        tern, vs_rest, mem, held = classifier_results(X, c)
        blocks["methods"][name] = {**_metrics(tern), "task": "ternary"}
        blocks["member_vs_rest"][name] = {**_metrics(vs_rest), "task": "member-vs-rest"}
        blocks["membership"][name] = {**_metrics(mem), "task": "member-vs-external"}
        blocks["member_vs_external"][name] = {**_metrics(held), "task": "member-vs-held-out"}
        per_class[name] = tern["per_class"]
    attacks = {}
    threshold_inputs = [("loss_threshold", full.values["loss"]), ("pia", full.values["loss_pia"])]
    if "clid" in sets:
        threshold_inputs.append(("clid", clid_losses(sets["clid"])))
    for name, losses in threshold_inputs:
        attack = ThresholdAttack().fit(losses[tr][mx_tr], y_tr[mx_tr] == "member", full.timesteps)
        attacks[name] = attack
        s, flagged = attack.score(losses[te]), attack.predict(losses[te])
        blocks["methods"][name] = {
            **_metrics(binary_report(s, is_member_te, flagged)),
            "task": "member-vs-rest",
            "t": attack.t,
        }
        blocks["membership"][name] = {
            **_metrics(binary_report(s[mx_te], is_member_te[mx_te], flagged[mx_te])),
            "task": "member-vs-external",
            "t": attack.t,
        }
        rest = ThresholdAttack().fit(losses[tr], y_tr == "member", full.timesteps)  # the same data as the probes
        blocks["member_vs_rest"][name] = {
            **_metrics(binary_report(rest.score(losses[te]), is_member_te, rest.predict(losses[te]))),
            "task": "member-vs-rest",
            "t": rest.t,
        }
        held = ThresholdAttack().fit(losses[tr][sx_tr], y_tr[sx_tr] == "member", full.timesteps)
        s = held.score(losses[te][sx_te])
        blocks["member_vs_external"][name] = {
            **_metrics(binary_report(s, is_member_te[sx_te], held.predict(losses[te][sx_te]))),
            "task": "member-vs-held-out",
            "t": held.t,
        }

    m = blocks["methods"]
    claims = {
        "a_generated_flagged_more_than_members": _claim_a(
            attacks["loss_threshold"], full, tr, te, y_tr, y_te, labels, sources[te]
        ),
        "b_whole_trajectory_beats_windows": _claim_b(loss_only, grid, wgrids, ternary_and_membership),
        "c_gradients_add_over_loss": {  # the paper's features against their loss-only part, both at the fixed C
            "holds": bool(m["trajectory_paper"]["auc"] > m["trajectory_loss"]["auc"]),
            "ternary": {"all_features": m["trajectory_paper"], "loss_only": m["trajectory_loss"]},
            "membership": {
                "all_features": blocks["membership"]["trajectory_paper"],
                "loss_only": blocks["membership"]["trajectory_loss"],
            },
        },
        "acceptance_trajectory_beats_thresholds": acceptance(blocks),
    }
    return {
        **blocks,
        "per_class": per_class,
        "claims": claims,
        "test_per_class": int(len(te) // 3),
        "train_per_class": int(len(tr) // 3),
    }


def acceptance(blocks: dict) -> dict:
    """Does `trajectory` beat loss_threshold and pia on AUC and TPR@1%FPR? `as_stated`: the ternary classifier's
    averaged one-vs-rest figures against the attacks' member-vs-rest ones (`methods`); `same_task`: its member
    probability against the attacks on member-vs-rest (`member_vs_rest`)."""
    out = {}
    for name, block in (("as_stated", "methods"), ("same_task", "member_vs_rest")):
        b = blocks[block]
        wins = {f"{a}/{k}": bool(b["trajectory"][k] > b[a][k]) for a in ATTACKS for k in ("auc", "tpr@1%fpr")}
        out[name] = {"holds": all(wins.values()), "wins": wins, "block": block}
    out["holds"] = out["as_stated"]["holds"] and out["same_task"]["holds"]
    return out


def _claim_a(attack, full, tr, te, y_tr, y_te, labels, sources_te) -> dict:
    """Share of each class flagged "member" by the loss-threshold attack (t and τ fit on train members vs external),
    at the chosen t and at every t of the grid (the paper's Table 1); external also split by source."""
    from montrage.origin.metrics import best_threshold

    losses = full.values["loss"]
    flagged = attack.predict(losses[te])
    rates = {o: float(np.mean(flagged[y_te == o])) for o in ORIGINS}
    by_source = {
        s: float(np.mean(flagged[sources_te == s])) for s in sorted(set(sources_te)) if s.startswith("external:")
    }
    per_t = {}
    mx = np.isin(y_tr, ("member", "external"))
    for j, t in enumerate(full.timesteps):
        thr = best_threshold(-losses[tr][mx, j], y_tr[mx] == "member")
        f = -losses[te, j] >= thr
        per_t[str(t)] = {o: float(np.mean(f[y_te == o])) for o in ORIGINS}
    mean_log_loss = {o: float(np.mean(np.log(losses[labels == o]))) for o in ORIGINS}
    share = float(np.mean([v["generated"] > v["member"] for v in per_t.values()]))
    return {
        "holds": bool(rates["generated"] > rates["member"]),
        "t": attack.t,
        "flagged_as_member": rates,
        "flagged_external_by_source": by_source,
        "share_of_timesteps_where_it_holds": share,
        "flagged_per_t": per_t,
        "mean_log_loss": mean_log_loss,
    }


def _claim_b(loss_only, grid, wgrids, classifier_results) -> dict:
    """Loss-only logistic model on the uniform grid vs on each window of the same number of timesteps."""
    from montrage.origin.classifier import feature_matrix

    def score(ts):
        tern, mem = classifier_results(feature_matrix(loss_only.at_timesteps(ts), ("loss",))[0])  # ternary, membership
        return {"membership_auc": mem["auc"], "ternary_auc": tern["auc"], "membership_tpr@1%fpr": mem["tpr@1%fpr"]}

    uniform = score(grid)
    wins = {f"t={w[0]}..{w[-1]}": score(w) for w in wgrids}
    best = max(wins.values(), key=lambda r: r["membership_auc"])
    best_tern = max(r["ternary_auc"] for r in wins.values())
    return {
        "holds": bool(uniform["membership_auc"] > best["membership_auc"]),
        "holds_ternary": bool(uniform["ternary_auc"] > best_tern),
        "uniform": uniform,
        "windows": wins,
    }


def throughput(n_images: int, grid: list[int], draws: int, seconds: float, what: str) -> dict:
    return {
        "images": n_images,
        "timesteps": len(grid),
        "draws": draws,
        "feature_seconds": round(seconds, 2),
        "images_per_second": round(n_images / seconds, 3),
        "image_timesteps_per_second": round(n_images * len(grid) * draws / seconds, 1),
        "features": what,
        "torch_threads": torch.get_num_threads(),
    }


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every metric of every block (std and per-seed values under `std` and `seeds`), and the
    claims summarised over seeds."""
    out = {}
    for block in BLOCKS:
        out[block] = {}
        for name, first in per_seed[0][block].items():
            entry, std, vals = {}, {}, {}
            for k in METRIC_KEYS:
                v = [r[block][name][k] for r in per_seed]
                entry[k], std[k] = mean_std(v)
                vals[k] = v
            entry.update({"task": first["task"], "std": std, "seeds": vals})
            if "t" in first:
                entry["t"] = [r[block][name]["t"] for r in per_seed]
            out[block][name] = entry
    out["claims"] = aggregate_claims([r["claims"] for r in per_seed], out)
    tp = [r["throughput"] for r in per_seed]
    out["throughput"] = {
        **tp[0],
        "images_per_second": mean_std([x["images_per_second"] for x in tp])[0],
        "images_per_second_std": mean_std([x["images_per_second"] for x in tp])[1],
        "feature_seconds": [x["feature_seconds"] for x in tp],
    }
    if per_seed[0].get("model_attribution"):
        ma = [r["model_attribution"] for r in per_seed]
        out["model_attribution"] = {
            k: {"mean": mean_std([m[k] for m in ma])[0], "std": mean_std([m[k] for m in ma])[1]}
            for k in ("balanced_accuracy", "lowest_loss_accuracy_on_generations")
        }
        out["model_attribution"]["accuracy_per_source"] = {
            c: mean_std([m["accuracy_per_source"][c] for m in ma])[0] for c in ma[0]["accuracy_per_source"]
        }
    return out


def aggregate_claims(claims: list[dict], agg: dict) -> dict:
    n = len(claims)
    a = [c["a_generated_flagged_more_than_members"] for c in claims]
    rates = {o: mean_std([x["flagged_as_member"][o] for x in a]) for o in a[0]["flagged_as_member"]}
    claim_a = {
        "holds": bool(rates["generated"][0] > rates["member"][0]),
        "holds_in_seeds": f"{sum(x['holds'] for x in a)}/{n}",
        "flagged_as_member": {o: {"mean": m, "std": s} for o, (m, s) in rates.items()},
        "t": [x["t"] for x in a],
        "share_of_timesteps_where_it_holds": mean_std([x["share_of_timesteps_where_it_holds"] for x in a])[0],
    }
    b = [c["b_whole_trajectory_beats_windows"] for c in claims]
    uni = {k: mean_std([x["uniform"][k] for x in b]) for k in b[0]["uniform"]}
    wins = {w: {k: mean_std([x["windows"][w][k] for x in b]) for k in b[0]["windows"][w]} for w in b[0]["windows"]}
    best = max(wins, key=lambda w: wins[w]["membership_auc"][0])
    best_tern = max(wins, key=lambda w: wins[w]["ternary_auc"][0])
    claim_b = {
        "holds": bool(uni["membership_auc"][0] > wins[best]["membership_auc"][0]),
        "holds_ternary": bool(uni["ternary_auc"][0] > wins[best_tern]["ternary_auc"][0]),
        "holds_in_seeds": f"{sum(x['holds'] for x in b)}/{n}",
        "best_window": best,
        "uniform": {k: {"mean": m, "std": s} for k, (m, s) in uni.items()},
        "windows": {w: {k: {"mean": m, "std": s} for k, (m, s) in v.items()} for w, v in wins.items()},
    }
    m = agg["methods"]
    claim_c = {
        "holds": bool(m["trajectory_paper"]["auc"] > m["trajectory_loss"]["auc"]),
        "holds_in_seeds": f"{sum(c['c_gradients_add_over_loss']['holds'] for c in claims)}/{n}",
        "features": "the paper's (loss, ∇x, ∇θ) against their loss part, both at the fixed C",
        **{
            f"{k}_{name}": {
                "all_features": (m["trajectory_paper"][k], m["trajectory_paper"]["std"][k]),
                "loss_only": (m["trajectory_loss"][k], m["trajectory_loss"]["std"][k]),
            }
            for name, k in (("ternary", "auc"), ("ternary", "tpr@1%fpr"))
        },
        "membership_auc": {
            "all_features": agg["membership"]["trajectory_paper"]["auc"],
            "loss_only": agg["membership"]["trajectory_loss"]["auc"],
        },
    }
    return {
        "a_generated_flagged_more_than_members": claim_a,
        "b_whole_trajectory_beats_windows": claim_b,
        "c_gradients_add_over_loss": claim_c,
        "acceptance_trajectory_beats_thresholds": {
            **acceptance(agg),
            "holds_in_seeds": f"{sum(c['acceptance_trajectory_beats_thresholds']['holds'] for c in claims)}/{n}",
        },
    }
