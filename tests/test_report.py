"""`montrage report`: curves, attribution, top images and memorization alerts in one self-contained file."""

import re

import pytest
import pytorch_lightning as pl
from PIL import Image

import helpers
from helpers import copy_data_dir
from montrage.callbacks import AttributionCurves, MemorizationGuard
from montrage.cli import main
from montrage.report import build_report


@pytest.fixture(scope="module")
def monitored_store(tiny_model_dir, tmp_path_factory):
    """A 2-epoch run with live attribution and the guard, on data where probes copy a training image."""
    root = tmp_path_factory.mktemp("report")
    data_dir = copy_data_dir(tiny_model_dir, root / "data")
    store = root / "store.h5"
    pl.seed_everything(0)
    helpers.trainer(2, [helpers.callback(store, thumbnail_size=16), AttributionCurves(), MemorizationGuard()]).fit(
        helpers.module(tiny_model_dir), helpers.data(data_dir=data_dir)
    )
    return str(store)


def test_html_report_is_self_contained(monitored_store, tmp_path):
    out = tmp_path / "report.html"
    result = build_report(monitored_store, str(out))
    assert result["sections"] == [
        "Concept similarity over epochs",
        "Attribution curves",
        "Top training images per probe",
        "Memorization alerts",
    ]
    assert result["epochs"] == [0, 1, 2] and result["memorization alerts"] > 0
    assert result["attribution model"].endswith("store_attribution_live")
    text = out.read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "seven/0.png" in text  # the alert table names the copied training image


def test_png_report_and_cli(monitored_store, tmp_path, capsys):
    out = tmp_path / "report.png"
    assert main(["report", monitored_store, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.height > 1000 and im.width > 300


def test_report_without_model_or_record_and_errors(monitored_store, tmp_path, capsys):
    # a store with neither an attribution model nor a memorization record still gives curves and top images
    store = tmp_path / "plain.h5"
    import shutil

    shutil.copy(monitored_store, store)
    result = build_report(str(store), str(tmp_path / "r.html"))
    assert result["sections"] == ["Concept similarity over epochs", "Top training images per probe"]
    assert "representation similarity" in (tmp_path / "r.html").read_text()
    assert main(["report", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00garbage" * 100)
    assert main(["report", str(junk), "--out", str(tmp_path / "x.html")]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    assert main(["report", str(store), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "must end in .html or .png" in capsys.readouterr().err
    assert main(["report", str(store), "--out", str(tmp_path / "x.html"), "--model-dir", str(tmp_path)]) == 2
    assert "holds no final.json" in capsys.readouterr().err
    (tmp_path / "plain_memorization.json").write_text("{not json")
    assert main(["report", str(store), "--out", str(tmp_path / "x.html")]) == 2
    assert "plain_memorization.json" in capsys.readouterr().err


def test_cli_says_bad_input_in_one_line_and_lets_bugs_raise(tmp_path, monkeypatch, capsys):
    from montrage.errors import MontrageError

    def bad_input(*a, **k):
        raise MontrageError("store 'x.h5': no epoch yet; train first.")

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr("montrage.report.build_report", bad_input)
    assert main(["report", "x.h5", "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.strip() == "montrage report: error: store 'x.h5': no epoch yet; train first."
    monkeypatch.setattr("montrage.report.build_report", bug)
    with pytest.raises(KeyError, match="a bug"):  # not swallowed into a one-line "error"
        main(["report", "x.h5", "--out", str(tmp_path / "r.html")])
