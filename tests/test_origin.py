"""Origin attribution: trajectory features against a naive per-image loop, metrics, classifier and features-file
round trips, clear errors, the CLI end to end, and the pixel-DDPM recipe. Untrained tiny models only."""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import origin_helpers as H
from montrage.errors import MontrageError
from montrage.origin import metrics as OM
from montrage.origin.baselines import ThresholdAttack, gsa_features, pixel_features
from montrage.origin.classifier import OriginClassifier, relabel
from montrage.origin.cli import add_origin_parser
from montrage.origin.errors import OriginError
from montrage.origin.feature_set import FeatureSpec, concat_feature_sets, default_timesteps
from montrage.origin.featurefile import read_features, write_features
from montrage.origin.features import trajectory_features
from montrage.origin.images import load_images
from montrage.origin.model import load_diffusion_model
from montrage.origin.model_attribution import ModelAttributor, fit_none_threshold, lowest_loss_attribution

RTOL = 2e-4


def _close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9)


def _state(module):
    return (
        {n: p.requires_grad for n, p in module.named_parameters()},
        [p.grad for p in module.parameters()],
        [m.training for m in module.modules()],
    )


# --- features ----------------------------------------------------------------------------------------------------
def test_pixel_features_match_naive_loop():
    model = H.tiny_pixel_model()
    model.unet.train()  # modes must be restored after extraction
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    timesteps = (0, 37, 99)
    ref = H.naive_features(model, images, timesteps)
    before = _state(model.unet)
    fs = trajectory_features(
        model, images, FeatureSpec(timesteps, params="all", layer_norms=True), batch_size=4, progress=False
    )
    for f in ("loss", "grad_x", "grad_theta"):
        _close(fs.values[f], ref[f])
    _close(fs.layer_norms.sum(-1), fs.values["grad_theta"])
    assert fs.layer_norms.shape == (3, 3, len(list(model.unet.parameters())))
    after = _state(model.unet)
    assert after[0] == before[0] and after[2] == before[2] and all(g is None for g in after[1])

    # θ = the trainable parameters: freeze all but the up blocks
    for name, p in model.unet.named_parameters():
        p.requires_grad_(name.startswith("up_blocks"))
    ref_up = H.naive_features(model, images, timesteps, param_filter=lambda n: n.startswith("up_blocks"))
    fs_up = trajectory_features(model, images, FeatureSpec(timesteps), batch_size=5, progress=False)
    _close(fs_up.values["grad_theta"], ref_up["grad_theta"])
    _close(fs_up.values["grad_x"], ref["grad_x"])

    # the cheaper paths (no ∇θ: batched autograd; loss only: no grad) agree with the vmap path
    fs_x = trajectory_features(
        model, images, FeatureSpec(timesteps, families=("loss", "grad_x")), batch_size=2, progress=False
    )
    _close(fs_x.values["grad_x"], ref["grad_x"])
    fs_l = trajectory_features(model, images, FeatureSpec(timesteps, families=("loss",)), progress=False)
    _close(fs_l.values["loss"], ref["loss"])


def test_latent_features_match_naive_loop(tiny_model_dir):
    from peft import LoraConfig

    model = load_diffusion_model(tiny_model_dir)
    model.unet.requires_grad_(False)
    model.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    captions = ["a photo of two", ""]
    timesteps = (5, 500, 999)
    before = _state(model.unet)
    ref_all = H.naive_features(model, images, timesteps, captions=captions)
    ref_lora = H.naive_features(model, images, timesteps, captions=captions, param_filter=lambda n: "lora_" in n)
    fs = trajectory_features(model, images, FeatureSpec(timesteps), captions=captions, batch_size=4, progress=False)
    for f in ("loss", "grad_x"):
        _close(fs.values[f], ref_all[f])
    _close(fs.values["grad_theta"], ref_lora["grad_theta"])
    fs_all = trajectory_features(
        model, images, FeatureSpec(timesteps, params="all"), captions=captions, batch_size=6, progress=False
    )
    _close(fs_all.values["grad_theta"], ref_all["grad_theta"])
    after = _state(model.unet)
    assert after[0] == before[0] and after[2] == before[2] and all(g is None for g in after[1])
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.grad is None for p in model.vae.parameters())


def test_per_image_captions_equal_per_group_prompts(tiny_model_dir):
    """`captions` (one text condition per image, in any order) gives each image exactly what one run per distinct
    prompt (`spec.prompt`) gives it: every family, the per-tensor norms and PIA's noise."""
    from peft import LoraConfig

    from montrage.origin.baselines import pia_spec

    model = load_diffusion_model(tiny_model_dir)
    model.unet.requires_grad_(False)
    model.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    captions = ["a photo of one", "", "a photo of seven", "a photo of one"]
    timesteps = (5, 500)
    for spec in (FeatureSpec(timesteps, layer_norms=True), pia_spec(timesteps)):
        mixed = trajectory_features(model, images, spec, captions=captions, batch_size=3, progress=False)
        for prompt in sorted(set(captions)):
            rows = [i for i, c in enumerate(captions) if c == prompt]
            group = trajectory_features(
                model, images[rows], dataclasses.replace(spec, prompt=prompt), batch_size=5, progress=False
            )
            for f in spec.families:
                _close(mixed.values[f][rows], group.values[f])
            if spec.layer_norms:
                _close(mixed.layer_norms[rows], group.layer_norms)
        # and the condition matters: the empty prompt for all gives other losses to the captioned images
        empty = trajectory_features(model, images, spec, batch_size=4, progress=False)
        assert not np.allclose(empty.values["loss"][[0, 2]], mixed.values["loss"][[0, 2]], rtol=1e-4)


