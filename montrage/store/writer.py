"""StoreWriter: creates a store from the schema, or re-opens one (resume, crash recovery), and appends snapshots and
training-order rows. One writer per file, in one process (global rank 0). A snapshot counts only once `committed`
is advanced, after its rows are flushed, so a writer killed mid-snapshot leaves rows that readers ignore."""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np

from montrage.store import schema
from montrage.store.reader import check_compatible
from montrage.store.recovery import WriterLock, left_open_for_write, rebuild_committed
from montrage.store.schema import Part, StoreError, StoreSpec

log = logging.getLogger("montrage.store")


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
        self._lock = WriterLock(path)
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
        schema.create(self.f, self.spec, self.part)
        self.f.flush()

    def _growing(self, axis: str) -> list:
        """The datasets of this file that grow along `axis` ("epoch" or "order"), as the schema lists them."""
        return [self.f[n] for n, a in schema.growing(self.part, self.spec.layers) if a == axis and n in self.f]

    @property
    def committed(self) -> tuple[int, int]:
        c = self.f["committed"][...]
        return int(c[0]), int(c[1])

    def truncate(self, epochs: int, order_rows: int) -> None:
        """Cut the epoch axis and the training-order rows back (resume): what lies beyond is dropped."""
        held_e, held_o = self.committed
        epochs, order_rows = min(epochs, held_e), min(order_rows, held_o)
        for ds in self._growing("epoch"):
            ds.resize(epochs, axis=0)
        for ds in self._growing("order"):
            ds.resize(order_rows, axis=0)
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
        for ds in self._growing("epoch"):
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
