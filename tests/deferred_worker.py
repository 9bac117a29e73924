"""Run by test_deferred.py in its own process.

Usage: deferred_worker.py train MODEL DATA STORE PAUSE  -- a deferred plain-loop run, PAUSE seconds per step; prints
                                                         "CLOSED <time>" once the store is closed
       deferred_worker.py encode STORE ROW               -- `montrage encode`, stopped inside the write of
                                                         features row ROW (prints "MID-WRITE", then sleeps for the
                                                         parent's SIGKILL)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

if __name__ == "__main__":
    if sys.argv[1] == "train":
        import loops

        model, data, store, pause = sys.argv[2:6]
        loops.plain_loop(model, data, store, steps=6, every_n_steps=2, max_steps=6, mode="deferred", pause=float(pause))
        print("CLOSED", time.time(), flush=True)
    elif sys.argv[1] == "encode":
        store, row = sys.argv[2], int(sys.argv[3])
        real = h5py.Dataset.flush

        def flush(self):
            real(self)
            if (
                self.file.filename.endswith(".features.h5")
                and self.name.startswith("/train/features/")
                and self.shape[0] == row + 1
            ):
                print("MID-WRITE", flush=True)
                time.sleep(600)

        h5py.Dataset.flush = flush
        from montrage.deferred import encode_store

        encode_store(store, progress=False)
