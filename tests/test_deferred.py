"""Deferred mode: training saves adapter snapshots only; `montrage encode` writes the features later -- equal to an
inline run, resumable after SIGKILL, split across processes, following a live run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import loops
from montrage.cli import main
from montrage.deferred import NothingToEncode, encode_store
from montrage.monitor import MontrageConfigError
from montrage.store import StoreReader, features_path

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deferred_worker.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return loops.write_digit_folder(tmp_path_factory.mktemp("digits"), per_concept=3)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_root, tmp_path_factory):
    """The same plain-loop run monitored inline and deferred (encoded afterwards)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("inline", "deferred"):
        out[mode] = str(root / f"{mode}.h5")
        losses, lora, _ = loops.plain_loop(
            tiny_model_dir, data_root, out[mode], every_n_steps=2, max_steps=5, mode=mode
        )
        out[f"{mode}_lora"] = lora
    out["root"] = root
    return out


def assert_same_store(a_path, b_path, atol=0.0):
    with StoreReader(a_path) as a, StoreReader(b_path) as b:
        assert a.num_epochs == b.num_epochs > 0
        assert a.global_steps.tolist() == b.global_steps.tolist() and a.epochs.tolist() == b.epochs.tolist()
        for layer in a.layers:
            np.testing.assert_allclose(a.probe_features(layer), b.probe_features(layer), atol=atol)
            np.testing.assert_allclose(a.train_features(layer), b.train_features(layer), atol=atol)
        assert np.abs(a.probe_images().astype(int) - b.probe_images().astype(int)).max() <= (2 if atol else 0)
        for k, v in a.training_order().items():
            assert np.array_equal(v, b.training_order()[k])
        for row in range(a.num_epochs):
            la, lb = a.lora_params(row), b.lora_params(row)
            assert la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)


def test_deferred_training_saves_adapters_only_and_encode_equals_inline(runs, tmp_path):
    for k in runs["inline_lora"]:
        assert torch.equal(runs["inline_lora"][k], runs["deferred_lora"][k])  # the monitor never changes training
    deferred = runs["deferred"]
    with StoreReader(deferred) as r:
        assert r.deferred and r.adapter_snapshots == 4 and r.num_epochs == 0
        assert "train/features/mid_block" not in r.f
        with pytest.raises(Exception, match="montrage encode"):
            r.train_features("mid_block")
    assert os.path.getsize(deferred) < os.path.getsize(runs["inline"])
    assert main(["attribute", "fit", deferred, "--steps", "5"]) == 2  # nothing encoded yet: a clear error
    assert main(["encode", deferred]) == 0
    assert_same_store(runs["inline"], deferred)
    # encode again: every snapshot is already there, nothing is duplicated
    result = encode_store(deferred, progress=False)
    assert result["encoded"] == 0 and result["already_encoded"] == 4
    with StoreReader(deferred) as r:
        assert r.num_epochs == 4
    # attribution on both: identical models and answers
    from montrage.attribution import Attributor, fit_attribution

    answers = []
    for path in (runs["inline"], deferred):
        fit = fit_attribution(path, steps=20)
        att = Attributor.from_store(path)
        query = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        models = {m: {k: v for k, v in r.items() if k != "path"} for m, r in fit["models"].items()}
        answers.append((models, att.query(query, top_k=3), att.query(query, top_k=3, fast=True)))
        att.close()
    assert answers[0] == answers[1]


def test_encode_errors(runs, tmp_path, capsys):
    assert main(["encode", runs["inline"]]) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(NothingToEncode):
        encode_store(runs["inline"])
    copy = str(tmp_path / "d.h5")
    shutil.copy(runs["deferred"], copy)
    assert main(["encode", copy, "--model-path", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["encode", copy, "--devices", str((os.cpu_count() or 1) + 1)]) == 2
    assert "core" in capsys.readouterr().err
    assert not os.path.exists(features_path(copy))  # nothing half-made


def test_deferred_refuses_full_fine_tunes(tiny_model_dir, data_root, tmp_path):
    pipe = loops.lora_pipeline(tiny_model_dir)
    pipe.unet.conv_in.requires_grad_(True)
    from montrage import Monitor

    m = Monitor(
        str(tmp_path / "s.h5"),
        pipe,
        loops.DiskDataset(data_root),
        every_n_steps=1,
        **loops.monitor_args(mode="deferred"),
    )
    with pytest.raises(MontrageConfigError, match="inline"):
        m.start()
    auto = Monitor(
        str(tmp_path / "a.h5"), pipe, loops.DiskDataset(data_root), every_n_steps=1, **loops.monitor_args(mode="auto")
    )
    auto.start()
    auto.close(0)
    assert auto.mode == "inline"


def test_encode_killed_with_sigkill_resumes_every_snapshot_once(runs, tmp_path):
    store = str(tmp_path / "k.h5")
    shutil.copy(runs["deferred"], store)
    proc = subprocess.Popen([sys.executable, WORKER, "encode", store, "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID-WRITE"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with StoreReader(store) as r:
        assert r.num_epochs == 2  # rows 0, 1 committed; row 2 was mid-write
    result = encode_store(store, progress=False)
    assert result["already_encoded"] == 2 and result["encoded"] == 2
    assert_same_store(runs["inline"], store, atol=2e-3)  # rows 0, 1 came from a process with other thread counts


def test_two_process_encode_equals_one_process(runs, tmp_path):
    store = str(tmp_path / "two.h5")
    shutil.copy(runs["deferred"], store)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "montrage.cli", "encode", store, "--devices", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"processes": 2' in proc.stdout
    assert_same_store(runs["inline"], store, atol=2e-3)


def test_follow_encodes_a_live_run_and_logs_curves(tiny_model_dir, data_root, tmp_path):
    store = str(tmp_path / "live.h5")
    proc = subprocess.Popen(
        [sys.executable, WORKER, "train", tiny_model_dir, data_root, store, "1.0"], stdout=subprocess.PIPE, text=True
    )

    class Run:
        logged = []

        def log(self, payload):
            self.logged.append((time.time(), payload))

    run = Run()
    try:
        result = encode_store(
            store, follow=True, interval=0.2, timeout=300, log_to_wandb=True, wandb_runs=lambda: [run], progress=False
        )
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    closed = float(out.split("CLOSED")[1])
    with StoreReader(store) as r:
        assert r.num_epochs == r.adapter_snapshots == 4 == result["snapshots"]  # steps 0, 2, 4, 6
        assert r.global_steps.tolist() == [0, 2, 4, 6]
    similarity = [p for _, p in run.logged if "montrage/similarity/digit1/digit7" in p]
    attribution = [p for _, p in run.logged if "montrage/attribution/digit1/digit7" in p]
    assert [p["montrage/global_step"] for p in similarity] == [0, 2, 4, 6]
    assert [p["montrage/global_step"] for p in attribution] == [2, 4, 6]  # from the second snapshot on
    assert all(0.0 <= p["montrage/attribution/digit7/digit7"] <= 1.0 for p in attribution)
    assert run.logged[0][0] < closed  # the first snapshot was encoded (and logged) while the run still trained