def test_pia_and_reference_families_equal_their_separate_computations(tiny_model_dir, tmp_path):
    """`loss_pia` is the loss under PIA's noise; `loss_ref`/`grad_x_ref` are loss and ‖∇x L‖² of the UNet with its
    adapter disabled, with the very ε of the main families; the adapter is active again afterwards."""
    from peft import LoraConfig

    from montrage.origin.baselines import pia_spec
    from montrage.origin.feature_set import FAMILIES, REFERENCE_FAMILIES, default_families

    ALL_FAMILIES = FAMILIES + ("loss_pia",) + REFERENCE_FAMILIES  # those that need no captions

    model = load_diffusion_model(tiny_model_dir)
    assert default_families(model) == FAMILIES + ("loss_pia",)
    with pytest.raises(OriginError, match="no PEFT adapter"):
        trajectory_features(model, torch.zeros(1, 3, 16, 16), FeatureSpec((5,), families=("loss_ref",)), progress=False)
    model.unet.requires_grad_(False)
    model.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    assert default_families(model) == ALL_FAMILIES
    with torch.no_grad():  # peft starts B at zero, which would make the adapter a no-op
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    timesteps = (5, 500, 999)
    spec = FeatureSpec(timesteps, families=ALL_FAMILIES, draws=2)
    fs = trajectory_features(model, images, spec, batch_size=5, progress=False)
    paper = trajectory_features(model, images, FeatureSpec(timesteps, draws=2), batch_size=4, progress=False)
    pia = trajectory_features(model, images, pia_spec(timesteps), batch_size=4, progress=False)
    for f in FAMILIES:
        _close(fs.values[f], paper.values[f])
    _close(fs.values["loss_pia"], pia.values["loss"])
    model.unet.disable_adapters()
    base = trajectory_features(
        model, images, FeatureSpec(timesteps, families=("loss", "grad_x"), draws=2), batch_size=4, progress=False
    )
    model.unet.enable_adapters()
    for f in ("loss", "grad_x"):
        _close(fs.values[f + "_ref"], base.values[f])
        assert not np.allclose(fs.values[f + "_ref"], fs.values[f], rtol=1e-3)  # the adapter does change them
    again = trajectory_features(model, images, FeatureSpec(timesteps, families=("loss",), draws=2), progress=False)
    _close(again.values["loss"], fs.values["loss"])  # the adapter is back on
    model.unet.disable_adapters()  # ... and stays off when the caller had switched it off
    trajectory_features(model, images[:1], FeatureSpec((5,), families=("loss_ref",)), progress=False)
    off = trajectory_features(model, images, FeatureSpec(timesteps, families=("loss",), draws=2), progress=False)
    _close(off.values["loss"], base.values["loss"])
    model.unet.enable_adapters()
    # the new families survive the features file
    back = read_features(write_features(str(tmp_path / "all.h5"), fs))
    assert set(back.values) == set(ALL_FAMILIES)
    _close(back.values["loss_ref"], fs.values["loss_ref"])


def test_clid_families_are_caption_minus_null_and_perturbed_losses(tiny_model_dir):
    """`clid_null` / `clid_perturbed` are the loss under each image's caption minus its loss under the empty / the
    perturbed caption, with the same ε; with or without the paper's families in the same call; clear errors when
    captions are missing, empty, or the model is unconditional."""
    from montrage.origin.baselines import clid_losses, clid_spec
    from montrage.origin.feature_set import CLID_FAMILIES
    from montrage.origin.features import perturb_caption
    from montrage.origin.images import image_keys

    model = load_diffusion_model(tiny_model_dir)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    captions = ["a photo of one digit", "a photo of seven", "a photo of one digit"]
    timesteps = (5, 500)
    loss = FeatureSpec(timesteps, families=("loss",))
    own = trajectory_features(model, images, loss, captions=captions, progress=False).values["loss"]
    null = trajectory_features(model, images, loss, progress=False).values["loss"]
    keys = image_keys(images)
    perturbed = [perturb_caption(c, k) for c, k in zip(captions, keys)]
    assert all(p and p != c and set(p.split()) < set(c.split()) for p, c in zip(perturbed, captions))
    assert perturbed == [perturb_caption(c, k) for c, k in zip(captions, keys)]  # seeded by the image
    pert = trajectory_features(model, images, loss, captions=perturbed, progress=False).values["loss"]
    for spec in (clid_spec(timesteps), FeatureSpec(timesteps, families=("loss", "grad_x") + CLID_FAMILIES)):
        fs = trajectory_features(model, images, spec, captions=captions, batch_size=4, progress=False)
        _close(fs.values["clid_null"], own - null)
        _close(fs.values["clid_perturbed"], own - pert)
        assert not np.allclose(fs.values["clid_null"], 0.0)
    _close(clid_losses(fs), (2 * own - null - pert) / 2)
    from montrage.origin.classifier import feature_matrix  # signed: taken as they are, not through the log

    X, names = feature_matrix(fs, ("loss", "clid_null"))
    _close(X[:, 2:], fs.values["clid_null"].astype(np.float64))
    _close(X[:, :2], np.log(fs.values["loss"].astype(np.float64)))
    # captions_for="clid": CLiD's families as before, the other families under the spec's (empty) prompt
    only = FeatureSpec(timesteps, families=("loss", "grad_x") + CLID_FAMILIES, captions_for="clid")
    fo = trajectory_features(model, images, only, captions=captions, batch_size=4, progress=False)
    _close(fo.values["loss"], null)
    _close(fo.values["clid_null"], own - null)
    _close(fo.values["clid_perturbed"], own - pert)
    assert not only.compatible(FeatureSpec(timesteps, families=("loss", "grad_x") + CLID_FAMILIES))
    assert names[2] == "clid_null@t=5"
    with pytest.raises(OriginError, match="own caption"):
        trajectory_features(model, images, clid_spec(timesteps), progress=False)
    with pytest.raises(OriginError, match=r"1 have an empty one: \['b'\]"):
        trajectory_features(
            model, images, clid_spec(timesteps), captions=["x y", "", "x y"], ids=["a", "b", "c"], progress=False
        )
    with pytest.raises(OriginError, match="no CLiD family"):
        clid_losses(trajectory_features(model, images, loss, progress=False))
    with pytest.raises(OriginError, match="unconditional"):
        trajectory_features(
            H.tiny_pixel_model(), torch.zeros(1, 3, 8, 8), clid_spec((5,)), captions=["x y"], progress=False
        )


