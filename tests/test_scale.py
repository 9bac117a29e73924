"""Large stores: the fit builds a training-side index and streams mini-batches; queries score a shortlist and a
reference sample, and equal exact scoring when those cover every image."""

import os

import numpy as np
import pytest
import torch

from montrage.attribution import index as ix
from montrage.attribution.fit import fit_attribution
from montrage.attribution.model import AttributionModelError
from montrage.attribution.query import Attributor, score_pairs
from montrage.recipes.bench_scale import synthetic_store


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("scale") / "store.h5")
    facts = synthetic_store(path, 1200, snapshots=4)
    return path, facts


def test_synthetic_store_is_compact(big_store):
    _, facts = big_store
    assert facts["bytes_per_image_snapshot_layer"] <= 1024  # 3 timesteps x 128 features, fp16, compressed


def test_indexed_fit_and_queries_match_exact_scoring(big_store, monkeypatch, tmp_path):
    path, _ = big_store
    monkeypatch.setattr(ix, "LARGE", 1000)
    monkeypatch.setattr(ix, "REFERENCE", 10 ** 9)  # the reference sample is every image: exact standardization
    report = fit_attribution(path, out_dir=str(tmp_path / "m"), steps=15, probes="stored", progress=False)
    for mode in ("trajectory", "final"):
        assert report["models"][mode]["final_loss"] < report["models"][mode]["initial_loss"]
    assert os.path.isfile(tmp_path / "m" / "index" / "index.json")
    att = Attributor(path, model_dir=str(tmp_path / "m"), shortlist=1200)
    assert att.index is not None
    E, n = att.store.num_epochs, att.store.num_train
    q = {"mid_block": np.random.default_rng(3).normal(size=(E, 2, 3, 128)).astype(np.float32)}
    for fast in (True, False):
        mode = "final" if fast else "trajectory"
        scores, scored = att.score_trajectories(q, fast=fast)
        assert scored.all()
        exact = score_pairs(att.models[mode], att.store, q, att.centre, mode)
        np.testing.assert_allclose(scores, exact, atol=2e-3)
    # a real shortlist: exact scores on its rows, concept means estimated from the reference sample
    monkeypatch.setattr(ix, "REFERENCE", 200)
    small = Attributor(path, model_dir=str(tmp_path / "m"), shortlist=100)
    small.index.reference = ix.reference_rows([e.concept for e in small.train], 200)
    scores, scored = small.score_trajectories(q, fast=False)
    assert 100 <= scored[0].sum() <= 300
    result = small.query(torch.rand(1, 3, 16, 16) * 2 - 1, top_k=5)[0]
    assert len(result["top_images"]) == 5 and abs(sum(c["share"] for c in result["concepts"].values()) - 1) < 1e-3
    att.close()
    small.close()


def test_index_of_another_store_is_refused(big_store, monkeypatch, tmp_path):
    path, _ = big_store
    monkeypatch.setattr(ix, "LARGE", 1000)
    fit_attribution(path, out_dir=str(tmp_path / "m"), steps=2, probes="stored", progress=False)
    other = str(tmp_path / "other.h5")
    synthetic_store(other, 1200, snapshots=3)
    with pytest.raises(AttributionModelError):
        Attributor(other, model_dir=str(tmp_path / "m"))
