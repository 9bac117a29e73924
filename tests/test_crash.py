"""A writer killed with SIGKILL in the middle of an epoch: the store opens, keeps every complete epoch, and a
resumed run continues it without duplicates (real subprocesses, really killed)."""

import os
import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

import helpers
from helpers import epoch_arrays, make_spec
from montrage.store import StoreError, StoreReader, StoreWriter, left_open_for_write

SCRIPT = helpers.CRASH_WRITER


def start_until_mid_write(*args, timeout=120):
    """Start crash_writer.py and return it once it is blocked inside an epoch's write."""
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )
    timer = threading.Timer(timeout, proc.kill)  # a hang ends the readline below
    timer.start()
    try:
        line = ""
        while line.strip() != "MID-WRITE":
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("writer ended before the mid-write point:\n" + proc.stderr.read()[-3000:])
    except BaseException:
        proc.kill()
        raise
    finally:
        timer.cancel()
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def test_store_killed_mid_epoch_recovers_complete_epochs(tmp_path):
    path = str(tmp_path / "s.h5")
    spec = make_spec()
    proc = start_until_mid_write("store", path)
    try:
        # while the writer lives, nobody else may write (its HDF5 lock is gone in SWMR mode; ours is not)
        before = open(path, "rb").read()
        with pytest.raises(StoreError, match="being written by another live process"):
            StoreWriter(path, spec, truncate_to=(2, 6))
        assert open(path, "rb").read() == before
    finally:
        kill(proc)
    assert left_open_for_write(path)  # HDF5 alone would now refuse to write this file
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert f["epoch"].shape[0] == 3 and f["probes/images"].shape[0] == 3  # the partial epoch is on disk
    with StoreReader(path) as r:  # ... and invisible
        assert list(r.epochs) == [0, 1] and list(r.global_steps) == [0, 10]
        assert r.train_features("mid_block")[:, 0, 0, 0].tolist() == [0.5, 1.5]
        assert r.probe_images().shape[0] == 2
        assert r.training_order()["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(StoreError, match="already holds 2 epoch"):  # a fresh run is still refused
        StoreWriter(path, spec)
    assert not left_open_for_write(path)  # ... but the file was made writable again
    w = StoreWriter(path, spec, truncate_to=(2, 6))  # the resumed run
    w.append_epoch(2, 20, *epoch_arrays(spec, 2.0))
    w.append_order(2, np.full(3, 2), np.arange(3))
    w.close()
    with StoreReader(path) as r:
        assert list(r.epochs) == [0, 1, 2] and r.f["epoch"].shape == (3,)
        assert r.train_features("mid_block")[:, 0, 0, 0].tolist() == [0.5, 1.5, 2.5]
        assert r.lora_params(2)["b"].tolist() == [8.0, 9.0, 10.0]
        assert np.bincount(r.training_order()["epoch"]).tolist() == [3, 3, 3]


def test_training_run_killed_mid_snapshot_resumes_without_duplicates(tiny_model_dir, tmp_path):
    store, ckpts = tmp_path / "s.h5", tmp_path / "ckpt"
    kill(start_until_mid_write("fit", tiny_model_dir, str(store), str(ckpts), timeout=300))
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1]  # the snapshot of epoch 2 was cut short
        kept = r.train_features("mid_block")
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0.ckpt"]
    helpers.trainer(3, [helpers.callback(store)]).fit(
        helpers.module(tiny_model_dir), helpers.data(), ckpt_path=str(ckpts / "epoch=0.ckpt")
    )
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 2, 3] and list(r.global_steps) == [0, 2, 4, 6]
        np.testing.assert_array_equal(r.train_features("mid_block")[:2], kept)
        assert np.bincount(r.training_order()["epoch"]).tolist() == [6, 6, 6]
