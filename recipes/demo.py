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


def plot_curves(curves: np.ndarray, epochs: np.ndarray, concepts: list[str], path: str, title: str) -> None:
    """One panel per probe concept: its mean shifted-cosine similarity to each training concept over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(concepts)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), sharey=True, squeeze=False)
    for i, (ax, pc) in enumerate(zip(axes[0], concepts)):
        for j, tc in enumerate(concepts):
            ax.plot(epochs, curves[:, i, j], marker="o", lw=2.5 if i == j else 1.2, label=tc)
        ax.set_title(f"probes of {pc}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("similarity to training concept\n(centred shifted cosine)")
    axes[0][-1].legend(title="training concept", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str, digits: list[int] = [1, 4, 7, 9], images_per_concept: int = 16, epochs: int = 6,
             repeats: int = 40, learning_rate: float = 1e-2, seed: int = 0, progress: bool = True,
             base_config=None) -> dict:
    """Customize the tiny base to `digits` with the callback; write store.h5, demo_summary.json and curves.png.

    `base_config` (a TinyBaseConfig) selects another tiny base, e.g. an un-pretrained one in tests.
    """
    import pytorch_lightning as pl

    from montrage.callbacks import MontrageCallback
    from montrage.recipes.data import ConceptDataModule
    from montrage.recipes.fine_tune import DiffusionFineTune
    from montrage.recipes.tiny_base import tiny_base_path
    from montrage.similarity import concept_curves
    from montrage.store import StoreReader

    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    base = tiny_base_path(base_config, progress=progress)
    t_base = time.time() - t0
    pl.seed_everything(seed, verbose=False)
    module = DiffusionFineTune(pretrained_model="tiny" if base_config is None else base, lora_rank=8, lora_alpha=8, learning_rate=learning_rate,
                               output_dir=os.path.join(out, "lora"))
    data = ConceptDataModule(digits=digits, images_per_concept=images_per_concept, batch_size=32, repeats=repeats, seed=seed)
    store_path = os.path.join(out, "store.h5")
    callback = MontrageCallback(store_path=store_path, probe_seeds=[0, 1], num_inference_steps=10, guidance_scale=3.0,
                                thumbnail_size=16, overwrite=True, timesteps=[200, 500, 800])
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, deterministic=True)
    t1 = time.time()
    trainer.fit(module, data)
    t_fit = time.time() - t1

    with StoreReader(store_path) as store:
        summary = store.summary()
        concepts = list(store.probes.concepts)
        primary = store.probes.primary_concepts()
        layer = store.layers[0]
        curves = concept_curves(store.probe_features(layer), store.train_features(layer), primary,
                                [e.concept for e in store.train], concepts, centre=True)
        thumbs = store.probe_images()
        epochs_arr = store.epochs
    plot_curves(curves, epochs_arr, concepts, os.path.join(out, "curves.png"),
                f"MONTRAGE demo: probe vs training similarity ({layer})")
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
        "final_similarity": {pc: {tc: round(float(final[i, j]), 4) for j, tc in enumerate(concepts)} for i, pc in enumerate(concepts)},
        "final_own_concept_is_most_similar": [bool(np.nanargmax(final[i]) == i) for i in range(len(concepts))],
        "seconds": {"tiny_base": round(t_base, 1), "fine_tune_with_callback": round(t_fit, 1), "total": round(time.time() - t0, 1)},
    }
    with open(os.path.join(out, "demo_summary.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result
