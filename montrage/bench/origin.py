"""Origin-attribution benchmark: trajectory classifier vs the paper's baselines, on two models, over seeds.

Two halves, each scored on a per-class half split (train / test) of member / generated / external images:

  pixel  (the default benchmark) `recipes/pixel_ddpm.py` trained on `members` digits (cached by config), as many of
         its generations, and as many external images: half held-out digits, half a shifted set (held-out digits
         rotated by 90°, a distribution the model never saw).
  lora   the tiny latent text-to-image base (`montrage tiny-base`) LoRA-customized with `DiffusionFineTune` on
         `lora_per_concept` digits of each of `lora_concepts` (the members), generations of the customized model from
         the concept prompts, and external images (held-out digits of the same concepts, which only the base's
         pre-training saw, and rotated ones). Features under base + LoRA with the empty prompt, ∇θ = the LoRA; the
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
import hashlib
import json
import os
import time

import numpy as np
import torch

from montrage.errors import MontrageError

ORIGINS = ("member", "generated", "external")
METRIC_KEYS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy")
BLOCKS = ("methods", "member_vs_rest", "membership", "member_vs_external")
ATTACKS = ("loss_threshold", "pia")
CACHE_VERSION = "v5"
LORA_PROMPTS = ("empty", "caption")  # text condition of the LoRA half's features (see lora_seed)


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


def parse_seeds(text) -> list[int]:
    """'0,1,2' or '0-2' (or an int) -> [0, 1, 2]."""
    if isinstance(text, int):
        return [text]
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                seeds.extend(range(int(a), int(b) + 1))
            else:
                seeds.append(int(part))
        except ValueError as err:
            raise MontrageError(f"--seed takes integers like 0 or 0,1,2 or 0-2, not {text!r}.") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise MontrageError(f"--seed needs distinct seeds, got {text!r}.")
    return seeds


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
    from montrage.origin.features import FeatureSpec, default_families, trajectory_features
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
    from montrage.origin.features import CLID_FAMILIES, FAMILIES, PIA_FAMILIES, REFERENCE_FAMILIES, SNAPSHOT_FAMILIES
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
    from montrage.origin.features import default_timesteps
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
    result["throughput"] = _throughput(
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


def _throughput(n_images: int, grid: list[int], draws: int, seconds: float, what: str) -> dict:
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


# --- the LoRA half -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoraBenchConfig:
    concepts: tuple[int, ...] = (1, 4, 7, 9)
    per_concept: int = 32
    epochs: int = 6
    repeats: int = 25
    learning_rate: float = 1e-2
    rank: int = 8
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|lora-v2"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def lora_split(cfg: LoraBenchConfig) -> tuple[list[int], list[int], list[int]]:
    """Member, held-out external and shifted (to be rotated) digit indices: per concept, a seeded permutation of its
    digits gives `per_concept` members, then half as many held-out and half as many shifted images."""
    from montrage.data import sklearn_digits

    target = sklearn_digits()[1]
    rng = np.random.default_rng(cfg.seed)
    half = cfg.per_concept // 2
    member, held, shifted = [], [], []
    for d in cfg.concepts:
        idx = rng.permutation(np.flatnonzero(target == d))
        if len(idx) < 2 * cfg.per_concept:
            raise MontrageError(f"digit {d} has {len(idx)} images; --lora-per-concept must be at most {len(idx) // 2}.")
        member += idx[: cfg.per_concept].tolist()
        held += idx[cfg.per_concept : cfg.per_concept + half].tolist()
        shifted += idx[cfg.per_concept + half : cfg.per_concept + 2 * half].tolist()
    return member, held, shifted


def fine_tune_with_store(
    examples,
    tokens: dict[str, str],
    base: str,
    out: str,
    cfg: LoraBenchConfig,
    resolution: int | None = None,
    progress: bool = True,
) -> tuple[str, str]:
    """LoRA-fine-tune `base` on `examples` (their captions), monitored by MontrageCallback in deferred mode (the
    store holds the adapter of every epoch, nothing encoded); cached in `out`. Returns (LoRA file, store)."""
    weights = os.path.join(out, "pytorch_lora_weights.safetensors")
    store = os.path.join(out, "store.h5")
    meta = os.path.join(out, "montrage_lora_bench.json")
    if os.path.isfile(weights) and os.path.isfile(meta) and os.path.isfile(store):
        return weights, store
    import pytorch_lightning as pl

    from montrage.callbacks import MontrageCallback
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune

    class Members(ConceptDataModule):
        def examples(self):
            return examples

        def concept_tokens(self):
            return tokens

    t = time.time()
    pl.seed_everything(cfg.seed, verbose=False)
    module = DiffusionFineTune(
        pretrained_model=base, lora_rank=cfg.rank, lora_alpha=cfg.rank, learning_rate=cfg.learning_rate
    )
    data = Members(
        batch_size=32, repeats=cfg.repeats, seed=cfg.seed, **({"resolution": resolution} if resolution else {})
    )
    monitor = MontrageCallback(store_path=store, mode="deferred", probe_seeds=[0], log_to_wandb=False, overwrite=True)
    pl.Trainer(
        max_epochs=cfg.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[monitor],
    ).fit(module, data)
    module.save_weights(out)
    with open(meta, "w") as fh:
        json.dump(
            {
                "config": dataclasses.asdict(cfg),
                "members": [e.id for e in examples],
                "seconds": round(time.time() - t, 1),
            },
            fh,
        )
    return weights, store


def train_lora(cfg: LoraBenchConfig, workdir: str, progress: bool = True, base_config=None) -> tuple[str, str, str]:
    """Fine-tune the tiny base (`base_config`: another tiny base, e.g. an untrained one in tests) on the member
    digits (captions 'a photo of <word>') with `fine_tune_with_store`. Returns (base path, LoRA file, store)."""
    from montrage.data import TrainExample, digit_token, sklearn_digits
    from montrage.recipes.tiny_base import tiny_base_path

    base = tiny_base_path(base_config, progress=progress)
    out = os.path.join(workdir, f"lora-{cfg.digest()}" + ("" if base_config is None else f"-{base_config.digest()}"))
    members, _, _ = lora_split(cfg)
    target = sklearn_digits()[1]
    examples = [
        TrainExample(
            id=f"digits/{i}",
            concept=f"digit{target[i]}",
            caption=f"a photo of {digit_token(int(target[i]))}",
            path=f"sklearn:digits/{i}",
        )
        for i in members
    ]
    tokens = {f"digit{d}": digit_token(d) for d in cfg.concepts}
    return (base,) + fine_tune_with_store(examples, tokens, base, out, cfg, progress=progress)


def lora_seed(
    seed: int,
    workdir: str,
    concepts=(1, 4, 7, 9),
    per_concept: int = 32,
    epochs: int = 6,
    repeats: int = 25,
    learning_rate: float = 1e-2,
    rank: int = 8,
    timesteps: int = 20,
    gen_steps: int = 25,
    guidance: float = 3.0,
    windows: int = 4,
    batch_size: int = 64,
    C: float = 1.0,
    draws: int = 1,
    prompt: str = "empty",
    progress: bool = True,
    base_config=None,
) -> dict:
    """One seed of the LoRA half: fine-tune (or reuse), generate from the concept prompts, extract, evaluate.

    `prompt`: the text condition of every model-based feature. "empty": the empty prompt for all images; "caption":
    each image's natural caption, "a photo of <word>" of its digit: the training caption for members, the generation
    prompt for generations, the concept caption of the digit's class for external images."""
    from montrage.data import digit_token, quantize, sklearn_digits
    from montrage.generate import build_pipeline, generate_probes
    from montrage.origin.features import default_timesteps
    from montrage.origin.from_store import store_diffusion_model
    from montrage.probes import ProbeSet
    from montrage.recipes.pixel_ddpm import digits_images

    if prompt not in LORA_PROMPTS:
        raise MontrageError(f"prompt must be one of {LORA_PROMPTS}, not {prompt!r}.")
    cfg = LoraBenchConfig(tuple(int(c) for c in concepts), per_concept, epochs, repeats, learning_rate, rank, seed)
    t = time.time()
    base, weights, store = train_lora(cfg, workdir, progress, base_config)
    seconds = {"fine_tune": time.time() - t}
    model = store_diffusion_model(store)  # base + final adapter; the store's other snapshots give loss_snapshots
    member_idx, held_idx, shifted_idx = lora_split(cfg)
    size = model.image_size
    t = time.time()
    prompts = tuple(f"a photo of {digit_token(d)}" for d in cfg.concepts)
    probes = ProbeSet(prompts, tuple({} for _ in prompts), tuple(10_000 + 1000 * seed + k for k in range(per_concept)))
    pipe = build_pipeline(model.tokenizer, model.text_encoder, model.vae, model.unet, model.scheduler)
    with torch.no_grad():
        generated = quantize(generate_probes(pipe, probes, size, gen_steps, guidance, batch_size=64))
    seconds["generate"] = time.time() - t
    external = torch.cat([digits_images(held_idx, size), shifted_digits(shifted_idx, size)])
    images = {"member": digits_images(member_idx, size), "generated": generated, "external": external}
    pixels = torch.cat([images[o] for o in ORIGINS])
    labels = np.concatenate([[o] * len(images[o]) for o in ORIGINS])
    sources = np.concatenate(
        [
            labels[: len(member_idx) + len(generated)],
            ["external:held-out"] * len(held_idx),
            ["external:shifted"] * len(shifted_idx),
        ]
    )
    T = int(model.scheduler.config.num_train_timesteps)
    grid = default_timesteps(T, timesteps)
    wgrids = window_grids(T, timesteps, windows)
    target = sklearn_digits()[1]
    caption = lambda i: f"a photo of {digit_token(int(target[i]))}"  # noqa: E731 (the training caption)
    natural = (
        [caption(i) for i in member_idx]
        + [p for p, _ in probes.items()]
        + [caption(i) for i in list(held_idx) + list(shifted_idx)]
    )
    assert len(natural) == len(pixels)
    captions = natural if prompt == "caption" else None
    sets, secs = extract_features(
        model, pixels, grid, wgrids, draws, batch_size, progress, captions, clid_captions=natural
    )  # CLiD always compares each image's own caption
    seconds.update({f"features_{k}": v for k, v in secs.items()})
    result = evaluate(sets, pixels, labels, sources, grid, wgrids, seed, C)
    n_lora = sum(p.numel() for n, p in model.unet.named_parameters() if p.requires_grad)
    result["throughput"] = _throughput(
        len(pixels),
        grid,
        draws,
        secs["trajectory"],
        f"{', '.join(sets['trajectory'].spec.families)} (θ = the LoRA, {n_lora} parameters), via the VAE",
    )
    result["config"] = {
        **dataclasses.asdict(cfg),
        "timesteps": grid,
        "draws": draws,
        "windows": wgrids,
        "generation": {"prompts": list(prompts), "sampler": "ddim", "steps": gen_steps, "guidance_scale": guidance},
        "base": base,
        "lora": weights,
        "store": store,
        "condition": "empty prompt"
        if captions is None
        else "per-image caption 'a photo of <word>' (members: training caption, generated: generation "
        "prompt, external: the digit's concept caption)",
        "batch_size": batch_size,
        "C": C,
        "external": f"{len(held_idx)} held-out digits of the concepts + {len(shifted_idx)} rotated by 90°",
    }
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return result


