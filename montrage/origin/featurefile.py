"""Features files (HDF5): trajectory features of a set of images, with the model identity and the feature spec.

Features are only meaningful under the model that produced them, so every file records the model's identity and
reading with `expect_identity` refuses a file made by another model instead of silently mixing them.

Layout: attrs `format`, `schema_version`, `identity` (JSON), `spec` (JSON: timesteps, families, params, noise, ...),
`timesteps` (the grid), `label` ("" if none), `seconds`; datasets `timesteps` (T,), `ids` (N,) str, one (N, T)
float32 dataset per family (`loss`, `grad_x`, `grad_theta`, ...; `loss_snapshots` is (N, S x T)), optionally `layer_norms` (N, T, G) with
`layer_names` (G,).
"""

from __future__ import annotations

import json
import os

import numpy as np

from montrage.origin.errors import OriginError
from montrage.origin.feature_set import FeatureSet, FeatureSpec
from montrage.origin.model import check_same_model

FORMAT = "montrage-origin-features"
SCHEMA_VERSION = 1


def write_features(path: str, fs: FeatureSet) -> str:
    """Write a FeatureSet to `path` (replaced atomically: a crash never leaves a half-written file behind)."""
    import h5py

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["identity"] = json.dumps(fs.identity, sort_keys=True)
        f.attrs["spec"] = fs.spec.to_json()
        f.attrs["timesteps"] = np.asarray(fs.spec.timesteps, np.int64)
        f.attrs["label"] = fs.label or ""
        f.attrs["seconds"] = float(fs.seconds)
        f.create_dataset("timesteps", data=np.asarray(fs.spec.timesteps, np.int64))
        f.create_dataset("ids", data=np.asarray(fs.ids, dtype=object), dtype=h5py.string_dtype())
        for name, arr in fs.values.items():
            f.create_dataset(name, data=np.asarray(arr, np.float32))
        if fs.layer_norms is not None:
            f.create_dataset("layer_norms", data=np.asarray(fs.layer_norms, np.float32), compression="lzf")
            f.create_dataset("layer_names", data=np.asarray(fs.layer_names, dtype=object), dtype=h5py.string_dtype())
    os.replace(tmp, path)
    return path


def read_features(path: str, expect_identity: dict | None = None) -> FeatureSet:
    """Read a features file; with `expect_identity`, refuse one made by another model (names both models)."""
    import h5py

    if not os.path.isfile(path):
        raise OriginError(f"features file {path!r} does not exist: create it with `montrage origin features`.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise OriginError(
            f"features file {path!r} is not a readable HDF5 file ({err}); recompute it with `montrage origin features`."
        ) from err
    with f:
        if f.attrs.get("format") != FORMAT:
            raise OriginError(
                f"{path!r} is not a montrage origin features file (attribute `format` is "
                f"{f.attrs.get('format')!r}, expected {FORMAT!r})."
            )
        version = int(f.attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise OriginError(
                f"features file {path!r} has schema_version {version}; this montrage reads up to "
                f"{SCHEMA_VERSION}: upgrade montrage."
            )
        try:
            identity = json.loads(f.attrs["identity"])
            spec = FeatureSpec.from_dict(json.loads(f.attrs["spec"]))
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]]
            timesteps = [int(t) for t in f["timesteps"][()]]
            values = {name: np.asarray(f[name][()], np.float32) for name in spec.families}
            layer_norms = np.asarray(f["layer_norms"][()], np.float32) if "layer_norms" in f else None
            layer_names = (
                [s.decode() if isinstance(s, bytes) else str(s) for s in f["layer_names"][()]]
                if "layer_names" in f
                else None
            )
        except (KeyError, ValueError, TypeError) as err:
            raise OriginError(
                f"features file {path!r} is incomplete or corrupted ({err}); recompute it with "
                "`montrage origin features`."
            ) from err
        label = str(f.attrs.get("label", "")) or None
        seconds = float(f.attrs.get("seconds", 0.0))
    if timesteps != list(spec.timesteps):
        raise OriginError(
            f"features file {path!r}: dataset `timesteps` {timesteps} disagrees with the spec's "
            f"{list(spec.timesteps)}; the file is corrupted, recompute it."
        )
    for name, arr in values.items():
        if arr.shape != (len(ids), len(spec.columns(name))):
            raise OriginError(
                f"features file {path!r}: dataset `{name}` has shape {arr.shape}, expected "
                f"({len(ids)}, {len(spec.columns(name))}); the file is corrupted, recompute it."
            )
    if expect_identity is not None:
        check_same_model(
            identity,
            expect_identity,
            f"features file {path!r}",
            "Recompute the features with this model (`montrage origin features --model ...`), or use "
            "the model the file was made with.",
        )
    return FeatureSet(
        spec=spec,
        identity=identity,
        ids=ids,
        values=values,
        layer_norms=layer_norms,
        layer_names=layer_names,
        label=label,
        seconds=seconds,
    )
