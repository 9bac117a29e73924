"""AttributionCurves: live attribution curves and top-image tables in W&B, fitted on the fly or from a model folder."""

import os

import numpy as np
import pytest
import pytorch_lightning as pl

import helpers
from helpers import fake_wandb_logger
from montrage.callbacks import AttributionCurves, MontrageConfigError
from montrage.callbacks.attribution_curves import live_model_dir
from montrage.store import StoreReader


def run(tiny_model_dir, store, curves, epochs=2, logger=None, **cb):
    pl.seed_everything(0)
    trainer = helpers.trainer(epochs, [helpers.callback(store, **cb), curves], logger=logger or False)
    trainer.fit(helpers.module(tiny_model_dir), helpers.data())
    return trainer


def test_live_curves_are_fitted_on_the_fly_and_logged(tiny_model_dir, tmp_path):
    store = tmp_path / "s.h5"
    curves, logger = AttributionCurves(top_k=2), fake_wandb_logger()
    run(tiny_model_dir, store, curves, epochs=3, logger=logger)
    last = curves.last
    assert last["epochs"] == [0, 1, 2, 3] and last["concepts"] == ["digit1", "digit7"]
    assert last["scores"].shape == (4, 3, 2)
    assert not np.allclose(last["scores"][0], last["scores"][-1], atol=1e-3)  # the curves move over the epochs
    # the model was fitted on the last epoch's probes: there each single-concept probe scores its own concept highest
    with StoreReader(str(store)) as r:
        primary = r.probes.primary_concepts()
        weights = r.f["probes/weights"][...]
    for p in np.flatnonzero(weights.max(axis=1) == 1.0):
        assert last["concepts"][int(np.argmax(last["scores"][-1, p]))] == primary[p]
    assert last["top"].shape == (3, 2) and np.all(np.diff(last["top_scores"], axis=1) <= 0)
    assert os.path.isfile(os.path.join(live_model_dir(str(store)), "final.json"))
    logged = [p for p in logger.experiment.logged if "montrage/attribution/top_images" in p]
    assert len(logged) == 3  # snapshots 1, 2, 3 (epoch 0 alone cannot be fitted)
    table = logged[-1]["montrage/attribution/top_images"]
    assert len(table.data) == 3 * 2 and table.data[0][0] == 3
    assert all(row[-1] is not None for row in table.data)  # training thumbnails present
    series = [k for k in logged[-1] if k != "montrage/attribution/top_images"]
    assert sorted(series) == sorted(f"montrage/attribution/{lab}" for lab in last["labels"])


def test_curves_from_an_earlier_runs_model_and_refusals(tiny_model_dir, tmp_path, caplog):
    first = tmp_path / "a.h5"
    run(tiny_model_dir, first, AttributionCurves())
    model_dir = live_model_dir(str(first))
    curves = AttributionCurves(model_dir=model_dir)
    run(tiny_model_dir, tmp_path / "b.h5", curves)
    assert curves.last["scores"].shape == (3, 3, 2)  # scored from epoch 0 on: no fit needed
    assert not os.path.exists(live_model_dir(str(tmp_path / "b.h5")))
    # another layout (timesteps) is refused with a warning; training goes on
    other = AttributionCurves(model_dir=model_dir)
    trainer = run(tiny_model_dir, tmp_path / "c.h5", other, timesteps=[500])
    assert trainer.current_epoch == 2 and other.last is None
    assert "AttributionCurves: skipped" in caplog.text and "timesteps [500]" in caplog.text
    # a corrupted model file: a warning, not a crash
    with open(os.path.join(model_dir, "final.safetensors"), "wb") as fh:
        fh.write(b"garbage")
    broken = AttributionCurves(model_dir=model_dir)
    assert run(tiny_model_dir, tmp_path / "d.h5", broken).current_epoch == 2 and broken.last is None
    assert "corrupted" in caplog.text


def test_curves_configuration_errors(tiny_model_dir, tmp_path):
    with pytest.raises(MontrageConfigError, match="fit_every_n_snapshots"):
        AttributionCurves(fit_every_n_snapshots=0)
    with pytest.raises(MontrageConfigError, match="holds no final.json"):
        run(tiny_model_dir, tmp_path / "s.h5", AttributionCurves(model_dir=str(tmp_path)))
    with pytest.raises(MontrageConfigError, match="put AttributionCurves after MontrageCallback"):
        helpers.trainer(1, [AttributionCurves(), helpers.callback(tmp_path / "t.h5")]).fit(
            helpers.module(tiny_model_dir), helpers.data()
        )
