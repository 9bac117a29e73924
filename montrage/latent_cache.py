"""VAE latents of the monitored images, computed once: the VAE is frozen in LoRA/DreamBooth runs, so every snapshot
would otherwise re-run it on every image. Kept as fp16 in a `.npy` beside the store (memory-mapped: reading a batch
costs a batch), keyed by a digest of the VAE's weights, the preprocessing and the images; a new key (another VAE,
resolution or image set) builds a new file, and a trained VAE bypasses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch


def module_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def cache_key(vae: torch.nn.Module, preprocessing: dict, ids: Sequence[str]) -> str:
    blob = json.dumps(
        {"vae": module_digest(vae), "pre": preprocessing, "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest()},
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


class LatentCache:
    """`<directory>/<key>.npy`: (n, *shape) float16, written to a temporary file and renamed once complete."""

    def __init__(self, directory: str, key: str):
        self.path = os.path.join(directory, f"latents-{key}.npy")
        self._array: np.ndarray | None = None

    def open(self) -> bool:
        """Map an existing complete cache; False when there is none."""
        if self._array is None and os.path.isfile(self.path):
            self._array = np.load(self.path, mmap_mode="r")
        return self._array is not None

    def build(self, n: int, batches: Callable[[], Iterable[tuple[slice, torch.Tensor]]]) -> None:
        """Fill from `batches()` -> (rows, latents) in order; the file appears only when complete."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + f".tmp{os.getpid()}"
        arr = None
        try:
            for rows, z in batches():
                if arr is None:
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *z.shape[1:]))
                arr[rows] = z.to(torch.float16).cpu().numpy()
            if arr is None:
                return
            arr.flush()
            del arr
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._array = None
        self.open()

    def read(self, rows: slice) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._array[rows], dtype=np.float32))

    @property
    def nbytes(self) -> int:
        return int(self._array.nbytes) if self._array is not None else 0
