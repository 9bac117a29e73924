"""Training examples with stable ids: an image folder with one subfolder per concept, or scikit-learn's digits.

Every example carries an id that stays the same across runs, so stores, attribution tables and training-order
records can refer to it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from montrage.errors import MontrageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DataError(MontrageError, ValueError):
    """Bad training data: a missing folder, an unreadable image, a concept without images."""


@dataclass(frozen=True)
class TrainExample:
    id: str
    concept: str
    caption: str
    path: str = ""


def load_image(path: str, size: int) -> torch.Tensor:
    """Read an image file as a (3, size, size) float tensor in [-1, 1] (RGB, center-cropped, resized)."""
    im = center_crop_resize(open_rgb(path), size)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def open_rgb(path: str):
    """An image file as an RGB PIL image, from any mode and size Pillow reads: EXIF rotation applied, transparency
    composited on white (transparent pixels hold arbitrary colours), 16-bit greyscale scaled rather than clipped,
    the first frame of an animation. Unreadable files raise a DataError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as err:
        raise DataError(
            f"image {path!r} is too large to decode safely ({err}). Downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read image {path!r}: {err}. Remove or replace the file.") from err


def center_crop_resize(im, size: int):
    """The largest centred square of a PIL image, resized (bicubic) to size x size."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def _to_rgb(im):
    from PIL import Image

    if im.mode.startswith("I"):  # 16/32-bit integer greyscale: Pillow's convert would clip at 255
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr / 257.0 if arr.max() > 255 else arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def scan_concept_folder(
    root: str, caption_template: str = "a photo of {token}", tokens: dict | None = None
) -> list[TrainExample]:
    """One subfolder per concept; the caption is the template with the concept's token, or a sidecar .txt file.

    The template may use `{token}`, `{concept}` and `{image_token}` (a per-image token, see `image_token`).
    `tokens` maps concept folder names to the token put in captions (default: the folder name itself).
    """
    if not os.path.isdir(root):
        raise DataError(
            f"image folder {root!r} does not exist: pass `data_dir` pointing at a folder with one subfolder per concept."
        )
    concepts = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not concepts:
        raise DataError(
            f"image folder {root!r} has no concept subfolders: put each concept's images in {root}/<concept>/."
        )
    examples = []
    for concept in concepts:
        folder = os.path.join(root, concept)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(
                f"concept folder {folder!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}): add images or remove the folder."
            )
        token = (tokens or {}).get(concept, concept)
        for k, name in enumerate(files):
            path = os.path.join(folder, name)
            sidecar = os.path.splitext(path)[0] + ".txt"
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8") as fh:
                    caption = fh.read().strip()
            else:
                caption = caption_template.format(token=token, concept=concept, image_token=image_token(k))
            examples.append(TrainExample(id=f"{concept}/{name}", concept=concept, caption=caption, path=path))
    return examples


def digit_token(digit: int) -> str:
    return DIGIT_WORDS[digit]


def image_token(k: int) -> str:
    """A short per-image token ("ka", "kb", ..., "kz", "ma", ...) for captions with `{image_token}`."""
    consonants = "kmpqtvxz"
    return consonants[(k // 26) % len(consonants)] + "abcdefghijklmnopqrstuvwxyz"[k % 26]


@functools.lru_cache(maxsize=1)
def sklearn_digits():
    """scikit-learn's 8x8 digits, read once: (images (1797, 8, 8) in 0..16, targets)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digits_pixels(indices: np.ndarray | list[int], size: int) -> torch.Tensor:
    """scikit-learn digits (8x8, 0..16) as (N, 3, size, size) tensors in [-1, 1], bilinearly upsampled."""
    images = sklearn_digits()[0][np.asarray(indices)].astype(np.float32) / 16.0
    x = torch.from_numpy(images)[:, None] * 2.0 - 1.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.repeat(1, 3, 1, 1)


def digits_examples(
    concepts: list[int], per_concept: int, caption_template: str = "a photo of {token}", offset: int = 0
) -> list[TrainExample]:
    """`per_concept` digits of each class in `concepts`, skipping the first `offset` of each class (stable order)."""
    target = sklearn_digits()[1]
    examples = []
    for digit in concepts:
        idx = np.flatnonzero(target == digit)[offset : offset + per_concept]
        if len(idx) < per_concept:
            raise DataError(
                f"digits has only {len(idx)} images of {digit} after offset {offset}; lower `images_per_concept`."
            )
        for k, i in enumerate(idx):
            caption = caption_template.format(
                token=digit_token(digit), concept=f"digit{digit}", image_token=image_token(k)
            )
            examples.append(
                TrainExample(
                    id=f"digits/{int(i)}", concept=f"digit{digit}", caption=caption, path=f"sklearn:digits/{int(i)}"
                )
            )
    return examples


def read_example(ex: TrainExample, size: int) -> torch.Tensor:
    """Pixels (3, size, size) in [-1, 1] of a training example, from its file or from scikit-learn's digits."""
    if ex.path.startswith("sklearn:digits/"):
        return digits_pixels([int(ex.path.rsplit("/", 1)[1])], size)[0]
    return load_image(ex.path, size)


class ConceptImageDataset(torch.utils.data.Dataset):
    """Examples plus their pixels; yields dicts with `pixel_values`, `caption` and `index` (position in `examples`).

    Images are decoded once up front so that a bad file fails before training starts, not mid-epoch.
    """

    def __init__(self, examples: list[TrainExample], size: int, repeats: int = 1, weights: list[int] | None = None):
        """`weights[j]`: how many times example j is seen per pass (default once each; e.g. to over-sample one image)."""
        if not examples:
            raise DataError("no training examples: the image folder or concept list is empty.")
        self.examples = list(examples)
        self.size = size
        self.repeats = max(1, int(repeats))
        weights = [1] * len(self.examples) if weights is None else [int(w) for w in weights]
        if len(weights) != len(self.examples) or min(weights) < 0 or sum(weights) == 0:
            raise DataError(
                f"weights must be {len(self.examples)} non-negative counts, not all 0; got {weights[:8]}..."
            )
        self._order = [j for j, w in enumerate(weights) for _ in range(w)]
        self.pixels = torch.stack([read_example(ex, size) for ex in self.examples])

    def __len__(self) -> int:
        return len(self._order) * self.repeats

    def __getitem__(self, i: int) -> dict:
        j = self._order[i % len(self._order)]
        return {"pixel_values": self.pixels[j], "caption": self.examples[j].caption, "index": j}


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels of an 8-bit file (as a generation saved to PNG is read back)."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def to_thumbnails(pixels: torch.Tensor, size: int) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, size, size, 3) uint8: how the store keeps probe thumbnails, and how they are compared."""
    x = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
