"""Origin attribution from a monitoring run's store: the store already holds the members (training images with
captions), the model's own generations (its probes) and the adapter at every snapshot, so a classifier needs only
the user's external images.

`store_diffusion_model` rebuilds the fine-tuned model at its final snapshot (base from the store's `model_path` +
stored adapter) and keeps the store at hand for the training-trajectory family `loss_snapshots`;
`fit_from_store` assembles the three classes, extracts features, reports held-out accuracy and saves a classifier
that `predict_images` (CLI: `montrage origin predict STORE IMAGE...`) reloads through the same store.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from montrage.components import DiffusionModel
from montrage.origin.errors import OriginError
from montrage.origin.feature_set import (
    CLID_FAMILIES,
    SNAPSHOT_FAMILIES,
    FeatureSpec,
    default_families,
    default_timesteps,
)
from montrage.origin.features import trajectory_features

MAX_SNAPSHOTS = 8  # rows of `loss_snapshots` by default: evenly spaced over the run, first and last included


def classifier_path(store_path: str) -> str:
    """Where `montrage origin fit STORE` writes the store's origin classifier, and where readers look for it."""
    return os.path.splitext(store_path)[0] + ".origin"


def is_store(path: str) -> bool:
    """Whether `path` is a montrage store (not a features file or an image)."""
    if not (isinstance(path, str) and os.path.isfile(path)):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "committed" in f and "spec" in f.attrs
    except OSError:
        return False


def store_diffusion_model(store_path: str, model_path: str | None = None, device: str | None = None) -> DiffusionModel:
    """The store's fine-tuned model at its last adapter snapshot, as a DiffusionModel whose `snapshots` loads any
    other snapshot. Refused for a store without adapter snapshots: it does not hold the run's weights."""
    from montrage.family import SDFamily
    from montrage.store import StoreReader
    from montrage.store_model import StoreModel

    store = StoreReader(store_path, features=False)
    try:
        if not store.has_adapters or store.adapter_snapshots == 0:
            raise OriginError(
                f"store {store_path!r} holds no adapter snapshots, so the fine-tuned model cannot be "
                "rebuilt from it: record them with MontrageCallback(save_lora_snapshots=True) on a LoRA "
                "run, or classify with `montrage origin features --model BASE --lora WEIGHTS`."
            )
        sm = StoreModel(store, model_path=model_path, device=device or "cpu")
        sm.set_epoch(store.adapter_snapshots - 1)
    except BaseException:
        store.close()
        raise
    model = sm.model  # its `snapshots` (sm) loads any other stored adapter
    for name, p in model.unet.named_parameters():  # θ of ∇θ: the adapter, as when a LoRA is loaded from a file
        p.requires_grad_("lora_" in name)
    model.family = None if isinstance(sm.family, SDFamily) else sm.family  # SD 1.x/2.x: the plain UNet way
    return model


def snapshot_rows(model: DiffusionModel, count: int | None = None) -> tuple[int, ...]:
    """Up to `count` (default MAX_SNAPSHOTS) stored snapshot rows, evenly spaced, first and last included."""
    held = model.snapshots.store.adapter_snapshots if model.snapshots is not None else 0
    count = MAX_SNAPSHOTS if count is None else int(count)
    if held == 0 or count < 1:
        return ()
    return tuple(sorted({int(round(x)) for x in np.linspace(0, held - 1, min(count, held))}))


def store_feature_spec(
    model: DiffusionModel, families=None, timesteps: int = 10, noise_seed: int = 0, snapshots: int | None = None
) -> FeatureSpec:
    """The feature spec of a store classifier: `families` (default montrage's; the word "default" expands to them,
    e.g. ["default", "loss_snapshots"]) at `timesteps` uniform steps; `loss_snapshots` at `snapshot_rows`. Captions
    condition only CLiD's families; the others stay under the empty prompt, as the benchmark measures them."""
    fams = []
    for f in families or ["default"]:
        fams.extend(default_families(model) if f == "default" else [f])
    fams = tuple(dict.fromkeys(fams))
    rows = snapshot_rows(model, snapshots) if any(f in SNAPSHOT_FAMILIES for f in fams) else ()
    if any(f in SNAPSHOT_FAMILIES for f in fams) and len(rows) < 2:
        raise OriginError(
            f"the loss_snapshots family needs at least two adapter snapshots; store "
            f"{model.snapshots.store.path!r} holds {len(rows)}: snapshot more often (MontrageCallback "
            "every_n_epochs / every_n_steps) or drop the family."
        )
    num_train = int(model.scheduler.config.num_train_timesteps)
    return FeatureSpec(
        tuple(default_timesteps(num_train, timesteps)),
        families=fams,
        noise_seed=noise_seed,
        snapshots=rows,
        captions_for="clid",
    )


