"""A writer that died (SIGKILL, OOM, preemption) leaves HDF5's "open for write" superblock flags set, and HDF5 then
refuses to write the file: the next writer rebuilds it from its committed part. It first takes `<store>.lock`, an
advisory lock that the kernel releases when its holder dies, so a live writer is never mistaken for a dead one."""

from __future__ import annotations

import os

import h5py

from montrage.store.schema import StoreError, grows

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock(path: str) -> tuple[int, int] | None:
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
    sb = superblock(path)
    return sb is not None and sb[0] != 0


def _committed_rows(name: str, committed: tuple[int, int]) -> int | None:
    """How many rows of a dataset are committed (the schema says what grows with what); None: fixed, copied whole."""
    axis = grows(name)
    return {"epoch": committed[0], "order": committed[1]}.get(axis)


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


class WriterLock:
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
