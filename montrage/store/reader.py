"""Reading a store: validated at open (header, schema version, every dataset the schema requires, `committed`
consistent), joined with a deferred store's features file, and only ever the committed part (SWMR while a writer
appends)."""

from __future__ import annotations

import functools
import json
import os

import h5py
import numpy as np

from montrage.data import TrainExample
from montrage.probes import ProbeSet
from montrage.store import schema
from montrage.store.recovery import superblock
from montrage.store.run import RunDescription
from montrage.store.schema import FORMATS, SCHEMA_VERSION, StoreError, StoreMismatchError, StoreSpec, features_path


def _open_read(path: str) -> h5py.File:
    """Open for reading: through SWMR while a writer has the file open, plainly otherwise (a damaged closed file then
    fails at once instead of in HDF5's SWMR retry loop, which sleeps for minutes on bad checksums)."""
    if not os.path.isfile(path):
        raise StoreError(f"store {path!r} does not exist.")
    sb = superblock(path)
    live = sb is not None and sb[0] != 0
    if sb is not None and not live and os.path.getsize(path) < sb[1]:
        raise StoreError(
            f"{path!r} is truncated: {os.path.getsize(path)} bytes where its HDF5 superblock says {sb[1]} "
            "(an interrupted copy or download, or a full disk). Copy it again from its source."
        )
    try:
        f = h5py.File(path, "r", libver="latest", swmr=live)
    except OSError as err:
        raise StoreError(
            f"{path!r} is not a readable HDF5 file ({err}); it may be truncated or not a montrage store."
        ) from err
    try:
        _check_header(f)
        _check_layout(f)
    except BaseException:
        f.close()
        raise
    return f


def _check_header(f: h5py.File) -> None:
    path = f.filename
    try:
        fmt, has_spec, version = f.attrs.get("format"), "spec" in f.attrs, int(f.attrs.get("schema_version", -1))
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise StoreError(
            f"store {path!r} is damaged: its root attributes do not read ({err}). Copy it again from "
            "its source, or re-run the monitoring."
        ) from err
    if fmt not in FORMATS.values() or not has_spec:
        raise StoreError(f"{path!r} is an HDF5 file but not a montrage store (attribute 'format' is missing).")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"store {path!r} has schema_version {version}; this montrage reads version {SCHEMA_VERSION}. "
            "Use the montrage release that wrote it, or re-run the monitoring."
        )


def _check_layout(f: h5py.File) -> None:
    """Every dataset the schema promises is there and its metadata reads: damage fails here, named, not later."""
    path = f.filename
    try:
        # committed first: a live writer only grows the datasets after it, so their shapes read later cover it
        committed = f["committed"][...] if "committed" in f else None
        spec, part = json.loads(f.attrs["spec"]), f.attrs.get("part", "all")
        names = schema.required(part, spec["layers"])
        for name in names:
            if name not in f:
                raise StoreError(
                    f"store {path!r} lacks the dataset {name!r}: it was not written by a complete montrage "
                    "run of this schema. Re-run the monitoring into a new store."
                )
            f[name].id.get_storage_size()
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        if isinstance(err, StoreError):
            raise
        raise StoreError(
            f"store {path!r} is damaged ({err}). Copy it again from its source, or re-run the monitoring."
        ) from err
    if (
        committed.shape != (2,)
        or committed[0] > f["epoch"].shape[0]
        or (part != "features" and committed[1] > f["order/epoch"].shape[0])
    ):
        raise StoreError(
            f"store {path!r}: field 'committed' ({committed.tolist()}) does not match its datasets; the "
            "file is damaged. Copy it again from its source, or re-run the monitoring."
        )


def first_difference(held: dict, spec: StoreSpec) -> tuple[str, object, object] | None:
    """(field, stored value, spec's value) of the first identity field in which a stored identity and `spec`
    differ, or None when they agree."""
    mine = json.loads(json.dumps(spec.identity(), default=str))
    for key, value in mine.items():
        if held.get(key) != value:
            return key, held.get(key), value
    return None


def check_compatible(path: str, spec: StoreSpec) -> None:
    """Raise StoreMismatchError naming the first field in which the store at `path` and `spec` differ."""
    with _open_read(path) as f:
        held = json.loads(f.attrs["spec"]).get("identity", {})
    diff = first_difference(held, spec)
    if diff is not None:
        raise StoreMismatchError(
            f"store {path!r} was made by another run: field {diff[0]!r} differs (store: {diff[1]!r}, this run: "
            f"{diff[2]!r}). Use a new store_path for this run, or delete the old store."
        )