def test_cross_validated_C(tmp_path):
    """C="auto" (the default) picks C from the grid by cross-validation, keeps it through save/load, and a fixed C
    is kept as given; a bad C is refused."""
    from montrage.origin.classifier import C_GRID, LogisticModel, choose_C

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 40)
    signal = (y == "a")[:, None] * 0.8 + rng.normal(0, 1, (80, 2))
    noisy = np.hstack([signal, rng.normal(0, 1, (80, 60))])  # 2 informative columns among 62
    chosen = choose_C(noisy, y)
    assert chosen in C_GRID and chosen < 1.0  # many noise columns, few rows: stronger regularisation wins
    assert choose_C(noisy[[0, 40]], y[[0, 40]]) == 1.0  # one row per class: nothing to cross-validate
    clf = OriginClassifier().fit(_sets())
    assert clf.logistic.C in C_GRID
    loaded = OriginClassifier.load(clf.save(str(tmp_path / "clf")))
    assert loaded.logistic.C == clf.logistic.C and loaded.logistic.auto
    assert OriginClassifier(C=0.5).fit(_sets()).logistic.C == 0.5
    with pytest.raises(OriginError, match="positive number or 'auto'"):
        LogisticModel(C=-1)


def test_noise_is_per_image_and_timestep_not_per_batch():
    model = H.tiny_pixel_model()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    spec = FeatureSpec((3, 50), families=("loss",))
    a = trajectory_features(model, images, spec, batch_size=3, progress=False).values["loss"]
    b = trajectory_features(model, images.flip(0), spec, batch_size=8, progress=False).values["loss"][::-1]
    _close(a, b, rtol=1e-5)
    c = trajectory_features(model, images, FeatureSpec((3, 50), families=("loss",), noise_seed=1), progress=False)
    assert not np.allclose(a, c.values["loss"])
    pia = [
        trajectory_features(
            model, images, FeatureSpec((3, 50), families=("loss",), noise="pia", noise_seed=s), progress=False
        ).values["loss"]
        for s in (0, 1)
    ]
    _close(pia[0], pia[1], rtol=1e-6)  # PIA's noise is the model's own prediction: no seed involved


def test_default_timesteps():
    assert default_timesteps(1000, 20) == list(range(0, 1000, 50))
    assert default_timesteps(10, 20) == list(range(10))
    with pytest.raises(OriginError):
        default_timesteps(1000, 0)


