"""The run's HDF5 store: a fixed, self-describing schema with a growing epoch axis, written by one process.

Layout (E = committed epochs, P = probes, N = training images, T = timesteps, F = pooled features):

    attrs            schema_version, spec (JSON: model identity, layers, timesteps, pooling, config, ...)
    committed        (2,) int64   [epochs, order rows] -- written last; readers ignore anything beyond it
    epoch            (E,)         completed training epochs at each snapshot (0 = before any update)
    global_step      (E,)
    concepts         (C,) str     columns of probes/weights
    probes/prompt, probes/seed, probes/weights (P, C)
    probes/features/<layer>  (E, P, T, F) float16
    probes/images            (E, P, S, S, 3) uint8 thumbnails of the generations
    train/id, train/concept, train/caption, train/path   (N,) str   every training image (the order refers to them)
    train/monitored          (M,) int64   rows of the monitored images (all N, or a stable subset)
    train/features/<layer>   (E, M, T, F) float16
    order/epoch, order/global_step, order/example_index  one row per training example seen
    lora/params              (E, K) float32 adapter snapshot per epoch (optional; names/shapes in attrs)
    projection/<layer>       (F_pooled, F)  the fixed projection of pooled features (only for layers wider than F)

A deferred store (attribute part = "adapter") holds no probes/features, probes/images or train/features; they live
in `<store>.features.h5` (part = "features"), written by `montrage encode` with its own committed, epoch,
global_step and adapter_check (the digest of the adapter each row was encoded from); StoreReader joins the two.

All objects are created up front so that the file can be followed live in SWMR mode.

Crash safety: a snapshot counts only once `committed` is advanced, after its rows are flushed, so a writer killed
mid-epoch leaves rows beyond `committed` that readers (SWMR) ignore. A killed writer also leaves HDF5's "open for
write" superblock flags set, and HDF5 then refuses to write the file; the next writer rebuilds it from its committed
part (`rebuild_committed`). It first takes `<store>.lock`, an advisory lock that the kernel releases when its holder
dies, so a live writer is never mistaken for a dead one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import h5py
import numpy as np

from montrage.data import TrainExample
from montrage.errors import MontrageError
from montrage.probes import ProbeSet

SCHEMA_VERSION = 2
STR = h5py.string_dtype()
log = logging.getLogger(__name__)


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


def _float_ds(group, name, row_shape, dtype="float16", rows_per_chunk=None):
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    inner = list(row_shape)
    if rows_per_chunk is None and row_bytes > (1 << 20) and len(inner) >= 1:
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


def _grow(group, name, dtype, chunk=64):
    return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _superblock(path: str) -> tuple[int, int] | None:
    """(consistency flags, end-of-file address) of an HDF5 superblock version 2 or 3 (what libver="latest" writes)
    at the start of the file; None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:8] != HDF5_SIGNATURE or head[8] not in (2, 3):
            return None
        size = head[9]  # bytes per address; then base, extension and end-of-file addresses
        addresses = fh.read(3 * size)
    if len(addresses) < 3 * size:
        return None
    return head[11], int.from_bytes(addresses[2 * size :], "little")


def left_open_for_write(path: str) -> bool:
    """Whether the superblock still says "open for write": a writer has it open, or was killed before closing it.

    HDF5 then refuses to open the file for writing, and to read it other than through SWMR.
    """
    sb = _superblock(path)
    return sb is not None and sb[0] != 0


def _committed_rows(name: str, committed: tuple[int, int]) -> int | None:
    """How many rows of a growing dataset are committed (the writer's own lists say which grow with what)."""
    if name in StoreWriter.EPOCH_DATASETS or name.startswith(("probes/features/", "train/features/")):
        return committed[0]
    if name in StoreWriter.ORDER_DATASETS:
        return committed[1]
    return None  # fixed-size: copied whole


