"""Training images from any source, read lazily: a folder, a list of paths, a dict Dataset, a Hugging Face Dataset.

A source knows its records up front (stable id, concept, caption, path) and reads pixels a few rows at a time, so
monitoring costs memory O(batch), not O(N). Pixels are a deterministic centre crop + resize to the training
resolution: the monitor sees every image the same way at every snapshot, which is not the training augmentation.
Ids are the given ones, else the file path, else a hash of the image's content.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from montrage.data import (
    IMAGE_SUFFIXES,
    DataError,
    TrainExample,
    center_crop_resize,
    open_rgb,
    read_example,
    scan_concept_folder,
)


def to_pixels(image: Any, size: int, name: str = "image") -> torch.Tensor:
    """(3, size, size) float in [-1, 1] from a PIL image, a file path, a uint8 array (H, W, 3), or a float tensor
    (3, H, W) in [-1, 1] (diffusers' `Normalize([0.5], [0.5])` convention); largest centred square, then resized."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_rgb(str(image))
    if isinstance(image, Image.Image):
        from montrage.data import _to_rgb

        arr = np.asarray(center_crop_resize(_to_rgb(image), size), dtype=np.float32)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            image = image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise DataError(
            f"{name}: cannot read an image from a {type(image).__name__}; give a PIL image, a path, a "
            "uint8 array (H, W, 3) or a float tensor (3, H, W) in [-1, 1]."
        )
    x = image.detach().cpu()
    x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise DataError(f"{name}: an image tensor must be (3, H, W); got shape {tuple(image.shape)}.")
    x = x[:3] if x.shape[0] >= 3 else x.expand(3, -1, -1)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: the image holds non-finite values; fix or drop it.")
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return x.clamp(-1, 1)


def content_id(image: Any) -> str:
    """A stable id from an image's content (for sources that give neither an id nor a path)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, torch.Tensor):
        data = image.detach().cpu().contiguous().numpy().tobytes() + str(tuple(image.shape)).encode()
    elif isinstance(image, np.ndarray):
        data = np.ascontiguousarray(image).tobytes() + str(image.shape).encode()
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise DataError(f"cannot derive an id from a {type(image).__name__}: give each item an id.")
        data = image.tobytes() + f"{image.mode}{image.size}".encode()
    return "sha1:" + hashlib.sha1(data).hexdigest()[:20]


class ImageSource:
    """Records of the training images, and their pixels on demand (`pixels(rows, size)`)."""

    def __init__(self, examples: list[TrainExample], reader: Callable[[int, int], torch.Tensor], kind: str):
        if not examples:
            raise DataError(
                f"the image source ({kind}) yields no images: point it at a folder, paths or a dataset "
                "that holds training images."
            )
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            seen, dup = set(), []
            for i in ids:
                if i in seen:
                    dup.append(i)
                seen.add(i)
            raise DataError(
                f"the image source ({kind}) has repeated ids ({', '.join(dup[:3])}): ids must be unique; "
                "give each item its own id (or a distinct path)."
            )
        self.examples = examples
        self._reader = reader
        self.kind = kind

    def __len__(self) -> int:
        return len(self.examples)

    def index_of(self) -> dict[str, int]:
        return {e.id: i for i, e in enumerate(self.examples)}

    def pixels(self, rows: Sequence[int], size: int) -> torch.Tensor:
        """(len(rows), 3, size, size) in [-1, 1]; a file that cannot be read raises a DataError naming it."""
        out = [self._reader(int(i), size) for i in rows]
        return torch.stack(out) if out else torch.empty(0, 3, size, size)


def _sidecar_caption(path: str, default: str = "") -> str:
    sidecar = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as fh:
            return fh.read().strip()
    return default


def folder_source(root: str, caption_template: str = "a photo of {token}", tokens: dict | None = None) -> ImageSource:
    """One subfolder per concept (captions from the template or sidecar .txt), or a flat folder of images with
    sidecar captions (one concept, named after the folder)."""
    if not os.path.isdir(root):
        raise DataError(
            f"image folder {root!r} does not exist: pass a folder of images (one subfolder per concept, "
            "or flat with sidecar .txt captions)."
        )
    flat = sorted(
        f for f in os.listdir(root) if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(root, f))
    )
    if flat:  # one concept (e.g. a DreamBooth instance folder), named after the folder
        return paths_source([os.path.join(root, f) for f in flat], root=root)
    examples = scan_concept_folder(root, caption_template, tokens)
    return ImageSource(examples, lambda i, size: read_example(examples[i], size), f"folder {root!r}")


def paths_source(paths: Sequence[str], root: str | None = None) -> ImageSource:
    """Image files, in the given order; the id is the path (relative to `root` when given), the concept the name of
    the file's folder (as torchvision's ImageFolder has it), the caption a sidecar .txt if present."""
    paths = [str(p) for p in paths]
    examples = [
        TrainExample(
            id=os.path.relpath(p, root) if root else p,
            concept=os.path.basename(os.path.dirname(os.path.abspath(p))),
            caption=_sidecar_caption(p),
            path=p,
        )
        for p in paths
    ]
    return ImageSource(examples, lambda i, size: read_example(examples[i], size), f"{len(paths)} paths")


def examples_source(examples: Sequence[TrainExample]) -> ImageSource:
    """`TrainExample` records (e.g. `ConceptImageDataset.examples`): files or scikit-learn digits."""
    examples = list(examples)
    return ImageSource(examples, lambda i, size: read_example(examples[i], size), "examples")


def _rng_free(fn):
    """Run a read under an isolated RNG: a dataset's random transforms must not move the training run's RNG."""
    from montrage.rng import isolated_rng

    def wrapped(*a, **k):
        with isolated_rng():
            return fn(*a, **k)

    return wrapped


def dataset_source(
    dataset, image_key: str = "image", caption_key: str = "caption", id_key: str = "id", concept_key: str = "concept"
) -> ImageSource:
    """A map-style dataset whose items are dicts: `image` (PIL, path or tensor), `caption`, optional `id` and
    `concept` (key names configurable). Records are read once at the start, one item at a time."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(
            f"the image source {type(dataset).__name__} is not a map-style dataset (it needs __len__ and "
            "__getitem__); iterable datasets cannot be re-read at a snapshot: pass a folder or paths."
        )
    read = _rng_free(dataset.__getitem__)
    name = type(dataset).__name__

    def item(i: int) -> dict:
        x = read(i)
        if not isinstance(x, dict) or image_key not in x:
            keys = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise DataError(
                f"dataset {name} item {i}: expected a dict with the image under {image_key!r}, got {keys}. "
                "Set image_key (and caption_key, id_key, concept_key) to your dataset's names."
            )
        return x

    examples = []
    for i in range(len(dataset)):
        x = item(i)
        image = x[image_key]
        path = str(image) if isinstance(image, (str, os.PathLike)) else str(getattr(image, "filename", "") or "")
        ident = x.get(id_key)
        ident = str(ident) if ident is not None else (path or content_id(image))
        examples.append(
            TrainExample(
                id=ident,
                concept=str(x.get(concept_key, "") or ""),
                caption=str(x.get(caption_key, "") or ""),
                path=path,
            )
        )
    return ImageSource(
        examples, lambda i, size: to_pixels(item(i)[image_key], size, f"dataset {name} item {i}"), f"dataset {name}"
    )


