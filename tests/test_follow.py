"""Following a store that another process is writing (`montrage inspect --follow`)."""

import json
import os
import subprocess
import sys

import helpers
import montrage.store.follow as store_mod
from montrage.cli import main
from montrage.store import follow_epochs

SCRIPT = helpers.CRASH_WRITER


def live_writer(path, epochs, go_dir):
    return subprocess.Popen(
        [sys.executable, SCRIPT, "live", str(path), str(epochs), str(go_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_follow_sees_each_epoch_while_the_writer_runs(tmp_path):
    path, go = tmp_path / "s.h5", tmp_path / "go"
    go.mkdir()
    proc = live_writer(path, 3, go)  # started after the follower: the file does not exist yet
    events = []
    try:
        for ev in follow_epochs(str(path), interval=0.02, timeout=60):
            events.append(ev)
            if ev["event"] == "epoch":
                assert proc.poll() is None  # seen while the writer is still running ...
                (go / str(ev["row"])).touch()  # ... which waits for this before writing the next epoch
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
    assert "CLOSED" in out, err[-3000:]
    assert [ev["epoch"] for ev in events if ev["event"] == "epoch"] == [0, 1, 2]  # each once, in order
    assert [ev["global_step"] for ev in events if ev["event"] == "epoch"] == [0, 10, 20]
    assert events[-1] == {"event": "end", "reason": "closed", "epochs": 3}


def test_inspect_follow_prints_epochs_and_ends_when_the_writer_closes(tmp_path, capsys):
    path, go = tmp_path / "s.h5", tmp_path / "go"
    go.mkdir()
    for e in range(3):  # the writer never waits: all three epochs land while the CLI polls
        (go / str(e)).touch()
    proc = live_writer(path, 3, go)
    try:
        assert main(["inspect", str(path), "--follow", "--json", "--interval", "0.02", "--timeout", "60"]) == 0
    finally:
        proc.communicate(timeout=60)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [ev["epoch"] for ev in lines if ev["event"] == "epoch"] == [0, 1, 2]
    assert lines[-1]["reason"] == "closed"


def test_follow_waits_for_a_missing_store_until_timeout(tmp_path, capsys):
    assert list(follow_epochs(str(tmp_path / "none.h5"), interval=0.01, timeout=0.1)) == [
        {"event": "end", "reason": "timeout", "epochs": 0}
    ]
    assert main(["inspect", str(tmp_path / "none.h5"), "--follow", "--interval", "0.01", "--timeout", "0.1"]) == 0
    assert "timeout; 0 snapshot(s)" in capsys.readouterr().out


def test_follow_ctrl_c_exits_cleanly(tmp_path, capsys, monkeypatch):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.time, "sleep", interrupt)
    assert main(["inspect", str(tmp_path / "none.h5"), "--follow"]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
