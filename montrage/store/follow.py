"""Following a running job: each snapshot as its writer commits it (`montrage inspect --follow`)."""

from __future__ import annotations

import os
import time

from montrage.store.reader import StoreReader
from montrage.store.recovery import left_open_for_write
from montrage.store.schema import StoreError


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
