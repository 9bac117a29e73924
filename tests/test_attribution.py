import json

import numpy as np
import pytest
import torch

import helpers
from montrage.attribution import AttributionModel, AttributionModelError, Attributor, fit_attribution
from montrage.attribution.fit import probe_trajectories
from montrage.attribution.model import attribution_loss
from montrage.attribution.pairs import feature_names, pair_features
from montrage.data import DataError
from montrage.store import StoreError, StoreMismatchError, StoreReader
from montrage.store_model import StoreModel


@pytest.fixture(scope="module")
def run_store(tiny_model_dir, tmp_path_factory):
    """A monitored 3-epoch run with concept, mixture and exemplar probes."""
    import pytorch_lightning as pl

    tmp = tmp_path_factory.mktemp("attr")
    probes = {
        "probes": [
            {"prompt": "a photo of one", "concepts": {"digit1": 1.0}},
            {"prompt": "a photo of seven", "concepts": {"digit7": 1.0}},
            {"prompt": "a photo of one and seven", "concepts": {"digit1": 0.5, "digit7": 0.5}},
            {"prompt": "a photo of seven kb", "concepts": {"digit7": 1.0}, "exemplars": {"digits/17": 1.0}},
        ],
        "seeds": [0, 1],
    }
    (tmp / "probes.json").write_text(json.dumps(probes))
    store = tmp / "store.h5"
    pl.seed_everything(0)
    cb = helpers.callback(store, probe_file=str(tmp / "probes.json"), probe_seeds=[0, 1], encode_prompt="{caption}")
    helpers.trainer(3, [cb]).fit(helpers.module(tiny_model_dir, learning_rate=2e-2), helpers.data())
    return str(store)


def test_pair_features_on_hand_made_trajectories():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)  # E=3, N=4, T=2, F=5
    q = t[:, :1]
    centre = {"l": np.zeros((3, 2, 5), np.float32)}
    x = pair_features({"l": q}, {"l": t}, centre, "trajectory")
    names = feature_names(["l"], [10, 20], 3, "trajectory")
    assert x.shape == (1, 4, len(names)) == (1, 4, 3 * (3 + 2 + 1))
    own = dict(zip(names, x[0, 0]))
    assert own["l/t10/level_e2"] == pytest.approx(1.0) and own["l/tall/change_e1"] == pytest.approx(1.0)
    assert own["l/t20/spearman"] == pytest.approx(1.0, abs=1e-5)
    assert x[0, 0].sum() > x[0, 1:].sum(axis=1).max()  # the image's own trajectory matches best
    xf = pair_features({"l": q}, {"l": t}, centre, "final")
    assert xf.shape == (1, 4, 3) and np.allclose(xf[..., 0], x[..., names.index("l/t10/level_e2")])


def test_losses():
    y = torch.tensor([[1.0, 0.0, 0.5]])
    assert float(attribution_loss(y * 0.4, y, "scos")) == pytest.approx(0.0, abs=1e-6)
    assert float(attribution_loss(1 - y, y, "scos")) > 0.2
    assert float(attribution_loss(y, y, "mse")) == 0.0
    with pytest.raises(ValueError, match="unknown loss"):
        attribution_loss(y, y, "hinge")


def test_within_rank_loss_rewards_the_exemplar_first_within_its_concept():
    from montrage.attribution.model import within_rank_loss

    # probe 0: exemplar (image 0) above the rest of its concept (images 1, 2); image 3 is another concept
    y = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 0.0]])
    good = torch.tensor([[0.9, 0.6, 0.6, 0.99], [0.5, 0.5, 0.5, 0.5]])
    bad = torch.tensor([[0.6, 0.9, 0.9, 0.01], [0.5, 0.5, 0.5, 0.5]])
    assert float(within_rank_loss(good, y)) < float(within_rank_loss(bad, y))
    other = good.clone()
    other[0, 3] = 0.01  # images outside the concept do not enter the ranking
    assert float(within_rank_loss(other, y)) == pytest.approx(float(within_rank_loss(good, y)))
    assert float(within_rank_loss(good, y[1:].expand(2, -1))) == 0.0  # no exemplars: no term
    assert float(attribution_loss(good, y, "scos+rank")) > float(attribution_loss(good, y, "scos"))


def test_ensemble_scores_are_the_members_mean_and_one_member_files_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AttributionModel(6, hidden=8, members=3)
    x = torch.randn(2, 5, 6)
    members = model.member_scores(x)
    assert members.shape == (3, 2, 5) and not torch.allclose(members[0], members[1])  # own initializations
    assert torch.allclose(model(x), members.mean(0))
    for k, net in enumerate(model.nets):  # the batched product is each member's own MLP
        assert torch.allclose(members[k], torch.sigmoid(net((x - model.mu) / model.sigma)).squeeze(-1), atol=1e-6)
    one = AttributionModel(6, hidden=8)
    legacy = {("net." + k[len("nets.0.") :] if k.startswith("nets.0.") else k): v for k, v in one.state_dict().items()}
    save_file(legacy, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps({"model": {"in_dim": 6, "hidden": 8, "depth": 2}}))
    loaded, _ = AttributionModel.load(str(tmp_path / "m"))
    assert torch.allclose(loaded(x), one(x))