class StoreReader:
    """Read-only view of the committed part of a store (safe while a writer appends, via SWMR)."""

    def __init__(self, path: str, features: bool = True):
        """`features=False`: leave a deferred store's features file closed (its writer, `montrage encode`, opens it)."""
        self.path = path
        self._join = features
        self.f = _open_read(path)
        self.spec = json.loads(self.f.attrs["spec"])
        self.probes = ProbeSet.from_json(self.f.attrs["probes"])
        self.deferred = self.f.attrs.get("part", "all") == "adapter"
        self.features_path = features_path(path) if self.deferred else path
        self.ff: h5py.File | None = None if self.deferred else self.f  # the file that holds the features
        self._open_features()

    def _open_features(self) -> None:
        if self.ff is not None or not self._join or not os.path.isfile(self.features_path):
            return
        ff = _open_read(self.features_path)
        if json.loads(ff.attrs["spec"]).get("identity") != self.spec.get("identity"):
            ff.close()
            raise StoreError(
                f"{self.features_path!r} holds the encoded features of another run than {self.path!r}; "
                f"delete it and run `montrage encode {self.path}` again."
            )
        self.ff = ff

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.ff is not None and self.ff is not self.f:
            self.ff.close()
        self.f.close()

    def refresh(self) -> None:
        self._open_features()
        for f in {id(self.f): self.f, id(self.ff): self.ff}.values():
            if f is not None:
                for ds in ("committed", "epoch", "global_step"):
                    f[ds].refresh()

    @property
    def adapter_snapshots(self) -> int:
        """Snapshots the training run committed (for a deferred store: adapter weights, encoded or not)."""
        return int(self.f["committed"][0])

    @property
    def has_adapters(self) -> bool:
        """Whether the run saved adapter snapshots (`lora/params` rows hold the weights)."""
        return bool(self.f["lora"].attrs.get("enabled", False))

    @property
    def adapter_steps(self) -> np.ndarray:
        """Global step of every committed snapshot of the training file (a deferred store's, encoded or not)."""
        return self.f["global_step"][: self.adapter_snapshots]

    @property
    def adapter_epochs(self) -> np.ndarray:
        return self.f["epoch"][: self.adapter_snapshots]

    def adapter_params(self, row: int) -> np.ndarray:
        """The flat adapter snapshot of one row (what `adapter_digest` digests); `lora_params` splits it by name."""
        return self._read("lora/params", row)

    @property
    def num_epochs(self) -> int:
        """Complete snapshots: for a deferred store, the leading adapter snapshots `montrage encode` has encoded (a
        snapshot that a resumed run rewrote at another step is not counted)."""
        n = self.adapter_snapshots
        if not self.deferred:
            return n
        if self.ff is None:
            return 0
        k = min(n, int(self.ff["committed"][0]))
        same = self.ff["global_step"][:k] == self.f["global_step"][:k]
        return int(k if same.all() else np.argmin(same))

    @functools.cached_property
    def run(self) -> RunDescription:
        """The run description the Monitor recorded (typed; a missing or unknown field is an error naming it). The
        spec is fixed for the file's life, so it is read once."""
        return RunDescription.from_dict(
            self.spec["config"], where=f"store {self.path!r} (attribute spec, field config)"
        )

    @property
    def layers(self) -> list[str]:
        return list(self.spec["layers"])

    @property
    def timesteps(self) -> list[int]:
        return list(self.spec["timesteps"])

    @property
    def epochs(self) -> np.ndarray:
        return self.f["epoch"][: self.num_epochs]

    @property
    def global_steps(self) -> np.ndarray:
        return self.f["global_step"][: self.num_epochs]

    @property
    def concepts(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.f["concepts"][...]]

    def strings(self, name: str) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.f[name][...]]

    @property
    def all_train(self) -> list[TrainExample]:
        """Every training image of the run (what `training_order()['example_index']` refers to)."""
        cols = [self.strings(f"train/{k}") for k in ("id", "concept", "caption", "path")]
        return [TrainExample(*row) for row in zip(*cols)]

    @property
    def monitored_rows(self) -> np.ndarray:
        """Rows of `all_train` whose features are stored, in feature order."""
        return self.f["train/monitored"][...]

    @property
    def train(self) -> list[TrainExample]:
        """The monitored training images, one per row of `train_features` (all of them unless a subset was set)."""
        everything = self.all_train
        return [everything[i] for i in self.monitored_rows]

    @property
    def num_train(self) -> int:
        """Rows of `train_features` (monitored images)."""
        return int(self.f["train/monitored"].shape[0])

    def _read(self, name: str, sel) -> np.ndarray:
        """Committed values of a growing dataset; a damaged chunk becomes a StoreError naming file and dataset."""
        feature = "adapter" not in schema.dataset(name).parts  # in a deferred store's features file
        f = self.ff if feature else self.f
        if f is None:
            raise StoreError(
                f"store {self.path!r} is deferred (training saved the adapter snapshots only) and none is "
                f"encoded yet: run `montrage encode {self.path}` first."
            )
        ds = f[name]
        ds.refresh()
        try:
            return ds[sel]
        except (OSError, RuntimeError) as err:
            raise StoreError(
                f"store {f.filename!r}: cannot read {name!r} ({err}); the file is damaged. Copy it again "
                "from its source, or re-run the monitoring."
            ) from err

    def projection(self, layer: str) -> np.ndarray | None:
        """The fixed (pooled, stored) projection of a layer's features, or None when they are stored unprojected."""
        name = f"projection/{layer}"
        return self.f[name][...] if name in self.f else None

    def _epochs(self, epochs: slice) -> slice:
        """A slice over the committed epoch rows (negative bounds count from the last committed one)."""
        return slice(*epochs.indices(self.num_epochs))

    def probe_features(self, layer: str, epochs: slice = slice(None)) -> np.ndarray:
        """(E, P, T, F) probe features of the committed epochs, or of the rows `epochs` selects (e.g. slice(-1, None))."""
        return self._read(f"probes/features/{layer}", self._epochs(epochs)).astype(np.float32)

    def train_features(self, layer: str, rows: slice = slice(None), epochs: slice = slice(None)) -> np.ndarray:
        return self._read(f"train/features/{layer}", np.s_[self._epochs(epochs), rows]).astype(np.float32)

    def probe_images(self, epochs: slice = slice(None)) -> np.ndarray:
        return self._read("probes/images", self._epochs(epochs))

    def training_order(self) -> dict[str, np.ndarray]:
        rows = int(self.f["committed"][1])
        return {k: self.f[f"order/{k}"][:rows] for k in ("epoch", "global_step", "example_index")}

    def lora_params(self, epoch_row: int) -> dict[str, np.ndarray]:
        """The adapter tensors of one stored snapshot, by parameter name (empty when no snapshots were saved)."""
        if not self.has_adapters:
            return {}
        g = self.f["lora"]
        names, shapes = json.loads(g.attrs["names"]), json.loads(g.attrs["shapes"])
        flat = self.adapter_params(epoch_row)
        out, at = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            out[name] = flat[at : at + n].reshape(shape)
            at += n
        return out

    def summary(self) -> dict:
        """What `montrage inspect --json` prints."""
        datasets = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets[name] = {
                    "shape": list(obj.shape),
                    "dtype": str(obj.dtype),
                    "bytes": int(obj.id.get_storage_size()),
                }

        self.f.visititems(visit)
        if self.ff is not None and self.ff is not self.f:
            self.ff.visititems(visit)
        probes = self.probes
        return {
            "path": self.path,
            "schema_version": int(self.f.attrs["schema_version"]),
            "model": self.spec["model"],
            "epochs": [int(e) for e in self.epochs],
            "global_steps": [int(s) for s in self.global_steps],
            "num_probes": len(probes),
            "probe_prompts": list(probes.prompts),
            "probe_seeds": list(probes.seeds),
            "num_train_images": len(self.f["train/id"]),
            "num_monitored_images": self.num_train,
            "concepts": self.concepts,
            "layers": self.layers,
            "feature_dims": self.spec["feature_dims"],
            "timesteps": self.timesteps,
            "pooling": self.spec["pooling"],
            "training_order_rows": int(self.f["committed"][1]),
            "lora_snapshots": self.has_adapters,
            "mode": "deferred" if self.deferred else "inline",
            "adapter_snapshots": self.adapter_snapshots,
            "projection": self.spec.get("projection") or None,
            "file_bytes": os.path.getsize(self.path)
            + (os.path.getsize(self.features_path) if self.deferred and os.path.isfile(self.features_path) else 0),
            "datasets": datasets,
        }
