"""`montrage demo`: an offline end-to-end run on the tiny base and scikit-learn's digits.

LoRA-customizes the tiny base to digit concepts with MontrageCallback attached, then writes the store, a summary
and the per-concept similarity curves. Later stages (attribution, origin) read the same store.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from montrage.data import digits_pixels


def digit_classifier():
    """A logistic-regression digit reader (8x8 sklearn digits) to check what the probes depict."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x = digits_pixels(np.arange(len(d.target)), 8)[:, 0].reshape(len(d.target), -1).numpy()
    return LogisticRegression(max_iter=2000).fit(x, d.target)


def read_digits(clf, thumbs: np.ndarray) -> np.ndarray:
    """Predicted digit of uint8 RGB thumbnails (P, S, S, 3)."""
    import torch

    x = torch.from_numpy(thumbs[..., 0].astype(np.float32) / 127.5 - 1.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    return clf.predict(x.reshape(len(x), -1).numpy())


def run_demo(
    out: str,
    digits: list[int] = [1, 4, 7, 9],
    images_per_concept: int = 16,
    epochs: int = 6,
    repeats: int = 40,
    learning_rate: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    base_config=None,
) -> dict:
    """Customize the tiny base to `digits` with the callback; write store.h5, demo_summary.json and curves.png.

    `base_config` (a TinyBaseConfig) selects another tiny base, e.g. an un-pretrained one in tests.
    """
    import pytorch_lightning as pl

    from montrage.callbacks import MemorizationGuard, MontrageCallback
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.report import concept_curves_figure, store_concept_curves
    from montrage.store import StoreReader

    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    base = tiny_base_path(base_config, progress=progress)
    t_base = time.time() - t0
    pl.seed_everything(seed, verbose=False)
    module = DiffusionFineTune(
        pretrained_model="tiny" if base_config is None else base,
        lora_rank=8,
        lora_alpha=8,
        learning_rate=learning_rate,
        output_dir=os.path.join(out, "lora"),
    )
    data = ConceptDataModule(
        digits=digits, images_per_concept=images_per_concept, batch_size=32, repeats=repeats, seed=seed
    )
    store_path = os.path.join(out, "store.h5")
    callback = MontrageCallback(
        store_path=store_path,
        probe_seeds=[0, 1],
        num_inference_steps=10,
        guidance_scale=3.0,
        thumbnail_size=16,
        overwrite=True,
        timesteps=[200, 500, 800],
        mode="inline",
    )  # the guard checks each snapshot as it is written (deferred: `montrage encode`)
    guard = MemorizationGuard()  # after the callback: reads each snapshot once written; alerts on near-copies
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback, guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
    )
    t1 = time.time()
    trainer.fit(module, data)
    t_fit = time.time() - t1

    with StoreReader(store_path) as store:
        summary = store.summary()
        primary = store.probes.primary_concepts()
        curves, concepts = store_concept_curves(store)
        thumbs = store.probe_images()
        epochs_arr = store.epochs
        with open(os.path.join(out, "curves.png"), "wb") as fh:  # the same figure as the report's first section
            fh.write(concept_curves_figure(store, (curves, concepts)))
    clf = digit_classifier()
    single = [k for k, p in enumerate(primary) if sum(w > 0 for w in store.probes.weight_matrix()[k]) == 1]
    want = np.array([int(primary[k].removeprefix("digit")) for k in single])
    accuracy = [float(np.mean(read_digits(clf, thumbs[e][single]) == want)) for e in range(len(epochs_arr))]
    final = curves[-1]
    result = {
        "store": store_path,
        "lora_weights": os.path.join(out, "lora", "pytorch_lora_weights.safetensors"),
        "curves_png": os.path.join(out, "curves.png"),
        "base_model": base,
        "concepts": concepts,
        "epochs": [int(e) for e in epochs_arr],
        "num_probes": summary["num_probes"],
        "num_train_images": summary["num_train_images"],
        "store_bytes": summary["file_bytes"],
        "probe_concept_accuracy_per_epoch": accuracy,
        "final_similarity": {
            pc: {tc: round(float(final[i, j]), 4) for j, tc in enumerate(concepts)} for i, pc in enumerate(concepts)
        },
        "final_own_concept_is_most_similar": [bool(np.nanargmax(final[i]) == i) for i in range(len(concepts))],
        "seconds": {
            "tiny_base": round(t_base, 1),
            "fine_tune_with_callback": round(t_fit, 1),
            "total": round(time.time() - t0, 1),
        },
    }
    t2 = time.time()
    result["attribution"] = attribution_step(store_path, out, digits, seed)
    result["origin"] = origin_step(store_path, out, digits, images_per_concept, seed, progress)
    from montrage.report import build_report

    result["memorization_alerts"] = len(guard.alerts)
    result["report_html"] = os.path.join(out, "report.html")
    ext = result["origin"]["external_dir"]  # the report shows the origin of two images the run never saw
    build_report(
        store_path, result["report_html"], origin_images=[os.path.join(ext, f) for f in sorted(os.listdir(ext))[:2]]
    )
    result["seconds"]["attribution_origin_report"] = round(time.time() - t2, 1)
    result["seconds"]["total"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "demo_summary.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result


def attribution_step(store_path: str, out: str, digits: list[int], seed: int) -> dict:
    """Fit the attribution model, then attribute two fresh generations and one unseen real digit (query.png)."""
    import torch

    from montrage.attribution import Attributor, fit_attribution
    from montrage.data import digit_token, sklearn_digits
    from montrage.probes import ProbeSet

    report = fit_attribution(store_path, seed=seed)
    att = Attributor.from_store(store_path)
    try:
        prompts = tuple(f"a photo of {digit_token(d)}" for d in digits[:2])
        generated = att.model.generate(ProbeSet(prompts, tuple({} for _ in prompts), (1234,)), att.store.num_epochs - 1)
        unseen = int(
            np.flatnonzero(sklearn_digits()[1] == digits[-1])[-1]
        )  # the last image of a class is never trained on
        pixels = torch.cat([generated, digits_pixels([unseen], att.model.resolution)])
        # generations are encoded under their prompts; the real digit's prompt is unknown (the empty prompt)
        results = att.query(pixels, top_k=5, prompt=list(prompts) + [""])
        att.plot(pixels, results, os.path.join(out, "query.png"))
    finally:
        att.close()
    names = [f"generated: {p}" for p in prompts] + [f"real unseen digit {digits[-1]}"]
    return {
        "fit": {m: v["final_loss"] for m, v in report["models"].items()},
        "query_png": os.path.join(out, "query.png"),
        "queries": [
            {
                "query": n,
                "top_concept": r["top_concept"],
                "shares": {c: v["share"] for c, v in r["concepts"].items()},
                "top_images": [i["id"] for i in r["top_images"]],
            }
            for n, r in zip(names, results)
        ],
    }


def origin_step(
    store_path: str, out: str, digits: list[int], images_per_concept: int, seed: int, progress: bool
) -> dict:
    """`montrage origin fit STORE --external DIR` on the run: members and generations come from the store, the
    external class is unseen digits written to `<out>/origin_external/`; half of each class is held out."""
    from PIL import Image

    from montrage.data import sklearn_digits
    from montrage.origin.from_store import fit_from_store

    target = sklearn_digits()[1]
    n = len(digits) * images_per_concept
    per = max(1, n // len(digits))
    unseen = np.concatenate(
        [np.flatnonzero(target == d)[images_per_concept : images_per_concept + per] for d in digits]
    )
    folder = os.path.join(out, "origin_external")
    os.makedirs(folder, exist_ok=True)
    pixels = digits_pixels(unseen[:n], 16)
    for i, x in zip(unseen, pixels):  # as a user's folder of images would be
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"digit_{int(i)}.png"))
    report = fit_from_store(store_path, [folder], members=n, timesteps=10, holdout=0.5, seed=seed, progress=progress)
    held = report.get("held_out", {})
    return {
        "classes": ["member", "generated", "external"],
        "classifier": report["classifier"],
        "test_accuracy_per_class": held.get("accuracy_per_class"),
        "balanced_accuracy": held.get("balanced_accuracy"),
        "timesteps": report["timesteps"],
        "images_per_class": report["counts"],
        "external_dir": folder,
    }
