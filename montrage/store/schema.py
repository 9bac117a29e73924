"""The store's schema: one table of datasets that drives creation, truncation, crash recovery and validation.

A store is one HDF5 file per run (a deferred run: the training's file, part "adapter", plus `<store>.features.h5`,
part "features", written by `montrage encode`). Root attributes: `schema_version`, `format`, `part`, `spec` (JSON:
model identity, layers, timesteps, pooling, config, ...) and `probes` (the ProbeSet). Every dataset is created up
front, so that readers can follow the file live (SWMR); the growing ones grow along their first axis, with the
committed snapshots ("epoch") or with the committed training-order rows ("order"). `committed` = [snapshots, order
rows] is written last: readers ignore anything beyond it.

Shapes: E snapshots, P probes, C concepts, N training images, M monitored images, T timesteps, F stored features of
a layer, S thumbnail side, K adapter parameters, O training-order rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import h5py
import numpy as np

from montrage.data import TrainExample
from montrage.errors import MontrageError
from montrage.probes import ProbeSet

SCHEMA_VERSION = 3  # 3: the run description (`config`) is a typed RunDescription
STR = h5py.string_dtype()
Part = Literal["all", "adapter", "features"]
FORMATS = {"all": "montrage-store", "adapter": "montrage-store", "features": "montrage-features"}
TRAINING, FEATURES, EVERY = ("all", "adapter"), ("all", "features"), ("all", "adapter", "features")


class StoreError(MontrageError, ValueError):
    """A store that cannot be read or must not be appended to."""


class StoreMismatchError(StoreError):
    """Appending to a store that another run (other probes, model or schema) made."""


@dataclass
class StoreSpec:
    """Everything that fixes the store's schema; two runs may share a store only if these agree."""

    model: dict
    layers: list[str]
    feature_dims: dict[str, int]
    timesteps: list[int]
    pooling: str
    probes: ProbeSet
    train: list[TrainExample]
    thumbnail_size: int
    lora_names: list[str] = field(default_factory=list)
    lora_shapes: list[list[int]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    monitored: list[int] | None = None  # rows of `train` whose features are stored (None: all)
    projection: dict = field(default_factory=dict)  # {"width", "seed", "pooled_dims"} when features are projected

    def __post_init__(self):
        if self.monitored is None:
            self.monitored = list(range(len(self.train)))
        self.monitored = [int(i) for i in self.monitored]

    def identity(self) -> dict:
        """The fields checked before appending, each as a comparable value."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "layers": list(self.layers),
            "feature_dims": dict(self.feature_dims),
            "timesteps": [int(t) for t in self.timesteps],
            "pooling": self.pooling,
            "probes": self.probes.fingerprint(),
            "train_ids": _digest([e.id for e in self.train]),
            "monitored": _digest([self.train[i].id for i in self.monitored]),
            "lora_names": _digest(self.lora_names),
            "projection": {k: self.projection[k] for k in ("width", "seed")} if self.projection else None,
        }

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in ("probes", "train", "monitored")}
        d["projection"] = {k: v for k, v in self.projection.items() if k != "matrices"}
        d["identity"] = self.identity()
        return json.dumps(d, sort_keys=True, default=str)


def _digest(items) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Dataset:
    """One row of the schema. `name` may hold `{layer}` (one dataset per monitored layer). `grows`: None (fixed,
    written at creation from `value(spec)`), "epoch" (one row per committed snapshot) or "order" (one row per
    training example seen). `row(spec, layer)`: the shape of one row of a growing dataset. `chunk`: rows per chunk
    of a 1-D growing dataset (multi-dimensional ones are chunked a row at a time, near 1 MiB, lzf + checksums).
    `optional`: present only where the spec asks for it (validation does not require it)."""

    name: str
    dtype: str
    parts: tuple[str, ...]
    grows: Literal["epoch", "order"] | None = None
    row: Callable[[StoreSpec, str], tuple] | None = None
    value: Callable[[StoreSpec], np.ndarray] | None = None
    chunk: int = 64
    optional: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def names(self, layers) -> list[str]:
        return [self.name.format(layer=layer) for layer in layers] if self.per_layer else [self.name]


def _concepts(s: StoreSpec) -> list[str]:
    """Probe concepts first (the columns of probes/weights), then training concepts no probe names."""
    train_concepts = sorted({e.concept for e in s.train})
    return list(s.probes.concepts) + [c for c in train_concepts if c not in s.probes.concepts]


def _weights(s: StoreSpec) -> np.ndarray:
    w = np.array(s.probes.weight_matrix(), dtype=np.float32)
    full = np.zeros((len(s.probes), len(_concepts(s))), np.float32)
    full[:, : w.shape[1]] = w
    return full


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


def _lora_width(s: StoreSpec) -> int:
    return max(1, sum(int(np.prod(sh)) for sh in s.lora_shapes))


DATASETS = (
    Dataset("committed", "int64", EVERY, value=lambda s: np.zeros(2, np.int64)),
    Dataset("epoch", "int64", EVERY, grows="epoch"),  # completed training epochs at each snapshot (0: before any)
    Dataset("global_step", "int64", EVERY, grows="epoch"),
    Dataset("adapter_check", "int64", ("features",), grows="epoch"),  # digest of the adapter a row was encoded from
    Dataset("concepts", "str", TRAINING, value=lambda s: _strings(_concepts(s))),  # (C,)
    Dataset("probes/prompt", "str", TRAINING, value=lambda s: _strings(p for p, _ in s.probes.items())),  # (P,)
    Dataset("probes/seed", "int64", TRAINING, value=lambda s: np.array([sd for _, sd in s.probes.items()], np.int64)),
    Dataset("probes/weights", "float32", TRAINING, value=_weights),  # (P, C)
    Dataset(
        "probes/features/{layer}",
        "float16",
        FEATURES,
        grows="epoch",
        row=lambda s, layer: (len(s.probes), len(s.timesteps), s.feature_dims[layer]),
    ),  # (E, P, T, F)
    Dataset(
        "probes/images",
        "uint8",
        FEATURES,
        grows="epoch",
        row=lambda s, _: (len(s.probes), s.thumbnail_size, s.thumbnail_size, 3),
    ),  # (E, P, S, S, 3) thumbnails
    Dataset("train/id", "str", TRAINING, value=lambda s: _strings(e.id for e in s.train)),  # (N,) every image
    Dataset("train/concept", "str", TRAINING, value=lambda s: _strings(e.concept for e in s.train)),
    Dataset("train/caption", "str", TRAINING, value=lambda s: _strings(e.caption for e in s.train)),
    Dataset("train/path", "str", TRAINING, value=lambda s: _strings(e.path for e in s.train)),
    Dataset("train/monitored", "int64", TRAINING, value=lambda s: np.array(s.monitored, np.int64)),  # (M,) rows
    Dataset(
        "train/features/{layer}",
        "float16",
        FEATURES,
        grows="epoch",
        row=lambda s, layer: (len(s.monitored), len(s.timesteps), s.feature_dims[layer]),
    ),  # (E, M, T, F)
    Dataset("order/epoch", "int64", TRAINING, grows="order", chunk=4096),  # (O,) one row per example seen
    Dataset("order/global_step", "int64", TRAINING, grows="order", chunk=4096),
    Dataset("order/example_index", "int64", TRAINING, grows="order", chunk=4096),  # rows of train/id
    Dataset("lora/params", "float32", TRAINING, grows="epoch", row=lambda s, _: (_lora_width(s),)),  # (E, K)
    Dataset("projection/{layer}", "float32", TRAINING, optional=True),  # (F pooled, F): layers wider than F only
)


def dataset(name: str) -> Dataset | None:
    """The schema row a dataset name belongs to (per-layer names included), or None."""
    for ds in DATASETS:
        if ds.name == name or (ds.per_layer and name.startswith(ds.name.split("{layer}")[0])):
            return ds
    return None


def grows(name: str) -> str | None:
    """ "epoch", "order" or None (fixed, or not in the schema)."""
    ds = dataset(name)
    return ds.grows if ds is not None else None


def required(part: str, layers) -> list[str]:
    """Every dataset a file of `part` must hold."""
    return [n for ds in DATASETS if part in ds.parts and not ds.optional for n in ds.names(layers)]


def growing(part: str, layers) -> list[tuple[str, str]]:
    """(name, "epoch" | "order") of every growing dataset of `part`."""
    return [(n, ds.grows) for ds in DATASETS if part in ds.parts and ds.grows for n in ds.names(layers)]


def create(f: h5py.File, spec: StoreSpec, part: str) -> None:
    """Write the root attributes and every dataset of `part` into the new file `f`."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["format"] = FORMATS[part]
    f.attrs["part"] = part
    f.attrs["spec"] = spec.to_json()
    f.attrs["probes"] = spec.probes.to_json()
    for ds in DATASETS:
        if part not in ds.parts:
            continue
        if ds.name == "projection/{layer}":
            for layer, matrix in spec.projection.get("matrices", {}).items():
                f.create_dataset(ds.name.format(layer=layer), data=np.asarray(matrix, np.float32))
            continue
        for layer in spec.layers if ds.per_layer else [None]:
            name = ds.name.format(layer=layer) if ds.per_layer else ds.name
            group, leaf = (
                (f.require_group(name.rsplit("/", 1)[0]), name.rsplit("/", 1)[1]) if "/" in name else (f, name)
            )
            dtype = STR if ds.dtype == "str" else ds.dtype
            if ds.grows is None:
                group.create_dataset(leaf, data=ds.value(spec), dtype=dtype)
            elif ds.row is None:
                group.create_dataset(leaf, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(ds.chunk,))
            else:
                _chunked(group, leaf, ds.row(spec, layer), dtype)
    if "lora/params" in f:
        g = f["lora"]
        g.attrs["names"] = json.dumps(spec.lora_names)
        g.attrs["shapes"] = json.dumps(spec.lora_shapes)
        g.attrs["enabled"] = bool(spec.lora_names)


def _chunked(group, name, row_shape, dtype):
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    inner = list(row_shape)
    if row_bytes > (1 << 20) and len(inner) >= 1:
        inner[0] = max(1, int(inner[0] * (1 << 20) // row_bytes))  # keep chunks near 1 MiB
    return group.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=(1, *inner),
        compression="lzf",
        shuffle=True,
        fletcher32=True,  # a checksum per chunk: damaged data fails, not misleads
    )


def features_path(path: str) -> str:
    """The file that holds a deferred store's encoded snapshots (written by `montrage encode`, never by training)."""
    return os.path.splitext(path)[0] + ".features.h5"
