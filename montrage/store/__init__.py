"""The run's HDF5 store: a fixed, self-describing schema (`schema.DATASETS`, one table) with a growing snapshot
axis, written by one process (`writer`), recovered after a crash (`recovery`), read while it grows (`reader`,
`follow`)."""

from montrage.store.follow import follow_epochs
from montrage.store.reader import StoreReader, check_compatible, first_difference
from montrage.store.recovery import left_open_for_write, rebuild_committed
from montrage.store.run import AdapterSetup, RunDescription
from montrage.store.schema import (
    FORMATS,
    SCHEMA_VERSION,
    STR,
    StoreError,
    StoreMismatchError,
    StoreSpec,
    features_path,
)
from montrage.store.writer import StoreWriter, adapter_digest

__all__ = [
    "AdapterSetup",
    "RunDescription",
    "FORMATS",
    "SCHEMA_VERSION",
    "STR",
    "StoreError",
    "StoreMismatchError",
    "StoreReader",
    "StoreSpec",
    "StoreWriter",
    "adapter_digest",
    "check_compatible",
    "features_path",
    "first_difference",
    "follow_epochs",
    "left_open_for_write",
    "rebuild_committed",
]