def test_regenerated_probes_match_the_stored_final_epoch(run_store):
    with StoreReader(run_store) as store:
        traj = probe_trajectories(StoreModel(store))
        stored = store.probe_features("mid_block")
        # the final probe generation, re-encoded with the last snapshot == what the callback stored that epoch
        np.testing.assert_allclose(traj["mid_block"][-1], stored[-1], rtol=2e-2, atol=2e-3)
        assert traj["mid_block"].shape == stored.shape
        # and with earlier snapshots the same images encode differently (the adapter really is swapped)
        assert not np.allclose(traj["mid_block"][0], traj["mid_block"][-1], atol=1e-4)
        gt = np.array(store.probes.ground_truth([e.concept for e in store.train], [e.id for e in store.train]))
        ids = [e.id for e in store.train]
        assert gt.shape == (8, 6) and gt[6, ids.index("digits/17")] == 1.0 and gt[6, ids.index("digits/1")] == 0.0
        assert gt[6].tolist().count(0.5) == 2  # the exemplar's concept-mates


def test_fit_save_load_query(run_store, tmp_path):
    report = fit_attribution(run_store, out_dir=str(tmp_path / "m"), steps=60, seed=3)
    assert set(report["models"]) == {"trajectory", "final"}
    assert report["models"]["trajectory"]["final_loss"] < report["models"]["trajectory"]["initial_loss"]
    again = fit_attribution(run_store, out_dir=str(tmp_path / "m2"), steps=60, seed=3)
    a, _ = AttributionModel.load(str(tmp_path / "m" / "trajectory"))
    b, _ = AttributionModel.load(str(tmp_path / "m2" / "trajectory"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])  # deterministic under a seed
    assert again["models"]["final"]["features"] == 3
    att = Attributor.from_store(run_store, model_dir=str(tmp_path / "m"))
    px = torch.rand(2, 3, 16, 16) * 2 - 1
    for fast in (False, True):
        res = att.query(px, top_k=3, fast=fast, prompt="a photo of digit7")
        assert len(res) == 2 and len(res[0]["top_images"]) == 3 and res[0]["mode"] == ("fast" if fast else "full")
        assert set(res[0]["concepts"]) == {"digit1", "digit7"} and res[0]["prompt_concepts"] == ["digit7"]
        assert all(0.0 <= item["score"] <= 1.0 for item in res[0]["top_images"])
        assert sum(v["share"] for v in res[0]["concepts"].values()) == pytest.approx(1.0, abs=1e-3)
    with pytest.warns(UserWarning, match="no prompt was given"):
        scores = att.image_scores(px)
    assert scores.shape == (2, 6) and np.array_equal(scores, att.image_scores(px))
    # the store is captioned: queries are encoded under their prompt, which changes what they look like to the model
    assert not np.allclose(scores, att.image_scores(px, prompts=["a photo of seven", "a photo of one"]), atol=1e-6)
    png = att.plot(px, res, str(tmp_path / "panel.png"))
    assert (tmp_path / "panel.png").stat().st_size > 1000 and png.endswith(".png")
    att.close()