# --- seeds: cache, aggregate ------------------------------------------------------------------------------------------
def _cached(path: str, key: dict, compute) -> dict:
    """The result stored at `path` when it was computed for the same `key`, else `compute()` (then stored)."""
    if os.path.isfile(path):
        with open(path) as fh:
            stored = json.load(fh)
        if stored.get("cache_key") == key:
            return stored["result"]
    result = compute()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"cache_key": key, "result": result}, fh)
    os.replace(tmp, path)
    return result


def cached_seeds(name: str, seeds, workdir: str, version: str, compute, **kwargs) -> list[dict]:
    """`compute(seed, **kwargs)` for every seed, each cached in `workdir` by its arguments (a config object with a
    `digest` stands for itself)."""
    runs = []
    for seed in seeds:
        key = {
            "seed": seed,
            "version": version,
            **{
                k: v.digest() if hasattr(v, "digest") else list(v) if isinstance(v, tuple) else v
                for k, v in kwargs.items()
            },
        }
        runs.append(_cached(_key_path(workdir, name, seed, key), key, lambda: compute(seed, **kwargs)))
    return runs


def _key_path(workdir: str, half: str, seed: int, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(workdir, f"result-{half}-seed{seed}-{digest}.json")


def _mean_std(values) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(np.nanmean(arr)), float(np.nanstd(arr))


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
                entry[k], std[k] = _mean_std(v)
                vals[k] = v
            entry.update({"task": first["task"], "std": std, "seeds": vals})
            if "t" in first:
                entry["t"] = [r[block][name]["t"] for r in per_seed]
            out[block][name] = entry
    out["claims"] = aggregate_claims([r["claims"] for r in per_seed], out)
    tp = [r["throughput"] for r in per_seed]
    out["throughput"] = {
        **tp[0],
        "images_per_second": _mean_std([x["images_per_second"] for x in tp])[0],
        "images_per_second_std": _mean_std([x["images_per_second"] for x in tp])[1],
        "feature_seconds": [x["feature_seconds"] for x in tp],
    }
    if per_seed[0].get("model_attribution"):
        ma = [r["model_attribution"] for r in per_seed]
        out["model_attribution"] = {
            k: {"mean": _mean_std([m[k] for m in ma])[0], "std": _mean_std([m[k] for m in ma])[1]}
            for k in ("balanced_accuracy", "lowest_loss_accuracy_on_generations")
        }
        out["model_attribution"]["accuracy_per_source"] = {
            c: _mean_std([m["accuracy_per_source"][c] for m in ma])[0] for c in ma[0]["accuracy_per_source"]
        }
    return out


def aggregate_claims(claims: list[dict], agg: dict) -> dict:
    n = len(claims)
    a = [c["a_generated_flagged_more_than_members"] for c in claims]
    rates = {o: _mean_std([x["flagged_as_member"][o] for x in a]) for o in a[0]["flagged_as_member"]}
    claim_a = {
        "holds": bool(rates["generated"][0] > rates["member"][0]),
        "holds_in_seeds": f"{sum(x['holds'] for x in a)}/{n}",
        "flagged_as_member": {o: {"mean": m, "std": s} for o, (m, s) in rates.items()},
        "t": [x["t"] for x in a],
        "share_of_timesteps_where_it_holds": _mean_std([x["share_of_timesteps_where_it_holds"] for x in a])[0],
    }
    b = [c["b_whole_trajectory_beats_windows"] for c in claims]
    uni = {k: _mean_std([x["uniform"][k] for x in b]) for k in b[0]["uniform"]}
    wins = {w: {k: _mean_std([x["windows"][w][k] for x in b]) for k in b[0]["windows"][w]} for w in b[0]["windows"]}
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
                _cached(
                    _key_path(workdir, "pixel", seed, key),
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
                "version": CACHE_VERSION,
            }
            lora_runs.append(
                _cached(
                    _key_path(workdir, "lora", seed, key),
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
    from montrage.origin.features import concat_feature_sets, trajectory_features
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