def rebuild_committed(path: str) -> tuple[int, int]:
    """Rewrite a store whose writer died into a clean file holding exactly its committed part; returns it.

    Reads through SWMR (consistent even after SIGKILL), writes `<path>.recover` and renames it over `path` only
    once complete, so an interruption here loses nothing either. Clearing the superblock flags in place is not
    enough: a killed SWMR writer can leave chunk addresses past the recorded end of file, which break the next resize.
    """
    tmp = path + ".recover"
    with h5py.File(path, "r", libver="latest", swmr=True) as src, h5py.File(tmp, "w", libver="latest") as dst:
        committed = tuple(int(v) for v in src["committed"][...])

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                dst.require_group(name).attrs.update(obj.attrs)
                return
            rows = _committed_rows(name, committed)
            if rows is None:
                dst.create_dataset(name, data=obj[...], dtype=obj.dtype)
            else:
                out = dst.create_dataset(
                    name,
                    shape=(rows, *obj.shape[1:]),
                    maxshape=obj.maxshape,
                    dtype=obj.dtype,
                    chunks=obj.chunks,
                    compression=obj.compression,
                    shuffle=obj.shuffle,
                    fletcher32=obj.fletcher32,
                )
                for i in range(0, rows, obj.chunks[0]):  # a chunk at a time: bounded memory
                    j = min(rows, i + obj.chunks[0])
                    out[i:j] = obj[i:j]
            dst[name].attrs.update(obj.attrs)

        dst.attrs.update(src.attrs)
        src.visititems(copy)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return committed


class _WriterLock:
    """`<store>.lock`, held with flock for the writer's lifetime; the kernel drops it when the process dies."""

    def __init__(self, path: str):
        self.path = path + ".lock"
        self.fd = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, and no recovery of a killed writer's flags either
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"store {path!r} is being written by another live process (it holds {self.path!r}). "
                "One store per run: give this run another store_path, or stop the other run."
            ) from None
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


Part = Literal["all", "adapter", "features"]
FORMATS = {"all": "montrage-store", "adapter": "montrage-store", "features": "montrage-features"}


def features_path(path: str) -> str:
    """The file that holds a deferred store's encoded snapshots (written by `montrage encode`, never by training)."""
    return os.path.splitext(path)[0] + ".features.h5"


def adapter_digest(params: np.ndarray) -> int:
    """A signed 64-bit digest of one adapter snapshot: tells a deferred encode whether a row it encoded is stale."""
    import hashlib

    return int.from_bytes(
        hashlib.sha1(np.ascontiguousarray(params, np.float32).tobytes()).digest()[:8], "little", signed=True
    )


