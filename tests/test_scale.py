"""The training-side index: built at fit time, it gives queries exact scores up to `EXACT` images and a shortlist
plus a reference sample beyond; the fit streams mini-batches when the table would not fit in memory."""

import os

import numpy as np
import pytest
import torch

from montrage.attribution import index as ix
from montrage.attribution.fit import fit_attribution
from montrage.attribution.model import AttributionModelError
from montrage.attribution.query import Attributor, score_pairs
from montrage.bench.scale import synthetic_store


@pytest.fixture(scope="module")
def big_store(tmp_path_factory, tiny_model_dir):
    path = str(tmp_path_factory.mktemp("scale") / "store.h5")
    facts = synthetic_store(path, 1200, snapshots=4, base=tiny_model_dir)
    return path, facts


def test_synthetic_store_is_compact(big_store):
    _, facts = big_store
    assert facts["bytes_per_image_snapshot_layer"] <= 1024  # 3 timesteps x 128 features, fp16, compressed


def test_streaming_fit_and_indexed_queries_match_exact_scoring(big_store, tmp_path):
    path, _ = big_store
    report = fit_attribution(
        path, out_dir=str(tmp_path / "m"), steps=15, probes="stored", progress=False, memory_bytes=1
    )  # force the streaming fit
    for mode in ("trajectory", "final"):
        assert report["models"][mode]["streaming"]
        assert report["models"][mode]["final_loss"] < report["models"][mode]["initial_loss"]
    assert os.path.isfile(tmp_path / "m" / "index" / "index.json")
    att = Attributor(path, model_dir=str(tmp_path / "m"))
    assert att.index is not None and len(att.index.reference) == att.store.num_train  # <= EXACT: every image
    E = att.store.num_epochs
    q = {"mid_block": np.random.default_rng(3).normal(size=(E, 2, 3, 128)).astype(np.float32)}
    for fast in (True, False):
        mode = "final" if fast else "trajectory"
        scores, scored = att.score_trajectories(q, fast=fast)
        assert scored.all()
        exact = score_pairs(att.models[mode], att.store, q, att.centre, mode)  # straight from the store
        np.testing.assert_allclose(scores, exact, atol=2e-3)
    att.close()


def test_shortlist_queries_beyond_exact(big_store, monkeypatch, tmp_path):
    path, _ = big_store
    monkeypatch.setattr(ix, "EXACT", 500)
    monkeypatch.setattr(ix, "REFERENCE", 200)
    fit_attribution(path, out_dir=str(tmp_path / "m"), steps=10, probes="stored", progress=False)
    att = Attributor(path, model_dir=str(tmp_path / "m"), shortlist=100)
    assert 190 <= len(att.index.reference) <= 210
    E = att.store.num_epochs
    q = {"mid_block": np.random.default_rng(4).normal(size=(E, 3, 3, 128)).astype(np.float32)}
    scores, scored = att.score_trajectories(q, fast=False)
    assert all(100 <= k <= 300 for k in scored.sum(axis=1))
    final = {"mid_block": q["mid_block"][-1]}
    short = att.index.shortlist(final, att.centre, 100)
    assert scored[np.arange(3)[:, None], short].all()  # every shortlisted image is scored exactly
    # the shortlist is the exact nearest set in the final snapshot
    from montrage.attribution.index import nn_vectors

    sims = nn_vectors(final, att.centre) @ np.asarray(att.index.nn, np.float32).T
    assert set(short[0].tolist()) == set(np.argsort(-sims[0])[:100].tolist())
    result = att.query(torch.rand(1, 3, 16, 16) * 2 - 1, top_k=5)[0]
    assert len(result["top_images"]) == 5 and abs(sum(c["share"] for c in result["concepts"].values()) - 1) < 1e-3
    att.close()


def test_index_of_another_store_is_refused(big_store, tiny_model_dir, tmp_path):
    path, _ = big_store
    fit_attribution(path, out_dir=str(tmp_path / "m"), steps=2, probes="stored", progress=False)
    other = str(tmp_path / "other.h5")
    synthetic_store(other, 1200, snapshots=3, base=tiny_model_dir)
    with pytest.raises(AttributionModelError):
        Attributor(other, model_dir=str(tmp_path / "m"))