def hf_source(
    ds,
    image_column: str = "image",
    caption_column: str = "text",
    id_column: str | None = None,
    concept_column: str | None = None,
) -> ImageSource:
    """A Hugging Face `datasets.Dataset` (column names configurable); text columns are read without decoding images."""
    from datasets import Image as HFImage

    cols = list(ds.column_names)
    for field, col in (
        ("image_column", image_column),
        ("caption_column", caption_column),
        ("id_column", id_column),
        ("concept_column", concept_column),
    ):
        if col is not None and col not in cols and (field, col) != ("caption_column", "text"):  # captions optional
            raise DataError(
                f"Hugging Face dataset: {field}={col!r} is not a column (columns: {', '.join(cols)}); "
                "name the dataset's columns (image_key, caption_key, id_key, concept_key)."
            )
    raw = (
        ds.cast_column(image_column, HFImage(decode=False))
        if isinstance(ds.features.get(image_column), HFImage)
        else ds
    )
    captions = ds[caption_column] if caption_column in cols else [""] * len(ds)
    concepts = ds[concept_column] if concept_column else [""] * len(ds)
    ids = ds[id_column] if id_column else None
    examples = []
    for i in range(len(ds)):
        if ids is not None:
            ident, path = str(ids[i]), ""
        else:
            cell = raw[i][image_column]
            path = (cell.get("path") or "") if isinstance(cell, dict) else ""
            ident = path or content_id(cell["bytes"] if isinstance(cell, dict) and cell.get("bytes") else cell)
        examples.append(TrainExample(id=ident, concept=str(concepts[i] or ""), caption=str(captions[i] or ""), path=""))

    def read(i: int, size: int) -> torch.Tensor:
        cell = ds[i][image_column]
        if isinstance(cell, dict) and cell.get("bytes"):
            from PIL import Image

            cell = Image.open(io.BytesIO(cell["bytes"]))
        return to_pixels(cell, size, f"Hugging Face dataset row {i}")

    return ImageSource(examples, _rng_free(read), "Hugging Face dataset")


