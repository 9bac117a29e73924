import json

import numpy as np
import pytest
import torch

from montrage.capture import FeatureHooks, UnknownModuleError, pool
from montrage.encode import encode_images, stable_seed
from montrage.probes import ProbeError, ProbeSet, default_probes, load_probe_file
from montrage.similarity import concept_similarity, shifted_cosine


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        return self.b(h), h


class Wrap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Net()

    def forward(self, x):
        return self.inner(x)


def test_hooks_pool_unwrap_tuples_and_remove_handles():
    net = Wrap()
    x = torch.randn(2, 3, 6, 6)
    with FeatureHooks(net, ["inner.a", "inner"], pooling="mean") as hooks:
        net(x)
        out = hooks.pop()
    assert out["inner.a"].shape == (2, 4)
    assert out["inner"].shape == (2, 5)  # first element of the tuple output
    torch.testing.assert_close(out["inner.a"], net.inner.a(x).mean(dim=(2, 3)))
    assert not net.inner.a._forward_hooks and not net._forward_hooks


def test_unknown_module_name_is_named():
    with pytest.raises(UnknownModuleError, match="mid_blok"):
        FeatureHooks(Wrap(), ["mid_blok"])


def test_pool_modes():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert pool(x, "max").tolist() == [[3.0, 7.0]]
    assert pool(x, "mean_max").shape == (1, 4)
    assert pool(torch.ones(1, 5, 3), "mean").shape == (1, 3)  # (B, tokens, C)


def test_encode_is_deterministic_per_image_and_layer_shapes(tiny_model_dir):
    from montrage.components import load_components

    c = load_components(tiny_model_dir)
    imgs = torch.rand(3, 3, 16, 16) * 2 - 1
    cond = torch.zeros(1, 16, 32)
    seeds = [stable_seed(f"img{i}") for i in range(3)]
    a = encode_images(c.unet, c.vae, c.scheduler, imgs, seeds, [100, 900], ["mid_block", "up_blocks.0"], "mean", cond)
    b = encode_images(
        c.unet,
        c.vae,
        c.scheduler,
        imgs[[2, 0]],
        [seeds[2], seeds[0]],
        [100, 900],
        ["mid_block", "up_blocks.0"],
        "mean",
        cond,
        batch_size=2,
    )
    assert a["mid_block"].shape == (3, 2, 64)
    np.testing.assert_allclose(a["mid_block"][[2, 0]], b["mid_block"], rtol=1e-4, atol=1e-5)
    assert stable_seed("x") == stable_seed("x") != stable_seed("y")


def test_encode_conditioned_uses_each_images_own_prompt(tiny_model_dir):
    from montrage.components import embed_prompts, load_components
    from montrage.encode import CAPTION, condition_prompts, encode_conditioned

    c = load_components(tiny_model_dir)
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seeds = [stable_seed(f"img{i}") for i in range(3)]
    prompts = ["a photo of seven", "a photo of one", "a photo of seven"]
    args = (c.unet, c.vae, c.scheduler, c.tokenizer, c.text_encoder, imgs, seeds)
    mixed = encode_conditioned(*args, prompts, [100, 900], ["mid_block"], "mean", chunk=2)["mid_block"]
    for i, p in enumerate(prompts):  # equal to encoding the image alone under its own prompt
        alone = encode_images(
            c.unet,
            c.vae,
            c.scheduler,
            imgs[i : i + 1],
            seeds[i : i + 1],
            [100, 900],
            ["mid_block"],
            "mean",
            embed_prompts(c.tokenizer, c.text_encoder, [p]),
        )["mid_block"]
        np.testing.assert_allclose(mixed[i], alone[0], rtol=1e-4, atol=1e-5)
    empty = encode_conditioned(*args, [""] * 3, [100, 900], ["mid_block"], "mean")["mid_block"]
    assert np.abs(empty - mixed).max() > 1e-3  # the text condition reaches the features
    assert condition_prompts(CAPTION, prompts) == prompts and condition_prompts("", prompts) == [""] * 3
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        encode_conditioned(*args, prompts[:2], [100], ["mid_block"])


def test_default_probes_weights():
    p = default_probes({"digit1": "one", "digit7": "seven", "digit9": "nine"}, "a photo of {token}", [0, 1])
    assert len(p.prompts) == 3 + 3 and len(p) == 12
    assert p.prompts[0] == "a photo of one" and p.weights[0] == {"digit1": 1.0}
    assert p.prompts[3] == "a photo of one and seven" and p.weights[3] == {"digit1": 0.5, "digit7": 0.5}
    w = np.array(p.weight_matrix())
    assert w.shape == (12, 3) and np.allclose(w.sum(1), 1.0)
    assert ProbeSet.from_json(p.to_json()) == p


def test_probe_file_and_errors(tmp_path):
    f = tmp_path / "probes.json"
    f.write_text(json.dumps({"probes": [{"prompt": "x", "concepts": {"a": 0.3, "b": 0.7}}], "seeds": [4]}))
    p = load_probe_file(str(f))
    assert p.items() == [("x", 4)] and p.concepts == ("a", "b")
    f.write_text(json.dumps({"prompts": ["x"]}))
    with pytest.raises(ProbeError, match="probes"):
        load_probe_file(str(f))
    with pytest.raises(ProbeError, match="empty"):
        ProbeSet((), (), (0,))
    with pytest.raises(ProbeError, match=r"\[0, 1\]"):
        ProbeSet(("x",), ({"a": 2.0},), (0,))


def test_shifted_cosine_and_concept_similarity():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = shifted_cosine(a, np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(s, [[1.0, 0.0, 0.5], [0.5, 0.5, 1.0]], atol=1e-7)
    sim = concept_similarity(a, np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), ["x", "x", "y"], ["x", "y", "z"])
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0] and np.isnan(sim[0, 2])