class StoreWriter:
    """Creates or re-opens a store for appending; one instance, in one process (global rank 0).

    `part`: "all" (inline: one file with everything), "adapter" (deferred training: the adapter snapshots, training
    order and description, no features) or "features" (`montrage encode`'s file beside a deferred store: probe and
    training features and probe thumbnails of each encoded snapshot). One writer per file; the reader joins them.
    """

    EPOCH_DATASETS = ("epoch", "global_step", "probes/images", "lora/params", "adapter_check")
    ORDER_DATASETS = ("order/epoch", "order/global_step", "order/example_index")

    def __init__(
        self,
        path: str,
        spec: StoreSpec,
        overwrite: bool = False,
        truncate_to: tuple[int, int] | None = None,
        part: Part = "all",
    ):
        """Open `path`; a new file gets the schema, an existing one must match `spec`.

        `truncate_to=(epochs, order_rows)` cuts an existing store back (resume from a checkpoint); without it, an
        existing store that already holds epochs is refused unless `overwrite` (which deletes it).
        """
        self.path = path
        self.spec = spec
        self.part = part
        self.f = None
        self._lock = _WriterLock(path)
        try:
            self._open(overwrite, truncate_to)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool, truncate_to: tuple[int, int] | None) -> None:
        path, spec = self.path, self.spec
        exists = os.path.exists(path)
        if exists and overwrite and truncate_to is None:
            os.remove(path)
            exists = False
        if exists:
            check_compatible(path, spec)
            if self._lock.held and left_open_for_write(path):
                epochs, rows = rebuild_committed(path)
                log.warning(
                    "store %s: its last writer stopped without closing it (killed or crashed); recovered its "
                    "%d complete epoch(s) and %d training-order rows, a partly written epoch is dropped.",
                    path,
                    epochs,
                    rows,
                )
            try:
                self.f = h5py.File(path, "a", libver="latest")
            except BlockingIOError as err:
                raise StoreError(
                    f"store {path!r} is open in another process ({err}): a reader opened while no writer "
                    "had it (montrage inspect, an Attributor) blocks writers. Close it and start again; "
                    "readers started after the writer (inspect --follow) do not block it."
                ) from err
            held = int(self.f["committed"][0])
            if truncate_to is None and held > 0:
                raise StoreError(
                    f"store {path!r} already holds {held} epoch(s) of a run. To continue that run resume from its "
                    "checkpoint (ckpt_path=...); to start over set overwrite=True or choose another store_path."
                )
            self.truncate(*(truncate_to or (0, 0)))
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = h5py.File(path, "w", libver="latest")
            self._create()
        self.f.swmr_mode = True

    def _create(self) -> None:
        f, s = self.f, self.spec
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["format"] = FORMATS[self.part]
        f.attrs["part"] = self.part
        f.attrs["spec"] = s.to_json()
        f.attrs["probes"] = s.probes.to_json()
        f.create_dataset("committed", data=np.zeros(2, np.int64))
        _grow(f, "epoch", "int64")
        _grow(f, "global_step", "int64")
        items, T = s.probes.items(), len(s.timesteps)
        if self.part != "adapter":
            for layer in s.layers:
                _float_ds(f.require_group("probes/features"), layer, (len(items), T, s.feature_dims[layer]))
                _float_ds(f.require_group("train/features"), layer, (len(s.monitored), T, s.feature_dims[layer]))
            _float_ds(
                f.require_group("probes"), "images", (len(items), s.thumbnail_size, s.thumbnail_size, 3), dtype="uint8"
            )
        if self.part == "features":
            _grow(f, "adapter_check", "int64")  # digest of the adapter snapshot each row was encoded from
            f.flush()
            return
        train_concepts = sorted({e.concept for e in s.train})
        concepts = list(s.probes.concepts) + [c for c in train_concepts if c not in s.probes.concepts]
        f.create_dataset("concepts", data=np.array(concepts, dtype=object), dtype=STR)
        pg = f.require_group("probes")
        pg.create_dataset("prompt", data=np.array([p for p, _ in items], dtype=object), dtype=STR)
        pg.create_dataset("seed", data=np.array([sd for _, sd in items], dtype=np.int64))
        w = np.array(s.probes.weight_matrix(), dtype=np.float32)
        full = np.zeros((len(items), len(concepts)), np.float32)
        full[:, : w.shape[1]] = w
        pg.create_dataset("weights", data=full)
        tg = f.require_group("train")
        for key in ("id", "concept", "caption", "path"):
            tg.create_dataset(key, data=np.array([getattr(e, key) for e in s.train], dtype=object), dtype=STR)
        tg.create_dataset("monitored", data=np.array(s.monitored, dtype=np.int64))
        for layer, matrix in s.projection.get("matrices", {}).items():
            f.create_dataset(f"projection/{layer}", data=np.asarray(matrix, np.float32))
        og = f.create_group("order")
        for key in ("epoch", "global_step", "example_index"):
            _grow(og, key, "int64", chunk=4096)
        lg = f.create_group("lora")
        _float_ds(lg, "params", (max(1, sum(int(np.prod(sh)) for sh in s.lora_shapes)),), dtype="float32")
        lg.attrs["names"] = json.dumps(s.lora_names)
        lg.attrs["shapes"] = json.dumps(s.lora_shapes)
        lg.attrs["enabled"] = bool(s.lora_names)
        f.flush()

    def _epoch_datasets(self):
        names = list(self.EPOCH_DATASETS)
        names += [f"probes/features/{layer}" for layer in self.spec.layers]
        names += [f"train/features/{layer}" for layer in self.spec.layers]
        return [self.f[n] for n in names if n in self.f]

    @property
    def committed(self) -> tuple[int, int]:
        c = self.f["committed"][...]
        return int(c[0]), int(c[1])

    def truncate(self, epochs: int, order_rows: int) -> None:
        """Cut the epoch axis and the training-order rows back (resume): what lies beyond is dropped."""
        held_e, held_o = self.committed
        epochs, order_rows = min(epochs, held_e), min(order_rows, held_o)
        for ds in self._epoch_datasets():
            ds.resize(epochs, axis=0)
        for n in self.ORDER_DATASETS:
            if n in self.f:
                self.f[n].resize(order_rows, axis=0)
        self.f["committed"][...] = [epochs, order_rows]
        self.f.flush()

    def append_epoch(
        self,
        epoch: int,
        global_step: int,
        probe_features: dict,
        train_features: dict,
        probe_images: np.ndarray,
        lora_params: np.ndarray | None = None,
    ) -> int:
        """Write one snapshot; it counts only once the commit counter is written (after a flush)."""
        for layer in self.spec.layers:
            a = train_features.get(layer)
            if a is None or a.shape[0] != len(self.spec.monitored) or not np.all(np.isfinite(a)):
                raise StoreError(
                    f"refusing to write epoch {epoch}: train features of layer {layer!r} are missing, of "
                    "the wrong size or not finite."
                )
        self.begin_epoch()  # commit_epoch checks the probe features and the adapter before anything counts
        for layer in self.spec.layers:
            self.write_train_rows(layer, slice(None), train_features[layer])
        return self.commit_epoch(epoch, global_step, probe_features, probe_images, lora_params)

    def _check_probe_values(self, epoch: int, probe_features: dict | None, lora_params) -> None:
        for layer in self.spec.layers if self.part != "adapter" else ():
            a = probe_features.get(layer)
            if a is None or a.shape[0] != len(self.spec.probes) or not np.all(np.isfinite(a)):
                raise StoreError(
                    f"refusing to write epoch {epoch}: probe features of layer {layer!r} are missing, of "
                    "the wrong size or not finite."
                )
        if lora_params is not None and not np.all(np.isfinite(lora_params)):
            raise StoreError(f"refusing to write epoch {epoch}: the LoRA snapshot is not finite.")

    def begin_epoch(self) -> int:
        """Open the next snapshot's row in every per-snapshot dataset (readers ignore it until it is committed), so
        that training features can be written a block at a time; returns the row. Re-opening overwrites a row that a
        failed snapshot left uncommitted."""
        e, _ = self.committed
        for ds in self._epoch_datasets():
            ds.resize(e + 1, axis=0)
        return e

    def write_train_rows(self, layer: str, rows: slice, values: np.ndarray) -> None:
        """Training features of monitored rows `rows` into the open snapshot row (see `begin_epoch`)."""
        e, _ = self.committed
        ds = self.f[f"train/features/{layer}"]
        if ds.shape[0] != e + 1:
            raise StoreError(f"store {self.path!r}: no snapshot row is open (call begin_epoch first).")
        ds[e, rows] = np.asarray(values, dtype=np.float16)

    def commit_epoch(
        self,
        epoch: int,
        global_step: int,
        probe_features: dict | None = None,
        probe_images: np.ndarray | None = None,
        lora_params: np.ndarray | None = None,
        adapter_check: int | None = None,
    ) -> int:
        """Write the open snapshot's remaining values and commit it (flush first, the counter last). The adapter
        part takes no features; the features part no adapter."""
        self._check_probe_values(epoch, probe_features, lora_params)
        e, _ = self.committed
        values = {"epoch": epoch, "global_step": global_step}
        if "adapter_check" in self.f:
            values["adapter_check"] = 0 if adapter_check is None else int(adapter_check)
        if "lora/params" in self.f:
            values["lora/params"] = (
                lora_params if lora_params is not None else np.zeros(self.f["lora/params"].shape[1:], np.float32)
            )
        if self.part != "adapter":
            values["probes/images"] = probe_images
            for layer in self.spec.layers:
                values[f"probes/features/{layer}"] = probe_features[layer].astype(np.float16)
        for name, value in values.items():
            ds = self.f[name]
            ds.resize(e + 1, axis=0)
            ds[e] = value
            ds.flush()
        for layer in self.spec.layers if self.part != "adapter" else ():
            self.f[f"train/features/{layer}"].flush()
        self.f["committed"][0] = e + 1
        self.f["committed"].flush()
        self.f.flush()
        return e + 1

    def append_order(self, epoch, global_steps: np.ndarray, example_index: np.ndarray) -> int:
        """Record which examples (rows of train/id) optimizer steps saw; `epoch` is one value or one per row."""
        e, o = self.committed
        n = len(example_index)
        if n == 0:
            return o
        epochs = np.broadcast_to(np.asarray(epoch, dtype=np.int64), (n,))
        for name, value in (
            ("order/epoch", epochs),
            ("order/global_step", global_steps),
            ("order/example_index", example_index),
        ):
            ds = self.f[name]
            ds.resize(o + n, axis=0)
            ds[o : o + n] = value
            ds.flush()
        self.f["committed"][1] = o + n
        self.f["committed"].flush()
        self.f.flush()
        return o + n

    def close(self) -> None:
        if getattr(self, "f", None) is not None and self.f.id.valid:
            self.f.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()


