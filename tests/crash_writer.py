"""Run by test_crash.py: write a store, then stop in the middle of an epoch's write until killed.

Usage: crash_writer.py store STORE      -- StoreWriter: epochs 0, 1 complete, epoch 2 half written
       crash_writer.py fit MODEL STORE CKPT_DIR -- a monitored 3-epoch fit, checkpointed every epoch, stopped inside
                                                the snapshot of epoch 2

The stop is a patched h5py Dataset.flush (StoreWriter flushes after every dataset it writes): once `epoch` has
its partial row on disk it prints "MID-WRITE" and sleeps, so the parent's SIGKILL lands mid-write.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402


def stop_inside_epoch(row: int) -> None:
    real = h5py.Dataset.flush

    def flush(self):
        real(self)
        if self.name == "/probes/images" and self.shape[0] == row + 1:  # written after epoch and global_step
            print("MID-WRITE", flush=True)
            time.sleep(600)

    h5py.Dataset.flush = flush


if __name__ == "__main__":
    if sys.argv[1] == "store":
        from test_store import epoch_arrays, make_spec

        from montrage.store import StoreWriter

        spec = make_spec()
        w = StoreWriter(sys.argv[2], spec)
        for e in range(2):
            w.append_epoch(e, e * 10, *epoch_arrays(spec, float(e)))
            w.append_order(e, np.full(3, e), np.arange(3))
        stop_inside_epoch(2)
        w.append_epoch(2, 20, *epoch_arrays(spec, 2.0))
    else:
        import pytorch_lightning as pl
        import torch

        import helpers

        torch.set_num_threads(1)
        model_dir, store, ckpts = sys.argv[2:5]
        stop_inside_epoch(2)
        pl.seed_everything(0)
        saver = pl.callbacks.ModelCheckpoint(dirpath=ckpts, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        helpers.trainer(3, [helpers.callback(store), saver], enable_checkpointing=True).fit(
            helpers.module(model_dir), helpers.data())
    print("NOT KILLED", flush=True)
