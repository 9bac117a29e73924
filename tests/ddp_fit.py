"""Run by test_ddp.py: a 2-process CPU (gloo) DDP fit with MontrageCallback. Usage: ddp_fit.py MODEL_DIR STORE."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, store = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    trainer = helpers.trainer(2, [helpers.callback(store, probe_seeds=[0, 1])], devices=2, strategy="ddp")
    trainer.fit(helpers.module(model_dir), helpers.data())
    print(f"rank {trainer.global_rank} done", flush=True)
