"""The counterfactual benchmark's pieces: query choice, fixed (t, epsilon) points, the lean retraining loop."""

import numpy as np
import pytest
import torch

from montrage.bench.attribution_setup import ICON_PROMPTS, TEMPLATES, build_probes, split_images
from montrage.bench.counterfactual import pick_queries
from montrage.bench.retraining import Retrainer, fixed_points
from montrage.data import digit_token, digits_examples
from montrage.errors import MontrageError


def test_queries_are_single_concept_and_spread_over_concepts():
    ex = digits_examples([1, 4, 7], 4, TEMPLATES["tokens"])
    tokens = {f"digit{d}": digit_token(d) for d in (1, 4, 7)}
    _, held = split_images(ex)
    q, kinds = build_probes(ex, tokens, held, seeds=[100, 101])
    rows = pick_queries(kinds, q, 6, seed=0)
    kind = np.array([k for k in kinds for _ in q.seeds])
    w = np.array(q.weight_matrix())
    assert len(rows) == 6 and set(kind[rows]) <= {"concept", "image"}
    assert np.bincount(np.argmax(w[rows], axis=1), minlength=3).tolist() == [2, 2, 2]
    assert pick_queries(kinds, q, 6, seed=0).tolist() == rows.tolist()
    assert pick_queries(kinds, q, 6, seed=1).tolist() != rows.tolist()
    style = pick_queries(kinds, q, 6, seed=0, wanted=("concept",))  # a concept's own prompt only
    assert set(kind[style]) == {"concept"} and len(style) == 6
    assert set(kind[pick_queries(kinds, q, 6, seed=0, wanted=("image",))]) == {"image"}
    with pytest.raises(MontrageError, match="choose one or both of concept, image"):
        pick_queries(kinds, q, 6, seed=0, wanted=("mixture",))


def test_icon_prompts_name_style_and_content():
    ex = digits_examples([1, 7], 2)
    q, kinds = build_probes(
        ex, {"digit1": "tango", "digit7": "oxygen"}, [(ex[0], "printer")], seeds=[0], prompts=ICON_PROMPTS
    )
    assert q.prompts == (
        "an icon in the style of tango",
        "an icon in the style of oxygen",
        "an icon in the style of tango and oxygen",
        "an icon of a printer in the style of tango",
    )
    assert kinds[-1] == "image" and q.exemplars[-1] == {ex[0].id: 1.0}


def test_fixed_points_are_shared_and_spread():
    a, b = fixed_points((4, 8, 8), seed=3), fixed_points((4, 8, 8), seed=3)
    assert [t for t, _ in a] == [t for t, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    ts = [t for t, _ in a]
    assert ts == sorted(ts) and ts[0] < 100 and ts[-1] > 900


def test_retraining_is_reproducible_and_removal_changes_the_model(tiny_model_dir):
    ex = digits_examples([1, 7], 4, "a photo of {token}")
    re = Retrainer(tiny_model_dir, ex, [1] * len(ex), resolution=16, steps=3, seed=0)
    pix = torch.rand(2, 3, 16, 16) * 2 - 1
    points = fixed_points(tuple(re.mean.shape[1:]), n=3)
    re.train()
    full = re.query_loss(pix, ["a photo of one", "a photo of seven"], points)
    re.train()
    assert np.allclose(re.query_loss(pix, ["a photo of one", "a photo of seven"], points), full)  # adapter reset
    re.train({e.id for e in ex if e.concept == "digit7"})
    without = re.query_loss(pix, ["a photo of one", "a photo of seven"], points)
    assert full.shape == (2,) and np.all(np.isfinite(full)) and not np.allclose(without, full)
    unet = re.parts["unet"]
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) > 0
    assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)  # only the adapter trains


