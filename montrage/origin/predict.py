"""Answer "where does this image come from?" with a saved origin classifier: load its model, check it is the very
model the classifier was trained for, extract features with the classifier's spec, and classify."""

from __future__ import annotations

import os

import numpy as np
import torch

from montrage.components import DiffusionModel
from montrage.origin.classifier import OriginClassifier
from montrage.origin.errors import OriginError
from montrage.origin.features import trajectory_features
from montrage.origin.from_store import is_store, store_diffusion_model
from montrage.origin.images import check_images, expand_image_paths, load_images
from montrage.origin.model import check_same_model, load_diffusion_model


def resolve_model(
    classifier: OriginClassifier, model: str | DiffusionModel | None, lora: str | None = None, device: str | None = None
) -> DiffusionModel:
    """The classifier's model: the one given (a model folder, hub id or store), or the path (and LoRA) or store
    recorded at fit time; refused if its weights are not the classifier's."""
    if model is None:
        model = classifier.model_path or (classifier.identity or {}).get("model_id")
        lora = lora or (classifier.identity or {}).get("lora")
        if not model:
            raise OriginError("the classifier records no model path: pass the model it was trained for (--model).")
        if os.path.isabs(model) and not os.path.exists(model):
            raise OriginError(
                f"the classifier's model {model!r} does not exist here: pass its current location with --model."
            )
    if isinstance(model, str) and is_store(model):  # a classifier of `montrage origin fit STORE`
        model = store_diffusion_model(model, device=device)
    elif isinstance(model, str):
        model = load_diffusion_model(model, lora=lora, device=device)
    check_same_model(
        classifier.identity,
        model.identity(),
        "the classifier",
        "Pass the model (and --lora) the classifier was trained for, or train a classifier for this one.",
    )
    return model


def load_with_model(classifier: str, model: str | DiffusionModel | None = None, device: str | None = None):
    """(classifier, its model) loaded once, for callers that classify several batches (the guard, the report)."""
    clf = OriginClassifier.load(classifier)
    return clf, resolve_model(clf, model, device=device)


def predict_images(
    images,
    classifier: str | OriginClassifier,
    model: str | DiffusionModel | None = None,
    lora: str | None = None,
    captions: list[str] | None = None,
    resize: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Classify images (paths/folders, or a tensor (N, C, H, W) in [-1, 1]) with a classifier (folder or object).

    Returns one dict per image: `image`, `prediction` and `probabilities` {class: p}.
    """
    clf = OriginClassifier.load(classifier) if isinstance(classifier, str) else classifier
    m = resolve_model(clf, model, lora, device)
    if isinstance(images, torch.Tensor):
        pixels = check_images(images, m.image_size, m.image_channels)
        names = [f"image[{i}]" for i in range(len(pixels))]
    else:
        names = expand_image_paths(list(images))
        pixels = load_images(names, m.image_size, m.image_channels, resize=resize)
    fs = trajectory_features(
        m, pixels, clf.spec, captions=captions, ids=names, batch_size=batch_size, progress=progress
    )
    proba = clf.predict_proba(fs)
    classes = clf.classes
    return [
        {
            "image": name,
            "prediction": classes[int(np.argmax(p))],
            "probabilities": {c: float(v) for c, v in zip(classes, p)},
        }
        for name, p in zip(names, proba)
    ]


def predict_generations(
    thumbnails: list[np.ndarray],
    prompts: list[str],
    classifier: str | OriginClassifier,
    model: str | DiffusionModel | None = None,
    device: str | None = None,
) -> list[dict[str, float]]:
    """Origin probabilities {class: p} (4 decimals) of a store's probe generations (its (S, S, 3) uint8 thumbnails,
    resized to the model's size), each under its own prompt where the classifier's features need captions. A
    generation the classifier calls a "member" is one the model treats like a training image: evidence for a
    memorization alert."""
    from montrage.origin.images import images_to_pixels

    clf = OriginClassifier.load(classifier) if isinstance(classifier, str) else classifier
    m = resolve_model(clf, model, device=device)
    names = [f"probe[{i}]" for i in range(len(thumbnails))]
    pixels = images_to_pixels(list(thumbnails), names, m.image_size, m.image_channels, resize=True)
    results = predict_images(
        pixels, clf, m, captions=list(prompts) if clf.spec.needs_captions else None, device=device, progress=False
    )
    return [{c: round(p, 4) for c, p in r["probabilities"].items()} for r in results]