def test_cli_fit_and_query(run_store, tmp_path, capsys):
    from PIL import Image

    from montrage.cli import main

    assert main(["attribute", "fit", run_store, "--model-dir", str(tmp_path / "m"), "--steps", "20"]) == 0
    capsys.readouterr()
    img = tmp_path / "q.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(img)
    assert (
        main(
            [
                "attribute",
                "query",
                run_store,
                str(img),
                "--model-dir",
                str(tmp_path / "m"),
                "--json",
                "--top-k",
                "2",
                "--fast",
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(img) and len(out[0]["top_images"]) == 2 and (tmp_path / "p.png").is_file()


def test_store_with_fewer_than_two_epochs(tiny_model_dir, tmp_path):
    import h5py

    store = tmp_path / "s.h5"
    helpers.trainer(1, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    with h5py.File(store, "a") as f:  # as if the run had stopped right after epoch 0
        f["committed"][0] = 1
    with pytest.raises(StoreError, match="at least 2"):
        fit_attribution(str(store), out_dir=str(tmp_path / "m"))


def test_query_image_that_cannot_be_read(run_store, tmp_path):
    fit_attribution(run_store, out_dir=str(tmp_path / "m"), steps=5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    att = Attributor.from_store(run_store, model_dir=str(tmp_path / "m"))
    with pytest.raises(DataError, match="bad.png"):
        att.query([str(bad)])
    with pytest.raises(ValueError, match="no query images"):
        att.query([])
    att.close()


def test_store_from_another_model(run_store, tmp_path):
    from montrage.recipes.tiny_base import TinyBaseConfig, build_components, save_pipeline

    other = tmp_path / "other"
    parts = build_components(TinyBaseConfig())
    from diffusers import UNet2DConditionModel

    parts["unet"] = UNet2DConditionModel(**{**dict(parts["unet"].config), "layers_per_block": 2})
    save_pipeline(parts, str(other))
    with StoreReader(run_store) as store:
        with pytest.raises(StoreMismatchError, match="not the model"):
            StoreModel(store, model_path=str(other))


def test_corrupted_attribution_model_file(run_store, tmp_path):
    fit_attribution(run_store, out_dir=str(tmp_path / "m"), steps=5)
    (tmp_path / "m" / "trajectory.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AttributionModelError, match="corrupted"):
        Attributor.from_store(run_store, model_dir=str(tmp_path / "m"))
    with pytest.raises(AttributionModelError, match="missing"):
        Attributor.from_store(run_store, model_dir=str(tmp_path / "nothing"))


def test_store_model_prompts_follow_the_store_space():
    import types
    import warnings

    image_only = types.SimpleNamespace(encode_prompt="", store=types.SimpleNamespace(path="s.h5"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an image-only store needs no prompt and ignores one
        assert StoreModel.prompts(image_only, 2, None) == ["", ""]
        assert StoreModel.prompts(image_only, 2, ["a photo of one", "x"]) == ["", ""]
    captioned = types.SimpleNamespace(encode_prompt="{caption}", store=types.SimpleNamespace(path="s.h5"))
    assert StoreModel.prompts(captioned, 2, ["a photo of one", "x"]) == ["a photo of one", "x"]
    with pytest.warns(UserWarning, match="no prompt was given"):
        assert StoreModel.prompts(captioned, 1, None) == [""]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        StoreModel.prompts(captioned, 2, ["a"])


def test_rescore_refits_montrage_beside_a_kept_runs_saved_scores(run_store, tmp_path):
    import dataclasses
    import os
    import shutil

    from montrage.bench.attribution_scores import rescore_seed
    from montrage.bench.attribution_setup import RUN, SCORES, evaluate
    from montrage.probes import ProbeSet

    kept = tmp_path / "seed0"
    shutil.copytree(os.path.dirname(run_store), kept)
    with StoreReader(str(kept / "store.h5")) as store:
        train = store.train
    queries = ProbeSet(
        ("a photo of one", "a photo of seven"),
        ({"digit1": 1.0}, {"digit7": 1.0}),
        (100, 101),
        ("digit1", "digit7"),
        ({}, {train[-1].id: 1.0}),
    )
    kinds, concepts = ["concept", "concept"], ["digit1", "digit7"]
    pixel = np.random.default_rng(0).random((4, len(train)))
    saved = {
        "seed": 0,
        "steps": 20,
        "queries": dataclasses.asdict(queries),
        "kinds": kinds,
        "concepts": concepts,
        "image_metric": "within_token",
        "seconds": {"pixel-cosine": 0.5},
        "timings": {"fine_tune": 1.0},
        "num_probes": 8,
        "repeats": 1,
        "exemplars": {},
        "diagnostics": {},
    }
    np.savez(kept / SCORES, **{"pixel-cosine": pixel})
    (kept / RUN).write_text(json.dumps(saved))
    out = rescore_seed(str(kept), fit_seeds=[1])
    # montrage-gated: montrage's concept order, montrage's order within (no final-epoch-similarity saved: no -similarity)
    assert list(out["methods"]) == ["pixel-cosine", "montrage", "montrage-final-epoch", "montrage-gated"]
    assert out["methods"]["montrage-gated"]["top1"] == out["methods"]["montrage"]["top1"]
    expected = {**evaluate(pixel, queries, kinds, train, concepts), "seconds": 0.5}
    assert out["methods"]["pixel-cosine"] == pytest.approx(expected, nan_ok=True)
    att = Attributor.from_store(str(kept / "store.h5"))  # the refitted model is the one kept beside the store
    qpix = att.model.generate(queries, att.store.num_epochs - 1)
    again = evaluate(att.image_scores(qpix, prompts=[p for p, _ in queries.items()]), queries, kinds, train, concepts)
    att.close()
    assert {k: out["methods"]["montrage"][k] for k in again} == pytest.approx(again, nan_ok=True)
    assert out["timings"]["fit"] > 0 and out["timings"]["fine_tune"] == 1.0  # refitted; the run's own timings kept
    assert out["fit_seeds"]["seeds"] == [1] and len(out["fit_seeds"]["montrage"]["top1"]) == 1
    os.remove(kept / RUN)
    with pytest.raises(DataError, match="run.json.*--keep"):
        rescore_seed(str(kept))