def _open_read(path: str) -> h5py.File:
    """Open for reading: through SWMR while a writer has the file open, plainly otherwise (a damaged closed file then
    fails at once instead of in HDF5's SWMR retry loop, which sleeps for minutes on bad checksums)."""
    if not os.path.isfile(path):
        raise StoreError(f"store {path!r} does not exist.")
    sb = _superblock(path)
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


REQUIRED = (
    "committed",
    "epoch",
    "global_step",
    "concepts",
    "probes/prompt",
    "probes/seed",
    "probes/weights",
    "train/id",
    "train/concept",
    "train/caption",
    "train/path",
    "train/monitored",
    "order/epoch",
    "order/global_step",
    "order/example_index",
    "lora/params",
)


def _check_layout(f: h5py.File) -> None:
    """Every dataset the schema promises is there and its metadata reads: damage fails here, named, not later."""
    path = f.filename
    try:
        # committed first: a live writer only grows the datasets after it, so their shapes read later cover it
        committed = f["committed"][...] if "committed" in f else None
        spec, part = json.loads(f.attrs["spec"]), f.attrs.get("part", "all")
        features = ["probes/images"] + [
            f"{g}/features/{layer}" for g in ("probes", "train") for layer in spec["layers"]
        ]
        names = {
            "all": list(REQUIRED) + features,
            "adapter": list(REQUIRED),
            "features": ["committed", "epoch", "global_step"] + features,
        }[part]
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
        feature = name == "probes/images" or name.startswith(("probes/features/", "train/features/"))
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
        g = self.f["lora"]
        if not g.attrs.get("enabled", False):
            return {}
        names, shapes = json.loads(g.attrs["names"]), json.loads(g.attrs["shapes"])
        flat = self._read("lora/params", epoch_row)
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
            "lora_snapshots": bool(self.f["lora"].attrs.get("enabled", False)),
            "mode": "deferred" if self.deferred else "inline",
            "adapter_snapshots": self.adapter_snapshots,
            "projection": self.spec.get("projection") or None,
            "file_bytes": os.path.getsize(self.path)
            + (os.path.getsize(self.features_path) if self.deferred and os.path.isfile(self.features_path) else 0),
            "datasets": datasets,
        }


