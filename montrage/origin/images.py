"""Images for origin attribution: files or tensors, checked against the model's size and channels.

Membership signal lives in fine pixel detail, so images are not silently resized: an image of another size is an
error unless the caller asks for `resize=True` (centre crop + bicubic). Files are read as training images are
(`montrage.data.open_rgb`: EXIF rotation, transparency on white, 16-bit greyscale scaled), so a member scores on
the pixels it was trained on.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from montrage.data import IMAGE_SUFFIXES, DataError, center_crop_resize, open_rgb
from montrage.origin.errors import OriginError


def expand_image_paths(items: list[str]) -> list[str]:
    """Files as given; folders replaced by their image files (sorted, not recursive)."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise OriginError(f"image folder {item!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise OriginError(f"image {item!r} does not exist: pass image files or folders of images.")
    if not paths:
        raise OriginError("no images given: pass at least one image file or folder.")
    return paths


def read_captions(paths: list[str], source: str) -> list[str]:
    """Each image's caption: 'sidecar' reads `<image>.txt` beside it (as training reads a folder); otherwise `source`
    is a diffusers ImageFolder `metadata.jsonl` (`file_name`, `text`), matched by file name. Missing ones are ''."""
    import json

    from montrage.sources import _sidecar_caption

    if source == "sidecar":
        return [_sidecar_caption(p) for p in paths]
    if not os.path.isfile(source):
        raise OriginError(
            f"captions file {source!r} does not exist: pass 'sidecar' (a .txt beside each image) or a "
            "metadata.jsonl with file_name and text fields."
        )
    texts = {}
    with open(source, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts[os.path.basename(row["file_name"])] = str(row["text"])
            except (ValueError, KeyError, TypeError) as err:
                raise OriginError(
                    f"captions file {source!r}, line {number}: expected a JSON object with 'file_name' "
                    f"and 'text' ({type(err).__name__}: {err})."
                ) from err
    return [texts.get(os.path.basename(p), "") for p in paths]


def load_images(paths: list[str], size: int, channels: int = 3, resize: bool = False) -> torch.Tensor:
    """Read image files as (N, channels, size, size) floats in [-1, 1].

    Colour mode is converted as for training images (`montrage.data.open_rgb`; -> L for a 1-channel model); a file
    whose size is not size x size is an error unless `resize` (then centre-cropped and resized).
    """
    if not paths:
        raise OriginError("no images given: pass at least one image file or folder.")
    ims = []
    for path in paths:
        try:
            ims.append(open_rgb(path))
        except DataError as err:
            raise OriginError(str(err)) from err
    return images_to_pixels(ims, paths, size, channels, resize)


def images_to_pixels(ims: list, names: list[str], size: int, channels: int = 3, resize: bool = False) -> torch.Tensor:
    """PIL images (or (H, W, 3) uint8 arrays) as (N, channels, size, size) floats in [-1, 1]; `names` for errors."""
    from PIL import Image

    if channels not in (1, 3):
        raise OriginError(
            f"the model takes {channels}-channel images; only 1 (greyscale) or 3 (RGB) can be read "
            "from files. Pass a tensor instead."
        )
    out = []
    for name, im in zip(names, ims):
        im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
        im = im.convert("L") if channels == 1 else im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            if not resize:
                raise OriginError(
                    f"image {name!r} is {w}x{h} but the model works on {size}x{size} images: resize it "
                    f"to {size}x{size} first, or pass resize=True (--resize) to centre-crop and resize."
                )
            im = center_crop_resize(im, size)
        arr = np.asarray(im, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(arr.copy()) / 127.5 - 1.0)
    return torch.stack(out)


def check_images(images: torch.Tensor, size: int, channels: int, what: str = "images") -> torch.Tensor:
    """Validate a (N, C, H, W) batch against the model; returns it as float32."""
    if not isinstance(images, torch.Tensor):
        raise OriginError(
            f"{what} must be a torch tensor (N, C, H, W) in [-1, 1] or a list of image paths, "
            f"not {type(images).__name__}."
        )
    if images.ndim != 4:
        raise OriginError(f"{what} must have shape (N, C, H, W); got {tuple(images.shape)}.")
    if len(images) == 0:
        raise OriginError(f"no {what} given: the batch is empty; pass at least one image.")
    n, c, h, w = images.shape
    if c != channels:
        raise OriginError(
            f"{what} have {c} channels but the model takes {channels}-channel images: convert them "
            f"(e.g. greyscale -> RGB by repeating the channel) before extracting features."
        )
    if (h, w) != (size, size):
        raise OriginError(
            f"{what} are {h}x{w} but the model works on {size}x{size} images: resize them to "
            f"{size}x{size} first (files: pass resize=True / --resize)."
        )
    if not torch.isfinite(images).all():
        raise OriginError(f"{what} contain NaN or infinite values.")
    return images.float()


def image_keys(images: torch.Tensor) -> list[str]:
    """A content hash per image: its noise seed, so an image gets the same ε wherever and whenever it is scored."""
    import hashlib

    arr = images.detach().float().cpu().numpy()
    return [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16] for a in arr]
