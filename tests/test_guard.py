"""MemorizationGuard: fires when a probe generation is a near-copy of a training image, stays silent otherwise.

Unit tests never wait for learning (the tiny model is untrained), so the over-trained case is made by
construction: the training image of concept "seven" is the model's own generation for the probe "a photo of
seven", seed 0, and training repeats it many times. Real over-training on the pre-trained tiny base is measured
by `python -m montrage.bench.memorization` (figures in docs/results.md).
"""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import helpers
from helpers import copy_data_dir, fake_wandb_logger
from montrage.callbacks import MemorizationGuard, MontrageConfigError
from montrage.data import to_thumbnails
from montrage.memorization import near_copies, pixel_similarity, read_alerts, representation_similarity


def test_similarity_measures_on_hand_made_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    b = np.stack([a[0] // 2 + 10, rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)])  # a[0] darker; unrelated
    pix = pixel_similarity(a, b)
    assert pix[0, 0] > 0.99 and abs(pix[0, 1]) < 0.3 and pix.shape == (2, 2)
    feats = rng.normal(size=(3, 2, 4))
    rep = representation_similarity(feats[:1], feats)
    assert np.argmax(rep[0]) == 0 and rep[0, 0] == pytest.approx(1.0)
    # "all" needs both measures over their threshold for the same image; "any" one of them
    pix_m, rep_m = np.array([[0.99, 0.1], [0.5, 0.2]]), np.array([[0.2, 0.95], [0.1, 0.1]])
    assert near_copies(pix_m, rep_m, 0.97, 0.9, "all") == []
    assert near_copies(pix_m, rep_m, 0.97, 0.9, "any") == [(0, 0)]
    assert near_copies(pix_m, None, 0.97, None) == [(0, 0)]
    with pytest.raises(ValueError, match="thumbnail shapes differ"):
        pixel_similarity(a, b[:, :4])


def test_guard_fires_on_a_copy_and_stops_training(tiny_model_dir, tmp_path):
    data_dir = copy_data_dir(tiny_model_dir, tmp_path / "data")
    store = tmp_path / "over.h5"
    guard = MemorizationGuard(stop_training=True)
    logger = fake_wandb_logger()
    pl.seed_everything(0)
    trainer = helpers.trainer(4, [helpers.callback(store, thumbnail_size=16), guard], logger=logger)
    trainer.fit(
        helpers.module(tiny_model_dir, learning_rate=1e-4), helpers.data(data_dir=data_dir, repeats=8, batch_size=8)
    )
    assert trainer.current_epoch == 1  # the epoch-0 alert stops the run after its first training epoch
    # the untrained model ignores its prompt, so every probe reproduces the same image: all are copies of seven/0.png
    assert "a photo of seven" in {a["prompt"] for a in guard.alerts}
    assert all(a["train_id"] == "seven/0.png" and a["pixel"] >= 0.97 for a in guard.alerts)
    assert sorted({a["epoch"] for a in guard.alerts}) == [0, 1]
    record = read_alerts(str(tmp_path / "over_memorization.json"))
    assert record["alerts"] == guard.alerts and [h["epoch"] for h in record["history"]] == [0, 1]
    images = [
        p["montrage/memorization/alerts_images"]
        for p in logger.experiment.logged
        if "montrage/memorization/alerts_images" in p
    ]
    assert len(images) == 2 and "seven/0.png" in images[0][0]._caption  # one log call per snapshot with alerts
    # the resumable state round-trips
    again = MemorizationGuard()
    again.load_state_dict(guard.state_dict())
    assert again.alerts == guard.alerts and again.rows_checked == 2


def test_guard_stays_silent_on_a_normal_run(tiny_model_dir, tmp_path):
    store = tmp_path / "normal.h5"
    guard = MemorizationGuard(stop_training=True)
    pl.seed_everything(0)
    trainer = helpers.trainer(2, [helpers.callback(store, thumbnail_size=16), guard])
    trainer.fit(helpers.module(tiny_model_dir), helpers.data())
    assert trainer.current_epoch == 2 and guard.alerts == []
    record = json.loads((tmp_path / "normal_memorization.json").read_text())
    assert record["alerts"] == [] and len(record["history"]) == 3
    assert all(h["max_pixel"] < 0.97 for h in record["history"])


def test_guard_failure_is_a_warning_not_a_crash(tiny_model_dir, tmp_path, caplog):
    guard = MemorizationGuard(layer="no_such_layer", representation_threshold=0.9)
    trainer = helpers.trainer(1, [helpers.callback(tmp_path / "s.h5"), guard])
    trainer.fit(helpers.module(tiny_model_dir), helpers.data())
    assert trainer.current_epoch == 1
    assert "check skipped" in caplog.text and "no_such_layer" in caplog.text


def test_guard_configuration_errors(tiny_model_dir, tmp_path):
    with pytest.raises(MontrageConfigError, match="set at least one"):
        MemorizationGuard(pixel_threshold=None)
    with pytest.raises(MontrageConfigError, match="in \\[-1, 1\\]"):
        MemorizationGuard(pixel_threshold=1.5)
    guard = MemorizationGuard()
    with pytest.raises(MontrageConfigError, match="put MemorizationGuard after MontrageCallback"):
        helpers.trainer(1, [guard, helpers.callback(tmp_path / "s.h5")]).fit(
            helpers.module(tiny_model_dir), helpers.data()
        )
    with pytest.raises(MontrageConfigError, match="no MontrageCallback"):
        helpers.trainer(1, [MemorizationGuard()]).fit(helpers.module(tiny_model_dir), helpers.data())


def test_thumbnails_are_the_stores_uint8_layout():
    # one function makes the store's probe thumbnails and the guard's training thumbnails, so they compare alike
    x = torch.stack([torch.full((3, 16, 16), -1.0), torch.full((3, 16, 16), 1.0)])
    t = to_thumbnails(x, 8)
    assert t.shape == (2, 8, 8, 3) and t.dtype == np.uint8 and t[0].max() == 0 and t[1].min() == 255


def test_alerts_carry_origin_probabilities_in_the_guard_and_the_report(tiny_model_dir, tmp_path, caplog):
    """The report classifies each alerted probe generation with the store's origin classifier; the guard does so
    live with a classifier of an earlier run; a classifier that cannot be used only drops the origins."""
    from PIL import Image

    from montrage.memorization import describe_alert
    from montrage.origin.from_store import fit_from_store
    from montrage.report import build_report

    data_dir = copy_data_dir(tiny_model_dir, tmp_path / "data")
    external = tmp_path / "external"
    external.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(external / f"e{i}.png")

    def run(name, **guard_kw):
        guard = MemorizationGuard(**guard_kw)
        pl.seed_everything(0)
        helpers.trainer(1, [helpers.callback(tmp_path / f"{name}.h5", thumbnail_size=16), guard]).fit(
            helpers.module(tiny_model_dir, learning_rate=1e-4), helpers.data(data_dir=data_dir, repeats=8, batch_size=8)
        )
        assert guard.alerts, "the constructed copy must alert"
        return str(tmp_path / f"{name}.h5"), guard

    first, guard = run("first")
    assert all(a["origin"] is None for a in guard.alerts)
    fit = fit_from_store(first, [str(external)], members=4, generate=1, timesteps=2, progress=False)
    build_report(first, str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert "look like a training member" in html and "<th>origin</th>" in html
    assert any(f"<td>{c} 0." in html or f"<td>{c} 1.00" in html for c in fit["classes"])

    _, live = run("second", origin_classifier=fit["classifier"])
    for alert in live.alerts:
        assert set(alert["origin"]) == set(fit["classes"]) and abs(sum(alert["origin"].values()) - 1) < 1e-3
        assert "; origin " in describe_alert(alert)
    assert read_alerts(str(tmp_path / "second_memorization.json"))["alerts"] == live.alerts

    _, broken = run("third", origin_classifier=str(tmp_path / "no_such_classifier"))
    assert all(a["origin"] is None for a in broken.alerts)
    assert "origin of the alerted probes skipped" in caplog.text
