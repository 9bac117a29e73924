"""Run by test_monitor.py: one rank of a 2-process (gloo) accelerate run monitored by montrage.

Usage: accelerate_fit.py MODEL_DIR DATA_ROOT STORE OUT_DIR (rank and world from the torch.distributed environment).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import loops  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, data_root, store, out = sys.argv[1:5]
    loops.accelerate_loop(
        model_dir, data_root, store, out, epochs=2, accumulation=1, batch_size=2, every_n_epochs=1, probe_seeds=[0, 1]
    )
    print(f"rank {os.environ['RANK']} done", flush=True)