def image_source(images, **keys) -> ImageSource:
    """The right source for `images`: an ImageSource, a folder, a list of paths, `TrainExample` records (or a dataset
    that has them as `.examples`), a Hugging Face Dataset, or a map-style dataset of dicts. `keys`: column/key names."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, (str, os.PathLike)):
        return folder_source(str(images), **{k: v for k, v in keys.items() if k in ("caption_template", "tokens")})
    inner = getattr(images, "dataset", None)  # a wrapped dataset (montrage's index wrapper)
    if getattr(images, "montrage_wrapped", False) and inner is not None:
        return image_source(inner, **keys)
    if isinstance(getattr(images, "examples", None), (list, tuple)) and all(
        isinstance(e, TrainExample) for e in images.examples
    ):
        return examples_source(images.examples)
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(e, TrainExample) for e in images):
            return examples_source(images)
        if images and all(isinstance(p, (str, os.PathLike)) for p in images):
            return paths_source(images)
        if not images:
            raise DataError(
                "the image source (an empty list) yields no images: give image paths, a folder or a dataset."
            )
    if type(images).__module__.startswith("datasets.") and hasattr(images, "column_names"):
        hf = {k.replace("_key", "_column"): v for k, v in keys.items() if k.endswith("_key")}
        return hf_source(images, **hf)
    dk = {k: v for k, v in keys.items() if k.endswith("_key")}
    return dataset_source(images, **dk)


def stable_unit(seed: int, ident: str) -> float:
    """A number in [0, 1) fixed by (seed, id): the same across runs, processes and dataset orders."""
    h = hashlib.sha256(f"{int(seed)}/{ident}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def select_monitored(examples: Sequence[TrainExample], monitor_images=None, seed: int = 0) -> list[int]:
    """Sorted rows of the monitored subset.

    None: all. An int K: the K images with the smallest stable hash, stratified by concept when concepts are known
    (each concept gets its share, at least one). A fraction in (0, 1): every image whose stable hash falls below it,
    so appending images to a source only ever adds members. A list of ids: exactly those.
    """
    n = len(examples)
    if monitor_images is None:
        return list(range(n))
    if isinstance(monitor_images, (list, tuple)):
        index = {e.id: i for i, e in enumerate(examples)}
        missing = [str(i) for i in monitor_images if str(i) not in index]
        if missing:
            raise DataError(
                f"monitor_images names {len(missing)} id(s) that the image source does not hold "
                f"({', '.join(missing[:3])}); use ids from the source (e.g. 'concept/file.png')."
            )
        return sorted({index[str(i)] for i in monitor_images})
    units = [stable_unit(seed, e.id) for e in examples]
    if isinstance(monitor_images, float):
        frac = float(monitor_images)
        if not 0.0 < frac <= 1.0:
            raise DataError(f"monitor_images={monitor_images}: a fraction must lie in (0, 1] (a count is an int).")
        rows = [i for i in range(n) if units[i] < frac]
        if not rows:
            raise DataError(f"monitor_images={frac} selects no image of the {n}; raise it or give a count.")
        return rows
    k = int(monitor_images)
    if k < 1:
        raise DataError(f"monitor_images={monitor_images}: give a count >= 1, a fraction in (0, 1], or a list of ids.")
    if k > n:
        raise DataError(
            f"monitor_images={k} is larger than the image source ({n} images): lower it, or leave it unset "
            "to monitor every image."
        )
    by_concept: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_concept.setdefault(e.concept, []).append(i)
    if len(by_concept) == 1 or k < len(by_concept):
        return sorted(sorted(range(n), key=lambda i: (units[i], examples[i].id))[:k])
    # largest-remainder allocation, at least one per concept
    names = sorted(by_concept)
    quota = {c: k * len(by_concept[c]) / n for c in names}
    alloc = {c: max(1, int(quota[c])) for c in names}
    while sum(alloc.values()) > k:
        c = max((c for c in names if alloc[c] > 1), key=lambda c: alloc[c] - quota[c])
        alloc[c] -= 1
    for c in sorted(names, key=lambda c: -(quota[c] - int(quota[c])))[: k - sum(alloc.values())]:
        alloc[c] += 1
    rows = []
    for c in names:
        rows += sorted(by_concept[c], key=lambda i: (units[i], examples[i].id))[: alloc[c]]
    return sorted(rows)
