"""Run by test_ddp.py: a 2-process CPU (gloo) DDP fit with MontrageCallback. Usage: ddp_fit.py MODEL_DIR STORE.

Rank 1 alone fails while encoding the snapshot of epoch 2 (a forward hook raises): every rank must skip that
snapshot together and training must go on (strict=False).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402


class FailOnRank1(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.on = False

        def hook(module, inputs, output):
            if self.on:
                raise RuntimeError("injected failure on rank 1")

        pl_module.unet.mid_block.register_forward_hook(hook)

    def on_train_epoch_start(self, trainer, pl_module):
        self.on = False

    def on_train_epoch_end(self, trainer, pl_module):  # before MontrageCallback's: listed first
        self.on = trainer.global_rank == 1 and trainer.current_epoch == 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, store = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    trainer = helpers.trainer(
        3, [FailOnRank1(), helpers.callback(store, probe_seeds=[0, 1])], devices=2, strategy="ddp"
    )
    trainer.fit(helpers.module(model_dir), helpers.data())
    print(f"rank {trainer.global_rank} done", flush=True)
