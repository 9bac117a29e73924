import os
import subprocess
import sys

import numpy as np
import pytorch_lightning as pl
import torch

import helpers
from montrage.store import StoreReader


def single_process_snapshot(model_dir, lora: dict, path) -> tuple[np.ndarray, np.ndarray]:
    """Probe and training features of one process at the given adapter weights (the epoch-0 snapshot of a fit with
    learning rate 0, which never moves them)."""
    from peft import set_peft_model_state_dict

    m = helpers.module(model_dir, learning_rate=0.0, weight_decay=0.0)
    set_peft_model_state_dict(m.unet, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in lora.items()})
    pl.seed_everything(0)
    helpers.trainer(1, [helpers.callback(path, probe_seeds=[0, 1])]).fit(m, helpers.data())
    with StoreReader(str(path)) as r:
        return r.probe_features("mid_block")[0], r.train_features("mid_block")[0]


def test_two_process_ddp_writes_store_once_and_complete(tiny_model_dir, tmp_path):
    store = tmp_path / "ddp.h5"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "ddp_fit.py"), tiny_model_dir, str(store)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
    # rank 1 alone failed in the snapshot of epoch 2: both ranks skipped it (no hang), rank 0 logged it once
    log = proc.stdout + proc.stderr
    assert log.count("the snapshot of epoch 2 failed and was skipped") == 1
    assert "rank 1: RuntimeError: injected failure on rank 1" in log
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == ["ddp.h5"]  # one file, one writer
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 3]
        order = r.training_order()
        # each epoch, the two ranks together saw all 6 examples (the sampler pads to an even split)
        for e in (0, 1, 2):
            assert set(order["example_index"][order["epoch"] == e].tolist()) == set(range(6))
        ddp = [
            (r.lora_params(row), r.probe_features("mid_block")[row], r.train_features("mid_block")[row])
            for row in range(3)
        ]
    assert any(not np.allclose(ddp[0][0][k], ddp[2][0][k]) for k in ddp[0][0])  # the adapter trained
    # every stored epoch equals what one process computes at the same weights: the split and gather lose nothing
    for row, (lora, probe, train) in enumerate(ddp):
        single_probe, single_train = single_process_snapshot(tiny_model_dir, lora, tmp_path / f"single{row}.h5")
        np.testing.assert_allclose(single_probe, probe, rtol=1e-2, atol=1e-3, err_msg=f"probes, row {row}")
        np.testing.assert_allclose(single_train, train, rtol=1e-2, atol=1e-3, err_msg=f"train, row {row}")
