import os
import subprocess
import sys

import numpy as np
import pytorch_lightning as pl

import helpers
from montrage.store import StoreReader


def test_two_process_ddp_writes_store_once_and_complete(tiny_model_dir, tmp_path):
    store = tmp_path / "ddp.h5"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "ddp_fit.py"), tiny_model_dir, str(store)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == ["ddp.h5"]  # one file, one writer
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 2]
        order = r.training_order()
        # each epoch, the two ranks together saw all 6 examples (the sampler pads to an even split)
        for e in (0, 1):
            assert set(order["example_index"][order["epoch"] == e].tolist()) == set(range(6))
        ddp_probe0 = r.probe_features("mid_block")[0]
        ddp_train0 = r.train_features("mid_block")[0]
    # epoch 0 (before any update) is identical to a single-process run: the split and gather lose nothing
    single = tmp_path / "single.h5"
    pl.seed_everything(0)
    helpers.trainer(1, [helpers.callback(single, probe_seeds=[0, 1])]).fit(helpers.module(tiny_model_dir), helpers.data())
    with StoreReader(str(single)) as r:
        np.testing.assert_allclose(r.probe_features("mid_block")[0], ddp_probe0, rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose(r.train_features("mid_block")[0], ddp_train0, rtol=1e-2, atol=1e-3)
