"""Run by test_crash.py and test_follow.py: a store writer in its own process.

Usage: crash_writer.py store STORE      -- StoreWriter: epochs 0, 1 complete, epoch 2 half written, then blocks
       crash_writer.py fit MODEL STORE CKPT_DIR -- a monitored 3-epoch fit, checkpointed every epoch, blocked inside
                                                the snapshot of epoch 2
       crash_writer.py live STORE N GO_DIR -- writes N epochs; after epoch e waits for GO_DIR/e (the follower saw
                                                it), then closes the store

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
    if sys.argv[1] == "live":
        from helpers import epoch_arrays, make_spec
        from montrage.store import StoreWriter

        spec = make_spec()
        w = StoreWriter(sys.argv[2], spec)
        for e in range(int(sys.argv[3])):
            w.append_epoch(e, e * 10, *epoch_arrays(spec, float(e)))
            while not os.path.exists(os.path.join(sys.argv[4], str(e))):
                time.sleep(0.02)
        w.close()
        print("CLOSED", flush=True)
        sys.exit(0)
    if sys.argv[1] == "store":
        from helpers import epoch_arrays, make_spec
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
            helpers.module(model_dir), helpers.data()
        )
    print("NOT KILLED", flush=True)