def _being_written(path: str) -> bool:
    """True while a writer may still be creating or appending to `path` (also after a writer crash)."""
    try:
        return os.path.getsize(path) < 12 or left_open_for_write(path)
    except FileNotFoundError:
        return True


def follow_epochs(path: str, interval: float = 2.0, timeout: float | None = None):
    """Yield each snapshot as a running job commits it, reading through SWMR; for `montrage inspect --follow`.

    Yields `{"event": "epoch", "row", "epoch", "global_step"}` per committed snapshot (those already
    there first), `{"event": "cut", "epochs"}` when a resumed run cut the store back, and last
    `{"event": "end", "reason": "closed" | "timeout", "epochs"}`. Waits for a store that does not exist yet. Ends
    when the writer closes the store; after a writer crash the file stays marked open, so it waits (the run may be
    resumed) until `timeout`. A re-created file (overwrite, crash recovery) is re-opened.
    """
    deadline = None if not timeout else time.monotonic() + timeout
    reader, inode, seen = None, None, 0
    try:
        while True:
            open_for_write = _being_written(path)
            try:
                ino = os.stat(path).st_ino
                if reader is None or ino != inode:
                    if reader is not None:
                        reader.close()
                    reader = None
                    reader, inode = StoreReader(path), ino
            except (FileNotFoundError, StoreError):
                if not open_for_write:
                    raise
            if reader is not None:
                reader.refresh()
                n = reader.num_epochs
                if n < seen:
                    yield {"event": "cut", "epochs": n}
                    seen = n
                epochs, steps = reader.epochs, reader.global_steps
                for row in range(seen, n):
                    yield {"event": "epoch", "row": row, "epoch": int(epochs[row]), "global_step": int(steps[row])}
                seen = n
                if not open_for_write:  # checked before reading: nothing can land after the close we saw
                    yield {"event": "end", "reason": "closed", "epochs": seen}
                    return
            if deadline is not None and time.monotonic() >= deadline:
                yield {"event": "end", "reason": "timeout", "epochs": seen}
                return
            time.sleep(interval)
    finally:
        if reader is not None:
            reader.close()