def test_retraining_without_images_is_coupled_with_the_full_run(tiny_model_dir):
    """Common random numbers: a run without some images sees, step by step, exactly the full run's samples of the
    images it keeps (same latents, noise and timesteps), so a loss rise is the removed images' doing."""
    ex = digits_examples([1, 7], 4, "a photo of {token}")
    re = Retrainer(tiny_model_dir, ex, [2, 1, 1, 1, 1, 1, 1, 1], resolution=16, steps=4, seed=0)
    calls, denoise = [], re.family.denoise

    def spy(x, t, cond):
        calls.append((x.detach().clone(), t.clone(), cond.detach().clone()))
        return denoise(x, t, cond)

    re.family.denoise = spy
    re.train()
    full, calls[:] = list(calls), []
    re.train({e.id for e in ex if e.concept == "digit7"})
    one = re.cond[[e.concept for e in ex].index("digit1")]
    assert len(calls) == len(full) == 4
    for (xf, tf, cf), (xp, tp, cp) in zip(full, calls):
        keep = torch.tensor([torch.equal(c, one) for c in cf])
        assert 0 < int(keep.sum()) < len(cf)  # each batch held both concepts; the removed run kept digit1's
        assert torch.equal(xp, xf[keep]) and torch.equal(tp, tf[keep]) and torch.equal(cp, cf[keep])


def test_unknown_method_is_refused_before_any_training(tmp_path):
    import pytest

    from montrage.bench.counterfactual import run_counterfactual

    with pytest.raises(MontrageError, match=r"unknown methods \['tark'\].*montrage, montrage-gated"):
        run_counterfactual(str(tmp_path / "cf.json"), methods=["montrage", "tark"])
    assert not (tmp_path / "cf.json").exists()


def test_partial_results_keep_every_method_on_the_same_queries(tmp_path):
    import json

    from montrage.bench.counterfactual import summarize, write_result

    deltas = {(0.05, 2, "montrage"): [0.3, 0.1], (0.05, 2, "random"): [0.0, 0.2], (0.1, 3, "montrage"): [0.5]}
    out = str(tmp_path / "cf.json")
    write_result(out, summarize(deltas), {"complete": False})
    got = json.load(open(out))
    assert got["methods"]["montrage"]["k"] == 2  # the smallest K at the top level
    assert got["by_k"]["2"]["montrage"]["delta_loss"] == pytest.approx(0.2)
    assert got["by_k"]["2"]["random"]["delta_loss_se"] == pytest.approx(0.1)
    assert got["by_k"]["3"]["montrage"]["queries_done"] == 1 and got["config"]["complete"] is False
    lead = got["by_k"]["2"]["random"]  # paired on the same queries: (0.0 - 0.3, 0.2 - 0.1)
    assert lead["lead_over_montrage"] == pytest.approx(-0.1) and lead["lead_over_montrage_se"] == pytest.approx(0.2)
    assert "lead_over_montrage" not in got["by_k"]["2"]["montrage"]
    assert not (tmp_path / "cf.json.tmp").exists()


