import numpy as np
import pytest

from montrage.bench.attribution_setup import TEMPLATES, build_probes, evaluate, split_images
from montrage.data import digit_token, digits_examples


@pytest.fixture()
def setup():
    examples = digits_examples([1, 7], 4, TEMPLATES["tokens"])
    tokens = {"digit1": digit_token(1), "digit7": digit_token(7)}
    probe, held = split_images(examples)
    return examples, tokens, probe, held


def test_probe_and_query_construction(setup):
    examples, tokens, probe, held = setup
    assert [tok for _, tok in probe] == ["ka", "kb", "ka", "kb"] and [tok for _, tok in held] == [
        "kc",
        "kd",
        "kc",
        "kd",
    ]
    assert examples[2].caption == "a photo of one kc"
    q, kinds = build_probes(examples, tokens, held, seeds=[100, 101], exemplars={"digit7": examples[4].id})
    assert kinds == ["concept", "concept", "mixture"] + ["image"] * 4
    assert q.exemplars[:3] == ({}, {examples[4].id: 1.0}, {})
    assert q.prompts[:3] == ("a photo of one", "a photo of seven", "a photo of one and seven")
    assert q.prompts[3] == "a photo of one kc" and q.exemplars[3] == {examples[2].id: 1.0}
    assert len(q) == 2 * (2 + 1 + 4)


def test_evaluate_perfect_and_reversed_scores(setup):
    examples, tokens, probe, held = setup
    q, kinds = build_probes(
        examples, tokens, held, seeds=[100], exemplars={"digit1": examples[0].id, "digit7": examples[4].id}
    )
    gt = np.array(q.ground_truth([e.concept for e in examples], [e.id for e in examples], within=0.5))
    perfect = evaluate(gt, q, kinds, examples, ["digit1", "digit7"])
    assert perfect["top1"] == 1.0 and perfect["auc"] == 1.0 and perfect["within_map"] == 1.0
    assert perfect["within_token_map"] == 1.0 and perfect["within_token_recall@1"] == 1.0
    assert (
        perfect["within_recall@1"] == 1.0 and perfect["mixture_spearman"] != perfect["mixture_spearman"]
    )  # constant → NaN
    reversed_ = evaluate(-gt, q, kinds, examples, ["digit1", "digit7"])
    assert reversed_["top1"] == 0.0 and reversed_["auc"] == 0.0 and reversed_["within_recall@1"] == 0.0
    assert reversed_["within_token_recall@1"] == 0.0


def test_gated_scores_rank_concepts_by_one_method_and_images_by_another():
    from montrage.bench.attribution_scores import gated_scores

    labels = ["a", "a", "a", "b", "b"]
    concept = np.array([[0.1, 0.2, 0.0, 0.9, 0.8], [0.9, 0.8, 0.7, 0.1, 0.0]])  # query 0 -> b, query 1 -> a
    within = np.array([[5.0, 1.0, 3.0, 0.0, 2.0], [0.0, 2.0, 1.0, 9.0, 8.0]])
    g = gated_scores(concept, within, labels, ["a", "b"])
    assert list(np.argsort(-g[0])) == [4, 3, 0, 2, 1]  # b's images first, each concept ordered by `within`
    assert list(np.argsort(-g[1])) == [1, 2, 0, 3, 4]
    assert (g[0, 3:] > g[0, :3].max()).all() and (g[1, :3] > g[1, 3:].max()).all()