# --- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_hand_made():
    y = np.array([1, 1, 0, 0], bool)
    assert OM.roc_auc([4, 3, 2, 1], y) == 1.0
    assert OM.roc_auc([1, 2, 3, 4], y) == 0.0
    assert OM.roc_auc([1, 1, 1, 1], y) == 0.5
    assert OM.roc_auc([3, 1, 2, 0], y) == 0.75
    # 100 negatives: one scoring above every positive -> 1 % FPR is reachable only once it is included
    s = np.r_[np.arange(10) + 100.0, 200.0, np.zeros(99)]
    lab = np.r_[np.ones(10, bool), np.zeros(100, bool)]
    assert OM.tpr_at_fpr(s, lab, 0.01) == 1.0
    assert OM.tpr_at_fpr(s, lab, 0.001) == 0.0
    assert OM.balanced_accuracy(["a", "a", "a", "b"], ["a", "a", "b", "b"]) == pytest.approx((2 / 3 + 1) / 2)
    assert OM.best_threshold([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 0.8
    rep = OM.binary_report([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0])
    assert rep == {"auc": 1.0, "tpr@1%fpr": 1.0, "tpr@0.1%fpr": 1.0, "balanced_accuracy": 1.0}
    # the second member looks generated: member AUC 1/2 (its 0.05 is below both negatives), generated AUC 2/3
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.05, 0.9, 0.05]])
    rep = OM.ovr_report(proba, ["member", "generated", "external", "member"], ["member", "generated", "external"])
    assert rep["per_class"]["member"]["auc"] == 0.5
    assert rep["per_class"]["generated"]["auc"] == pytest.approx(2 / 3)
    assert rep["auc"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert rep["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)


# --- classifier, features file, model attribution, baselines --------------------------------------------------------
IDENT = {"model_id": "m", "unet_class": "UNet2DModel", "unet_config_sha": "abc", "weights_sha": "w1", "kind": "pixel"}
OTHER = {**IDENT, "weights_sha": "w2"}


def _sets(identity=IDENT, n=40, seed=0, layers=0):
    return [
        H.synthetic_set(lab, n, shift, identity, seed=seed + k, layers=layers)
        for k, (lab, shift) in enumerate([("member", -0.5), ("generated", -1.0), ("external", 0.3)])
    ]


def test_classifier_round_trip_and_tasks(tmp_path):
    train, test = _sets(seed=0), _sets(seed=10)
    clf = OriginClassifier().fit(train, model_path="/models/m")
    assert clf.classes == ["external", "generated", "member"]
    folder = clf.save(str(tmp_path / "clf"))
    loaded = OriginClassifier.load(folder)
    for fs in test:
        np.testing.assert_allclose(loaded.predict_proba(fs), clf.predict_proba(fs), rtol=1e-12)
    assert loaded.spec == clf.spec and loaded.model_path == "/models/m"
    acc = np.mean(np.concatenate([loaded.predict(fs) == fs.label for fs in test]))
    assert acc > 0.8

    member = OriginClassifier(task="membership").fit(train)
    assert member.classes == ["member", "non-member"]
    loaded = OriginClassifier.load(member.save(str(tmp_path / "member")))
    np.testing.assert_allclose(loaded.predict_proba(test[0]), member.predict_proba(test[0]), rtol=1e-12)
    assert list(relabel(["member", "external", "generated"], "generated")) == [
        "not-generated",
        "not-generated",
        "generated",
    ]
    with pytest.raises(OriginError, match="not origin labels"):
        relabel(["cat"], "membership")
    # a classifier refuses features of another model
    with pytest.raises(OriginError, match="made with model"):
        clf.predict(_sets(OTHER)[0])


def test_classifier_corrupted_files(tmp_path):
    folder = OriginClassifier().fit(_sets()).save(str(tmp_path / "clf"))
    jpath, npath = os.path.join(folder, "classifier.json"), os.path.join(folder, "classifier.npz")
    good_json, good_npz = open(jpath).read(), open(npath, "rb").read()

    with open(npath, "wb") as fh:
        fh.write(good_npz[:100])
    with pytest.raises(OriginError, match="classifier.npz"):
        OriginClassifier.load(folder)
    np.savez(npath, mean=np.zeros(3), scale=np.ones(3), coef=np.zeros((3, 3)), intercept=np.zeros(3))
    with pytest.raises(OriginError, match="corrupted|do not belong"):
        OriginClassifier.load(folder)
    with open(npath, "wb") as fh:
        fh.write(good_npz)
    with open(jpath, "w") as fh:
        fh.write(good_json[:50])
    with pytest.raises(OriginError, match="not valid JSON"):
        OriginClassifier.load(folder)
    meta = json.loads(good_json)
    del meta["spec"]
    with open(jpath, "w") as fh:
        json.dump(meta, fh)
    with pytest.raises(OriginError, match="spec"):
        OriginClassifier.load(folder)
    os.remove(npath)
    with pytest.raises(OriginError, match="missing"):
        OriginClassifier.load(folder)
    with pytest.raises(OriginError, match="does not exist"):
        OriginClassifier.load(str(tmp_path / "nowhere"))


def test_features_file_round_trip_and_identity(tmp_path):
    fs = _sets(layers=4)[0]
    path = write_features(str(tmp_path / "f.h5"), fs)
    back = read_features(path, expect_identity=IDENT)
    assert back.ids == fs.ids and back.label == "member" and back.spec == fs.spec
    for f in fs.values:
        np.testing.assert_array_equal(back.values[f], fs.values[f])
    np.testing.assert_array_equal(back.layer_norms, fs.layer_norms)
    assert back.layer_names == fs.layer_names
    with pytest.raises(OriginError, match=r"f\.h5.*made with model"):
        read_features(path, expect_identity=OTHER)
    both = concat_feature_sets([fs, _sets(layers=4)[1]], label="mixed")
    assert len(both) == 80 and both.layer_norms.shape[0] == 80 and both.label == "mixed"
    with pytest.raises(OriginError, match="made with model"):
        concat_feature_sets([fs, _sets(OTHER)[0]])
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(OriginError, match="junk.h5"):
        read_features(str(tmp_path / "junk.h5"))
    with pytest.raises(OriginError, match="does not exist"):
        read_features(str(tmp_path / "missing.h5"))


def test_model_attribution_and_baselines(tmp_path):
    a = [H.synthetic_set("x", 30, s, {**IDENT, "weights_sha": "a"}, seed=k) for k, s in enumerate([-1.0, 0.0, 0.5])]
    b = [H.synthetic_set("x", 30, s, {**IDENT, "weights_sha": "b"}, seed=9 + k) for k, s in enumerate([0.0, -1.0, 0.5])]
    per_candidate = []
    for sets in (a, b):  # the same 90 images (gen. by A, gen. by B, real) under candidate A, then B
        per_candidate.append(H.synthetic_set("x", 90, 0, sets[0].identity))
        for f in per_candidate[-1].values:
            per_candidate[-1].values[f] = np.concatenate([s.values[f] for s in sets])
    labels = ["A"] * 30 + ["B"] * 30 + ["external"] * 30
    att = ModelAttributor(["A", "B"]).fit(per_candidate, labels)
    assert np.mean(att.predict(per_candidate) == np.asarray(labels)) > 0.8
    loaded = ModelAttributor.load(att.save(str(tmp_path / "att")))
    np.testing.assert_allclose(loaded.predict_proba(per_candidate), att.predict_proba(per_candidate), rtol=1e-12)
    with pytest.raises(OriginError, match="candidate 'A'"):
        loaded.predict(per_candidate[::-1])
    assert np.mean(lowest_loss_attribution(per_candidate)[:60] == np.r_[np.zeros(30), np.ones(30)]) > 0.8
    rel = ModelAttributor(["A", "B"], relative=True).fit(per_candidate, labels)  # [mean | differences]
    assert len(rel.logistic.mean) == 3 * len(att.logistic.mean) // 2 + 2  # + each candidate's relative mean log-loss
    assert np.mean(rel.predict(per_candidate) == np.asarray(labels)) > 0.8
    back = ModelAttributor.load(rel.save(str(tmp_path / "rel")))
    assert back.relative and np.allclose(back.predict_proba(per_candidate), rel.predict_proba(per_candidate))
    # "none of them": real images are no candidate's, so even their lowest loss is high; the threshold fit on
    # labelled images sends them to -1 and keeps the generations with their model
    tau = fit_none_threshold(per_candidate, labels, ["A", "B"])
    pick = np.asarray(["A", "B", "none"])[lowest_loss_attribution(per_candidate, none_above=tau)]
    truth = np.asarray(["A"] * 30 + ["B"] * 30 + ["none"] * 30)
    assert OM.balanced_accuracy(truth, pick) > 0.8 and np.mean(pick[60:] == "none") > 0.8
    assert (lowest_loss_attribution(per_candidate, none_above=-np.inf) == -1).all()

    losses = np.c_[np.r_[np.full(5, 2.0), np.full(5, 1.0)], np.r_[np.full(5, 1.0), np.full(5, 2.0)]]
    member = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    attack = ThresholdAttack().fit(losses, member, [10, 20])
    assert attack.t == 10 and list(attack.predict(losses)) == list(member)
    gsa, names = gsa_features(_sets(layers=3)[0])
    assert gsa.shape == (40, 3) and names == ["w0", "w1", "w2"]
    assert pixel_features(torch.zeros(2, 3, 4, 4)).shape == (2, 48)


# --- errors -------------------------------------------------------------------------------------------------------
def test_files_are_read_as_training_reads_them(tmp_path):
    """Origin features score a file on the pixels training saw: transparency on white, as montrage.data does."""
    from PIL import Image

    from montrage.data import load_image

    path = str(tmp_path / "clear.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    torch.testing.assert_close(load_images([path], 8)[0], load_image(path, 8))
    assert torch.allclose(load_images([path], 8), torch.ones(1, 3, 8, 8))


def test_clear_errors_for_bad_input(tmp_path):
    model = H.tiny_pixel_model()
    spec = FeatureSpec((1, 2), families=("loss",))
    with pytest.raises(OriginError, match="16x16 but the model works on 8x8"):
        trajectory_features(model, torch.zeros(1, 3, 16, 16), spec, progress=False)
    with pytest.raises(OriginError, match="1 channels but the model takes 3-channel"):
        trajectory_features(model, torch.zeros(1, 1, 8, 8), spec, progress=False)
    with pytest.raises(OriginError, match="empty"):
        trajectory_features(model, torch.zeros(0, 3, 8, 8), spec, progress=False)
    with pytest.raises(OriginError, match="outside the model's range"):
        trajectory_features(model, torch.zeros(1, 3, 8, 8), FeatureSpec((100,)), progress=False)
    frozen = H.tiny_pixel_model()
    frozen.unet.requires_grad_(False)
    with pytest.raises(OriginError, match="params='all'"):
        trajectory_features(frozen, torch.zeros(1, 3, 8, 8), FeatureSpec((1,)), progress=False)

    from PIL import Image

    Image.new("RGB", (12, 12)).save(tmp_path / "big.png")
    with pytest.raises(OriginError, match=r"big.png.*12x12.*8x8"):
        load_images([str(tmp_path / "big.png")], 8)
    assert load_images([str(tmp_path / "big.png")], 8, resize=True).shape == (1, 3, 8, 8)
    with pytest.raises(OriginError, match="no images"):
        load_images([], 8)

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "file.txt", tmp_path / "missing"):
        with pytest.raises(OriginError, match="not a diffusers|is a file"):
            load_diffusion_model(str(bad))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "SomePipeline", "transformer": ["x", "y"]}')
    with pytest.raises(OriginError, match="holds a SomePipeline, which no montrage family adapter knows"):
        load_diffusion_model(str(tmp_path / "other"))


# --- CLI end to end ------------------------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="montrage")
    add_origin_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_features_fit_predict(tmp_path, capsys):
    from montrage.recipes.pixel_ddpm import save_pngs

    model_dir = H.save_pixel_model(H.tiny_pixel_model(), str(tmp_path / "model"))
    other_dir = H.save_pixel_model(H.tiny_pixel_model(seed=1), str(tmp_path / "other"))
    g = torch.Generator().manual_seed(0)
    for k, label in enumerate(("member", "generated", "external")):
        imgs = (torch.rand(6, 3, 8, 8, generator=g) * 0.5 + 0.25 * k) * 2 - 1
        save_pngs(imgs, str(tmp_path / label), label)
        args = _parse(
            [
                "origin",
                "features",
                str(tmp_path / label),
                "--model",
                model_dir,
                "--out",
                str(tmp_path / f"{label}.h5"),
                "--label",
                label,
                "--timesteps",
                "3",
                "--quiet",
            ]
        )
        assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 6 and out["timesteps"] == [0, 33, 66]

    args = _parse(
        [
            "origin",
            "fit",
            *[str(tmp_path / f"{k}.h5") for k in ("member", "generated", "external")],
            "--out",
            str(tmp_path / "clf"),
        ]
    )
    assert args.fn(args) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["classes"] == ["external", "generated", "member"] and fit["train_counts"]["member"] == 6

    args = _parse(
        [
            "origin",
            "predict",
            str(tmp_path / "member" / "member_00000.png"),
            str(tmp_path / "external"),
            "--classifier",
            str(tmp_path / "clf"),
            "--json",
        ]
    )
    assert args.fn(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 7 and set(results[0]["probabilities"]) == {"member", "generated", "external"}
    assert abs(sum(results[0]["probabilities"].values()) - 1) < 1e-9

    # the same classifier refuses another model, and a features file of another model is refused by name
    args = _parse(
        ["origin", "predict", str(tmp_path / "external"), "--classifier", str(tmp_path / "clf"), "--model", other_dir]
    )
    with pytest.raises(OriginError, match="the classifier was made with model"):
        args.fn(args)
    other = load_diffusion_model(other_dir)
    with pytest.raises(OriginError, match=r"member\.h5.*made with model"):
        read_features(str(tmp_path / "member.h5"), expect_identity=other.identity())


# --- pixel DDPM recipe -----------------------------------------------------------------------------------------------
def test_pixel_ddpm_recipe_is_deterministic(tmp_path):
    from montrage.recipes.pixel_ddpm import PixelDDPMConfig, sample_images, split_digits, train_pixel_ddpm

    cfg = PixelDDPMConfig(members=8, steps=2, batch_size=4, block_out_channels=(8, 16))
    paths = [train_pixel_ddpm(str(tmp_path / f"m{k}"), cfg, progress=False) for k in range(2)]
    models = [load_diffusion_model(p) for p in paths]
    assert models[0].identity()["weights_sha"] == models[1].identity()["weights_sha"]
    assert models[0].kind == "pixel" and models[0].image_size == 16 and models[0].image_channels == 3
    with open(os.path.join(paths[0], "montrage_pixel_ddpm.json")) as fh:
        assert json.load(fh)["member_indices"] == split_digits(8, 0)[0].tolist()
    a = sample_images(paths[0], 2, seed=3, steps=2, progress=False)
    b = sample_images(paths[1], 2, seed=3, steps=2, sampler="ddpm", progress=False)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)


def test_bench_window_grids_have_the_uniform_budget():
    from montrage.bench.origin_eval import window_grids

    grids = window_grids(1000, 4, 4)
    assert grids[0] == [0, 62, 125, 187] and grids[3] == [750, 812, 875, 937]
    assert [len(g) for g in window_grids(1000, 20, 4)] == [20] * 4


# --- several ε draws ---------------------------------------------------------------------------------------------------
def test_draws_average_the_naive_features_of_each_draw():
    model = H.tiny_pixel_model()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    timesteps = (4, 60)
    refs = [H.naive_features(model, images, timesteps, draw=d) for d in range(3)]
    fs = trajectory_features(
        model, images, FeatureSpec(timesteps, params="all", layer_norms=True, draws=3), batch_size=4, progress=False
    )  # chunks of 4 cut through an (image, t)'s 3 draws
    for f in ("loss", "grad_x", "grad_theta"):
        _close(fs.values[f], np.mean([r[f] for r in refs], axis=0))
    _close(fs.layer_norms.sum(-1), fs.values["grad_theta"])
    one = trajectory_features(model, images, FeatureSpec(timesteps, families=("loss",)), progress=False)
    _close(one.values["loss"], refs[0]["loss"])  # draw 0 is the single-draw ε: old features stay valid
    assert not np.allclose(refs[0]["loss"], refs[1]["loss"])
    spec = FeatureSpec(timesteps, draws=3)
    assert (
        FeatureSpec.from_dict(spec.to_dict()) == spec
        and FeatureSpec.from_dict({k: v for k, v in FeatureSpec(timesteps).to_dict().items() if k != "draws"}).draws
        == 1
    )
    assert not spec.compatible(FeatureSpec(timesteps)) and spec.compatible(
        FeatureSpec(timesteps, draws=3, noise_seed=4)
    )
    with pytest.raises(OriginError, match="draws"):
        FeatureSpec(timesteps, draws=0)
    with pytest.raises(OriginError, match="PIA"):
        FeatureSpec(timesteps, noise="pia", draws=2)


# --- benchmark: seeds, aggregation, splits, GPU-size throughput script -------------------------------------------------
def _seed_result(auc_traj: float, tpr_traj: float, holds_a: bool) -> dict:
    from montrage.bench.origin_eval import BLOCKS, METRIC_KEYS

    def entry(auc, tpr, task):
        return {"auc": auc, "tpr@1%fpr": tpr, "tpr@0.1%fpr": tpr / 2, "balanced_accuracy": 0.6, "task": task}

    blocks = {}
    for block in BLOCKS:
        task = "ternary" if block == "methods" else "member-vs-rest"
        blocks[block] = {
            "trajectory": entry(auc_traj, tpr_traj, task),
            "trajectory_paper": entry(0.65, 0.06, task),
            "trajectory_loss": entry(0.6, 0.05, task),
            "loss_threshold": {**entry(0.7, 0.10, "member-vs-rest"), "t": 100},
            "pia": {**entry(0.8, 0.30, "member-vs-rest"), "t": 200},
        }
    assert set(blocks["methods"]["trajectory"]) >= set(METRIC_KEYS)
    uniform = {"membership_auc": 0.7, "ternary_auc": 0.7, "membership_tpr@1%fpr": 0.1}
    claims = {
        "a_generated_flagged_more_than_members": {
            "holds": holds_a,
            "t": 100,
            "share_of_timesteps_where_it_holds": 0.5,
            "flagged_as_member": {"member": 0.5, "generated": 0.6 if holds_a else 0.3, "external": 0.2},
        },
        "b_whole_trajectory_beats_windows": {
            "holds": True,
            "uniform": uniform,
            "windows": {"t=0..9": {**uniform, "membership_auc": 0.65}},
        },
        "c_gradients_add_over_loss": {"holds": True},
    }
    from montrage.bench.origin_eval import acceptance

    claims["acceptance_trajectory_beats_thresholds"] = acceptance(blocks)
    tp = {
        "images": 6,
        "timesteps": 2,
        "draws": 1,
        "feature_seconds": 1.0,
        "images_per_second": 6.0,
        "features": "x",
        "torch_threads": 1,
    }
    return {**blocks, "claims": claims, "throughput": tp}


def test_bench_aggregates_seeds_and_checks_the_acceptance():
    from montrage.bench.origin_eval import aggregate
    from montrage.bench.seeds import parse_seeds

    assert parse_seeds("0,1,2") == parse_seeds("0-2") == [0, 1, 2] and parse_seeds(5) == [5]
    for bad in ("a", "1,1", ""):
        with pytest.raises(MontrageError, match="seed"):
            parse_seeds(bad)
    runs = [_seed_result(0.9, 0.4, True), _seed_result(0.6, 0.1, False)]
    assert runs[0]["claims"]["acceptance_trajectory_beats_thresholds"]["holds"]
    assert not runs[1]["claims"]["acceptance_trajectory_beats_thresholds"]["holds"]
    agg = aggregate(runs)
    t = agg["methods"]["trajectory"]
    assert t["auc"] == pytest.approx(0.75) and t["std"]["auc"] == pytest.approx(0.15)
    assert t["seeds"]["tpr@1%fpr"] == [0.4, 0.1] and t["task"] == "ternary"
    assert agg["member_vs_rest"]["pia"]["t"] == [200, 200]
    acc = agg["claims"]["acceptance_trajectory_beats_thresholds"]
    # on average (AUC 0.75, TPR 0.25) trajectory beats the loss threshold (0.7, 0.1) but not pia (0.8, 0.3)
    assert acc["holds_in_seeds"] == "1/2" and not acc["holds"]
    assert acc["as_stated"]["wins"] == {
        "loss_threshold/auc": True,
        "loss_threshold/tpr@1%fpr": True,
        "pia/auc": False,
        "pia/tpr@1%fpr": False,
    }
    a = agg["claims"]["a_generated_flagged_more_than_members"]
    assert a["holds_in_seeds"] == "1/2" and a["flagged_as_member"]["generated"]["mean"] == pytest.approx(0.45)
    assert not a["holds"]  # 0.45 generated < 0.5 members on average
    b = agg["claims"]["b_whole_trajectory_beats_windows"]
    assert b["holds"] and b["best_window"] == "t=0..9"
    assert agg["throughput"]["images_per_second"] == 6.0


def test_bench_splits_are_disjoint_and_shifted_set_is_rotated():
    from montrage.bench.origin_eval import class_split, shifted_digits
    from montrage.bench.origin_lora import LoraBenchConfig, lora_split
    from montrage.recipes.pixel_ddpm import digits_images
    from montrage.recipes.tiny_base import TinyBaseConfig, held_out_digits, pretrain_digits

    labels = np.array(["member"] * 10 + ["generated"] * 10 + ["external"] * 11)
    tr, te = class_split(labels, 3)
    assert not set(tr) & set(te) and len(tr) + len(te) == 31
    assert [int(np.sum(labels[tr] == o)) for o in ("member", "generated", "external")] == [5, 5, 5]
    member, held, shifted = lora_split(LoraBenchConfig(concepts=(1, 7), per_concept=6, seed=2))
    assert len(member) == 12 and len(held) == 6 and len(shifted) == 6
    assert len(set(member) | set(held) | set(shifted)) == 24
    assert member != lora_split(LoraBenchConfig(concepts=(1, 7), per_concept=6, seed=3))[0]
    with pytest.raises(MontrageError, match="per-concept"):
        lora_split(LoraBenchConfig(concepts=(1,), per_concept=150))
    # the LoRA half's base holds half of every digit out of pre-training; its members and held-out come from those
    base = TinyBaseConfig(holdout=0.5)
    pool, seen = held_out_digits(base), pretrain_digits(base)
    assert not set(pool) & set(seen) and len(pool) + len(seen) == len(pretrain_digits(TinyBaseConfig()))
    assert TinyBaseConfig().digest() == "cee13fe007f8"  # bases built before the option keep their cache key
    split = lora_split(LoraBenchConfig(concepts=(1, 7), per_concept=6, seed=2), pool)
    assert set(sum(split, [])) <= set(pool) and split[0] != member
    with pytest.raises(MontrageError, match="did not pre-train on"):
        lora_split(LoraBenchConfig(concepts=(1,), per_concept=60), pool)
    x = shifted_digits([5, 9])
    assert torch.equal(x, torch.rot90(digits_images([5, 9]), 1, dims=(2, 3)))
    assert not torch.equal(x, digits_images([5, 9]))


def test_gpu_throughput_script_runs_tiny_on_cpu(tmp_path, capsys):
    from montrage.bench.origin_gpu import build_model, main, run_throughput

    cifar = build_model("cifar")
    assert sum(p.numel() for p in cifar.unet.parameters()) == 35_746_307  # google/ddpm-cifar10-32's size
    assert cifar.image_size == 32 and cifar.image_channels == 3
    r = run_throughput("tiny", "cpu", images=2, timesteps=6, batch_size=5, progress=False)
    assert r["images"] == 2 and r["timesteps"] == 6 and r["features_finite"] and r["images_per_second"] > 0
    assert r["pairs_per_second"] == pytest.approx(12 / r["seconds"], rel=0.01)
    assert r["paper_budget_hours"] == pytest.approx(3000 * 1000 / (12 / r["seconds"]) / 3600, rel=0.01)
    main(["--size", "tiny", "--images", "1", "--timesteps", "3", "--quiet", "--out", str(tmp_path / "t.json")])
    with open(tmp_path / "t.json") as fh:
        assert json.load(fh)["timesteps"] == 3
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            run_throughput("tiny", "cuda", images=1, timesteps=2, progress=False)
    with pytest.raises(MontrageError, match="--size"):
        build_model("huge")


def test_cli_features_read_captions_for_clid(tiny_model_dir, tmp_path):
    """`--captions sidecar|metadata.jsonl` gives each image its caption; CLiD names the images that have none."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(folder / f"im{k}.png")
    (folder / "im0.txt").write_text("a photo of one digit\n")
    base = [
        "origin",
        "features",
        str(folder),
        "--model",
        tiny_model_dir,
        "--out",
        str(tmp_path / "f.h5"),
        "--t-grid",
        "5,500",
        "--families",
        "loss,clid_null,clid_perturbed",
        "--quiet",
    ]
    args = _parse(base + ["--captions", "sidecar"])
    with pytest.raises(OriginError, match=r"1 have an empty one: \[.*im1.png'\]"):
        args.fn(args)
    with open(tmp_path / "metadata.jsonl", "w") as fh:
        for k in range(2):
            fh.write(json.dumps({"file_name": f"im{k}.png", "text": f"a photo of digit {k}"}) + "\n")
    args = _parse(base + ["--captions", str(tmp_path / "metadata.jsonl")])
    assert args.fn(args) == 0
    fs = read_features(str(tmp_path / "f.h5"))
    assert set(fs.values) == {"loss", "clid_null", "clid_perturbed"} and np.isfinite(fs.values["clid_null"]).all()
    (tmp_path / "bad.jsonl").write_text('{"file": "im0.png"}\n')
    args = _parse(base + ["--captions", str(tmp_path / "bad.jsonl")])
    with pytest.raises(OriginError, match=r"bad.jsonl', line 1: expected a JSON object with 'file_name'"):
        args.fn(args)


def test_bench_lora_half_reports_clid_and_member_vs_held_out(tmp_path):
    """A tiny LoRA half: CLiD runs on every image's natural caption as a threshold attack and as a family of
    montrage's classifier, the run's store adds the training trajectory, and every method is also scored on
    members vs same-distribution held-out images."""
    from montrage.bench.origin_eval import BLOCKS
    from montrage.bench.origin_lora import lora_seed
    from montrage.recipes.tiny_base import TinyBaseConfig

    r = lora_seed(
        0,
        str(tmp_path),
        per_concept=4,
        epochs=1,
        repeats=2,
        timesteps=3,
        gen_steps=3,
        windows=1,
        progress=False,
        base_config=TinyBaseConfig(vae_steps=1, unet_steps=1),
    )
    assert "member_vs_external" in BLOCKS and r["seconds"]["features_clid"] > 0
    assert r["seconds"]["features_snapshots"] > 0  # the store of the run gives the training trajectory
    for block in BLOCKS:
        assert {
            "clid",
            "trajectory_clid",
            "trajectory",
            "pixels",
            "loss_threshold",
            "snapshot_loss",
            "trajectory_snapshots",
            "trajectory_gsa",
        } <= set(r[block])
    held = r["member_vs_external"]
    assert all(v["task"] == "member-vs-held-out" for v in held.values())
    assert held["clid"]["t"] in r["config"]["timesteps"]
    # members vs held-out leaves the rotated images out: a different task from members vs all external
    assert any(held[m]["auc"] != r["membership"][m]["auc"] for m in held)


def test_bench_adapters_scores_every_method_on_k_adapters_and_none(tmp_path):
    """A tiny which-adapter benchmark: 3 adapters, each trained with a store, and "none" (real digits and base
    generations); every method is scored on the same K + 1 classes and the JSON aggregates over seeds."""
    from montrage.bench.adapters import METHODS, run_adapters_bench
    from montrage.recipes.tiny_base import TinyBaseConfig

    out = tmp_path / "adapters.json"
    r = run_adapters_bench(
        str(out),
        seeds=[0],
        adapters=3,
        per_concept=2,
        epochs=1,
        repeats=1,
        per_class=4,
        timesteps=2,
        gen_steps=2,
        base_config=TinyBaseConfig(vae_steps=1, unet_steps=1),
        progress=False,
    )
    assert json.loads(out.read_text())["methods"] == r["methods"] and set(r["methods"]) == set(METHODS)
    seed = r["per_seed"]["0"]
    assert seed["test_per_class"] == 2 and seed["config"]["snapshots"] == [0, 1]
    for m in METHODS:
        assert set(seed["methods"][m]["accuracy_per_class"]) == {"adapter0", "adapter1", "adapter2", "none"}
        per_class = list(seed["methods"][m]["accuracy_per_class"].values())
        assert seed["methods"][m]["balanced_accuracy"] == pytest.approx(np.mean(per_class), abs=1e-3)


# --- origin from a store -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_stores(tiny_model_dir, tmp_path_factory):
    """LoRA runs of one base with adapter snapshots (the default; "snapshots" and "other") and without."""
    import helpers

    root = tmp_path_factory.mktemp("origin_store")
    out = {}
    for k, (name, keep) in enumerate((("snapshots", True), ("no_snapshots", False), ("other", True))):
        path = root / f"{name}.h5"
        torch.manual_seed(k)
        helpers.trainer(2, [helpers.callback(path, save_lora_snapshots=keep)]).fit(
            helpers.module(tiny_model_dir, learning_rate=1e-2), helpers.data()
        )
        out[name] = str(path)
    return out


def test_loss_snapshots_are_the_loss_under_each_stored_adapter(lora_stores):
    from montrage.origin.from_store import store_diffusion_model, store_feature_spec

    model = store_diffusion_model(lora_stores["snapshots"])
    spec = store_feature_spec(model, ["loss", "loss_snapshots"], timesteps=3)
    assert spec.snapshots == (0, 1, 2)  # before training, after epoch 1, after epoch 2
    before = model.identity()["weights_sha"]
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    fs = trajectory_features(model, images, spec, progress=False)
    assert model.identity()["weights_sha"] == before  # the final adapter is back in place
    blocks = fs.values["loss_snapshots"].reshape(3, 3, 3)  # (image, snapshot, t)
    _close(blocks[:, -1], fs.values["loss"])  # the last snapshot is the model itself, same ε
    assert not np.allclose(blocks[:, 0], blocks[:, -1], rtol=1e-3)  # training moved the loss
    model.snapshots.set_epoch(0)  # the first block is the loss under the untrained adapter, computed directly
    row0 = trajectory_features(model, images, FeatureSpec(spec.timesteps, families=("loss",)), progress=False)
    _close(blocks[:, 0], row0.values["loss"])
    model.snapshots.set_epoch(2)
    # a features file keeps the (N, S x T) family, and a classifier on it round-trips
    clf = OriginClassifier(task="membership").fit([fs], ["member", "member", "external"])
    assert len(clf.feature_names) == 3 + 9 and clf.feature_names[3] == "loss_snapshots@row=0,t=0"


def test_store_origin_errors_name_the_fix(lora_stores, tiny_model_dir, tmp_path):
    from montrage.origin.from_store import load_external, store_diffusion_model

    with pytest.raises(OriginError, match="save_lora_snapshots=True"):
        store_diffusion_model(lora_stores["no_snapshots"])
    plain = load_diffusion_model(tiny_model_dir)
    spec = FeatureSpec((0, 500), families=("loss", "loss_snapshots"), snapshots=(0, 1))
    with pytest.raises(OriginError, match="not built from a montrage store"):
        trajectory_features(plain, torch.zeros(1, 3, 16, 16), spec, progress=False)
    with pytest.raises(OriginError, match="needs the store rows"):
        FeatureSpec((0,), families=("loss_snapshots",))
    bad = tmp_path / "ext"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OriginError, match="no readable external image.*broken.png"):
        load_external([str(bad / "broken.png")], 16, 3)


def test_which_fine_tune_from_stores_cli(lora_stores, tmp_path, capsys):
    """`origin which-fit STORE... --none DIR` then `origin which ATTRIBUTOR IMAGE...`: candidates rebuilt from their
    stores, one class per store plus none."""
    from PIL import Image

    from montrage.cli import main

    none = tmp_path / "none"
    none.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(none / f"n{i}.png")
    att = str(tmp_path / "att")
    assert (
        main(
            [
                "origin",
                "which-fit",
                lora_stores["snapshots"],
                lora_stores["other"],
                "--none",
                str(none),
                "--out",
                att,
                "--generate",
                "6",
                "--timesteps",
                "2",
                "--names",
                "a,b",
                "--relative",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"a": 6, "b": 6, "none": 6} and report["relative"] is True
    assert set(report["held_out"]["accuracy_per_class"]) == {"a", "b", "none"}
    images = [str(none / "n0.png"), str(none / "n1.png")]
    assert main(["origin", "which", att, *images, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == images
    assert all(set(r["probabilities"]) == {"a", "b", "none"} for r in out)
    # a candidate without adapter snapshots cannot be rebuilt: the error says what to set
    assert (
        main(
            [
                "origin",
                "which-fit",
                lora_stores["snapshots"],
                lora_stores["no_snapshots"],
                "--none",
                str(none),
                "--out",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "save_lora_snapshots=True" in capsys.readouterr().err