def test_a_resumed_run_retrains_only_what_is_missing_and_gets_the_same_result(tiny_model_dir, tmp_path):
    from montrage.bench.counterfactual import resumed_deltas, retrain_without_top_k, summarize, write_result

    ex = digits_examples([1, 7], 4, "a photo of {token}")
    re = Retrainer(tiny_model_dir, ex, [1] * len(ex), resolution=16, steps=2, seed=0)
    ids, prompts = [e.id for e in ex], ["a photo of one", "a photo of seven"]
    pix, points = torch.rand(2, 3, 16, 16) * 2 - 1, fixed_points(tuple(re.mean.shape[1:]), n=2)
    re.train()
    base = re.query_loss(pix, prompts, points)
    scores = {"pixel-cosine": np.random.default_rng(0).random((2, len(ex)))}
    names, rows, query = ["pixel-cosine", "random"], np.array([0, 1]), (pix, prompts, points, base)
    full: dict = {}
    assert retrain_without_top_k(re, ids, scores, names, rows, query, (0.25,), 0, full) == 4
    config = {
        "command": "montrage bench counterfactual --seed 0",
        "query_prompts": prompts,
        "retraining": "coupled",
        "methods": names,
        "train_images": len(ex),
        "retrain_steps": 2,
        "points": 2,
        "k_fractions": [0.25],
        "base_query_loss": base.tolist(),
    }
    out = str(tmp_path / "cf.json")
    cut_config = dict(config, seconds=5.0, retrainings=2, complete=False)
    write_result(out, summarize({key: d[:1] for key, d in full.items()}), cut_config)
    cut, earlier = resumed_deltas(out, config)  # a run cut after its first query
    assert earlier == {"seconds": 5.0, "retrainings": 2}
    assert all(len(d) == 1 for d in cut.values()) and set(cut) == set(full)
    assert retrain_without_top_k(re, ids, scores, names, rows, query, (0.25,), 0, cut) == 2  # the second query only
    assert all(cut[key] == pytest.approx(full[key]) for key in full)  # random draws the same images as before
    for field, value in [("query_prompts", ["a photo of four"]), ("retraining", None), ("methods", ["trak"])]:
        with pytest.raises(MontrageError, match=rf"cf\.json' was made by another benchmark \(config\.{field}"):
            resumed_deltas(out, dict(config, **{field: value}))
    with pytest.raises(MontrageError, match="full retraining's query losses differ"):
        resumed_deltas(out, dict(config, base_query_loss=(base + 1).tolist()))


def test_leave_one_out_judges_top_k_by_the_sum_of_single_removals():
    from montrage.bench.leave_one_out import CEILING, additive_deltas

    loo = np.array([[1.0, 0.0], [2.0, -1.0], [0.0, 3.0]])  # (images, queries)
    scores = {"m": np.array([[9.0, 1.0, 8.0], [0.0, 5.0, 7.0], [1.0, 2.0, 3.0]])}  # (all queries, images)
    d = additive_deltas(loo, scores, np.array([0, 1]), [(0.5, 2)])
    assert d[(0.5, 2, "m")] == [1.0 + 0.0, 3.0 - 1.0]  # query 0: images 0 and 2; query 1: images 2 and 1
    assert d[(0.5, 2, "random")] == pytest.approx([2.0, 4.0 / 3.0])  # K x the mean rise
    assert d[(0.5, 2, CEILING)] == [3.0, 3.0]


def test_leave_one_out_matches_top_1_retraining_and_resumes(tiny_model_dir):
    """With K = 1 the estimate is no estimate: a method's top-1 removal is one leave-one-out retraining."""
    from montrage.bench.counterfactual import retrain_without_top_k
    from montrage.bench.leave_one_out import additive_deltas, leave_one_out

    ex = digits_examples([1, 7], 2, "a photo of {token}")
    re = Retrainer(tiny_model_dir, ex, [1] * len(ex), resolution=16, steps=2, seed=0)
    ids, prompts = [e.id for e in ex], ["a photo of one", "a photo of seven"]
    pix, points = torch.rand(2, 3, 16, 16) * 2 - 1, fixed_points(tuple(re.mean.shape[1:]), n=2)
    re.train()
    query = (pix, prompts, points, re.query_loss(pix, prompts, points))
    seen = []
    loo = leave_one_out(re, ids, query, after_each=lambda r: seen.append(len(r)))
    assert loo.shape == (4, 2) and seen == [1, 2, 3, 4] and np.abs(loo).sum() > 0
    scores = {"pixel-cosine": np.random.default_rng(0).random((2, len(ex)))}
    exact: dict = {}
    retrain_without_top_k(re, ids, scores, ["pixel-cosine"], np.array([0, 1]), query, (1,), 0, exact)
    assert additive_deltas(loo, scores, np.array([0, 1]), [(1, 1)])[(1, 1, "pixel-cosine")] == pytest.approx(
        exact[(1, 1, "pixel-cosine")]
    )
    calls = []
    train = re.train
    re.train = lambda removed=frozenset(): calls.append(removed) or train(removed)
    resumed = leave_one_out(re, ids, query, done=loo[:3].tolist())
    assert calls == [frozenset([ids[3]])] and np.allclose(resumed, loo)
