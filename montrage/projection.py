"""A fixed random projection of pooled features, so that the store grows with a chosen width, not the layer's width.

A seeded Gaussian matrix (Johnson-Lindenstrauss) keeps the cosines the attribution table is built from to within
a few percent at the default width; it is drawn once per layer, stored in the store, and applied to everything
encoded against it (training images, probes, queries), so all sides live in one projected space.
"""

from __future__ import annotations

import numpy as np

DEFAULT_WIDTH = 128  # 3 timesteps x 128 x fp16 = 768 bytes per (image, snapshot, layer) (docs/results.md, "Scale")


def projection_matrices(pooled_dims: dict[str, int], width: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """{layer: (F, width)} for the layers wider than `width` (narrower ones are stored as they are); {} for None."""
    if width is None or int(width) <= 0:
        return {}
    out = {}
    for k, (layer, dim) in enumerate(sorted(pooled_dims.items())):
        if dim > width:
            rng = np.random.default_rng([int(seed), k, int(dim), int(width)])
            out[layer] = (rng.standard_normal((dim, int(width))) / np.sqrt(width)).astype(np.float32)
    return out


def describe(pooled_dims: dict[str, int], width: int | None, seed: int = 0) -> dict:
    """The store's `projection` field: width, seed, the pooled widths and the matrices (the latter kept out of JSON)."""
    matrices = projection_matrices(pooled_dims, width, seed)
    if not matrices:
        return {}
    return {"width": int(width), "seed": int(seed), "pooled_dims": dict(pooled_dims), "matrices": matrices}


def project(feats: dict[str, np.ndarray], matrices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply the per-layer matrices to features {layer: (..., F)}; layers without a matrix pass unchanged."""
    return {k: (v.astype(np.float32) @ matrices[k] if k in matrices else v) for k, v in feats.items()}