def load_external(paths: list[str], size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """The readable images among `paths` (centre-cropped and resized as training images are); unreadable files are
    skipped with a warning; none readable is an error naming the files."""
    from montrage.origin.images import load_images

    good, bad = [], []
    for p in paths:
        try:
            good.append((p, load_images([p], size, channels, resize=True)))
        except OriginError as err:
            bad.append(f"{p}: {err}")
    if not good:
        raise OriginError(
            f"no readable external image among {len(paths)} file(s): "
            + "; ".join(bad[:3])
            + (" ..." if len(bad) > 3 else "")
            + ". Pass a folder of images the model never saw."
        )
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable external image(s): " + "; ".join(bad[:3]), stacklevel=2)
    return torch.cat([x for _, x in good]), [p for p, _ in good]


def store_members(model: DiffusionModel, count: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """Up to `count` training images of the store (a seeded subset), their ids and captions."""
    from montrage.data import DataError, read_example

    train = model.snapshots.store.all_train
    rows = (
        np.sort(np.random.default_rng(seed).permutation(len(train))[:count])
        if count < len(train)
        else np.arange(len(train))
    )
    pixels = []
    for r in rows:
        try:
            pixels.append(read_example(train[r], model.image_size))
        except (DataError, OSError) as err:
            raise OriginError(
                f"training image {train[r].id!r} of store {model.snapshots.store.path!r} cannot be read "
                f"from {train[r].path!r} ({err}): run where the training data is, or pass --members 0 "
                "and give member images yourself."
            ) from err
    return torch.stack(pixels), [train[r].id for r in rows], [train[r].caption for r in rows]


def store_generations(model: DiffusionModel, extra: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The store's probes regenerated with the final adapter (their stored seeds), plus `extra` fresh generations
    of the probe prompts (new seeds), 8-bit quantised as a saved generation is."""
    from montrage.data import quantize
    from montrage.probes import ProbeSet

    sm = model.snapshots
    probes = sm.store.probes
    row = sm.store.adapter_snapshots - 1
    sets = [probes]
    if extra > 0:
        per = -(-extra // len(probes.prompts))
        first = max(probes.seeds) + 1000
        sets.append(ProbeSet(probes.prompts, probes.weights, tuple(range(first, first + per)), probes.concepts))
    images, prompts, ids = [], [], []
    for k, ps in enumerate(sets):
        images.append(quantize(sm.generate(ps, row)))
        prompts += [p for p, _ in ps.items()]
        ids += [f"{'probe' if k == 0 else 'generated'}:{p}|seed={s}" for p, s in ps.items()]
    n = len(probes) + max(0, extra)
    return torch.cat(images)[:n], ids[:n], prompts[:n]


def _split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(holdout * len(idx)))]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def _held_out_report(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    from montrage.origin.metrics import balanced_accuracy

    return {
        "images": int(len(y)),
        "balanced_accuracy": round(balanced_accuracy(y, pred), 4),
        "accuracy_per_class": {
            c: round(float(np.mean(pred[y == c] == c)), 4) if np.any(y == c) else None for c in classes
        },
    }  # None: no held-out image of that class


def fit_from_store(
    store_path: str,
    external: list[str],
    out: str | None = None,
    members: int = 200,
    generate: int | None = None,
    families=None,
    timesteps: int = 10,
    task: str = "ternary",
    external_captions: str | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    model_path: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Fit an origin classifier for the store's fine-tuned model: members = up to `members` training images,
    generated = its probes (+ `generate` more; default: as many as make the class as large as the members),
    external = the images in `external` (files or folders). Held-out accuracy on a `holdout` share of each class,
    then a refit on all, saved to `out` (default `<store>.origin`). Returns the report (also `out`/fit_report.json).

    CLiD families need every image's caption: members and generations have theirs; give the external images' with
    `external_captions` ('sidecar' or a metadata.jsonl). With them, the default families include CLiD's (on per-image
    captions they are the strongest membership signal the benchmark found); without, they are left out."""
    from montrage.origin.classifier import OriginClassifier, relabel
    from montrage.origin.feature_set import concat_feature_sets
    from montrage.origin.images import expand_image_paths, read_captions

    model = store_diffusion_model(store_path, model_path=model_path, device=device)
    if families is None:
        families = ["default"] + (list(CLID_FAMILIES) if external_captions else [])
    spec = store_feature_spec(model, families, timesteps, noise_seed=seed)
    ext_paths = expand_image_paths(list(external))
    ext_pixels, ext_paths = load_external(ext_paths, model.image_size, model.image_channels)
    mem_pixels, mem_ids, mem_caps = store_members(model, members, seed)
    extra = max(0, len(mem_ids) - len(model.snapshots.store.probes)) if generate is None else int(generate)
    gen_pixels, gen_ids, gen_caps = store_generations(model, extra)
    captioned = any(f in CLID_FAMILIES for f in spec.families)
    if captioned and not external_captions:
        raise OriginError(
            f"families {[f for f in spec.families if f in CLID_FAMILIES]} compare each image's loss "
            "under its own caption; the external images have none: give them with --captions "
            "(sidecar <image>.txt files or a metadata.jsonl), or drop the CLiD families."
        )
    ext_caps = read_captions(ext_paths, external_captions) if captioned else None
    groups = {
        "member": (mem_pixels, mem_ids, mem_caps),
        "generated": (gen_pixels, gen_ids, gen_caps),
        "external": (ext_pixels, ext_paths, ext_caps),
    }
    sets = [
        trajectory_features(
            model,
            x,
            spec,
            captions=caps if captioned else None,
            ids=ids,
            label=name,
            batch_size=batch_size,
            progress=progress,
        )
        for name, (x, ids, caps) in groups.items()
    ]
    full = concat_feature_sets(sets)
    labels = np.concatenate([[fs.label] * len(fs) for fs in sets])
    tr, te = _split(labels, holdout, seed)
    report = {
        "store": os.path.abspath(store_path),
        "task": task,
        "families": list(spec.families),
        "timesteps": list(spec.timesteps),
        "snapshots": list(spec.snapshots),
        "counts": {name: len(fs) for name, fs in zip(groups, sets)},
        "seconds_features": round(sum(fs.seconds for fs in sets), 1),
    }
    if len(te) and all(np.sum(labels[tr] == c) >= 2 for c in groups):
        held = OriginClassifier(task=task).fit(full.subset(tr), labels[tr])
        y, pred = relabel(labels[te], task), held.predict(full.subset(te))
        report["held_out"] = _held_out_report(y, pred, held.classes)
    clf = OriginClassifier(task=task).fit(full, labels, model_path=os.path.abspath(store_path))
    out = out or classifier_path(store_path)
    clf.save(out)
    report["classifier"] = out
    report["classes"] = clf.classes
    with open(os.path.join(out, "fit_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def _features_under_stores(
    stores: list[str],
    pixels: torch.Tensor | list[str],
    spec_of,
    batch_size: int = 32,
    progress: bool = True,
    device: str | None = None,
) -> list:
    """Features of `pixels` (or image files, read at the first model's size) under each store's final model, one
    model in memory at a time."""
    from montrage.origin.images import load_images

    out = []
    for store in stores:
        model = store_diffusion_model(store, device=device)
        if not isinstance(pixels, torch.Tensor):
            pixels = load_images(pixels, model.image_size, model.image_channels, resize=True)
        out.append(trajectory_features(model, pixels, spec_of(model), batch_size=batch_size, progress=progress))
        model.snapshots.store.close()
        del model
    return out


def fit_which_from_stores(
    stores: list[str],
    none: list[str],
    out: str,
    names: list[str] | None = None,
    generate: int = 64,
    timesteps: int = 10,
    relative: bool = False,
    holdout: float = 0.25,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Which of several fine-tunes made an image, or none: fit a ModelAttributor on `generate` generations of each
    store's final adapter (its probes, then its probe prompts with fresh seeds) and the `none` images (files or folders: real images,
    other models' generations), every image under every candidate; held-out balanced accuracy, then a refit on all,
    saved to `out`. The candidates are reloaded from their stores at prediction (`which_images`)."""
    from montrage.origin.images import expand_image_paths
    from montrage.origin.model_attribution import ModelAttributor

    if len(stores) < 2:
        raise OriginError(f"model attribution needs at least two candidate stores, got {len(stores)}.")
    names = list(names) if names else [os.path.splitext(os.path.basename(s))[0] for s in stores]
    if len(set(names)) != len(names) or len(names) != len(stores):
        raise OriginError(f"candidate names {names} must be unique, one per store: pass --names a,b,c.")
    groups, labels = [], []
    for name, store in zip(names, stores):
        model = store_diffusion_model(store, device=device)
        size, channels = model.image_size, model.image_channels
        pixels, _, _ = store_generations(model, max(0, generate - len(model.snapshots.store.probes)))
        groups.append(pixels[:generate])
        labels += [name] * len(groups[-1])
        model.snapshots.store.close()
        del model
    none_pixels, _ = load_external(expand_image_paths(list(none)), size, channels)
    groups.append(none_pixels)
    labels += ["none"] * len(none_pixels)
    pixels, labels = torch.cat(groups), np.asarray(labels)
    grid = None

    def spec_of(model):
        nonlocal grid
        grid = grid or default_timesteps(int(model.scheduler.config.num_train_timesteps), timesteps)
        return FeatureSpec(tuple(grid), families=default_families(model), noise_seed=seed)

    per_candidate = _features_under_stores(
        stores, pixels, spec_of, batch_size=batch_size, progress=progress, device=device
    )
    report = {
        "candidates": names,
        "stores": [os.path.abspath(s) for s in stores],
        "counts": {c: int(np.sum(labels == c)) for c in names + ["none"]},
        "timesteps": list(grid),
        "relative": relative,
    }
    tr, te = _split(labels, holdout, seed)
    if len(te) and all(np.sum(labels[tr] == c) >= 2 for c in names + ["none"]):
        held = ModelAttributor(names, families=per_candidate[0].spec.families, C="auto", relative=relative)
        held.fit([fs.subset(tr) for fs in per_candidate], labels[tr])
        pred = held.predict([fs.subset(te) for fs in per_candidate])
        report["held_out"] = _held_out_report(labels[te], pred, names + ["none"])
    att = ModelAttributor(names, families=per_candidate[0].spec.families, C="auto", relative=relative)
    att.fit(per_candidate, labels)
    att.save(out)
    report["attributor"] = out
    with open(os.path.join(out, "fit_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def which_images(
    attributor: str, images: list[str], batch_size: int = 32, device: str | None = None, progress: bool = True
) -> list[dict]:
    """Classify images with an attributor of `fit_which_from_stores`: each candidate rebuilt from its store."""
    from montrage.origin.images import expand_image_paths
    from montrage.origin.model_attribution import ModelAttributor

    att = ModelAttributor.load(attributor)
    stores = [ident.get("store") for ident in att.identities]
    if not all(stores):
        raise OriginError(
            f"attributor {attributor!r} was not fit from stores (its candidates record none): use "
            "ModelAttributor.predict with features under each candidate."
        )
    missing = [s for s in stores if not os.path.isfile(s)]
    if missing:
        raise OriginError(f"the attributor's candidate stores {missing} do not exist here; refit it where they are.")
    paths = expand_image_paths(list(images))
    per_candidate = _features_under_stores(
        stores, paths, lambda m: att.spec, batch_size=batch_size, progress=progress, device=device
    )
    proba = att.predict_proba(per_candidate)
    return [
        {
            "image": p,
            "prediction": att.classes[int(np.argmax(row))],
            "probabilities": {c: float(v) for c, v in zip(att.classes, row)},
        }
        for p, row in zip(paths, proba)
    ]
