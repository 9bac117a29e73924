"""The cached bases: one config names one set of weights, whatever the machine's thread count."""

import hashlib
import pathlib

import torch

from montrage.recipes.tiny_base import BUILD_THREADS, TinyBaseConfig, tiny_base_path


def _weights(path: str) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pathlib.Path(path).rglob("*.safetensors"))
    }


def test_a_base_built_on_two_threads_equals_one_built_on_one(tmp_path):
    cfg = TinyBaseConfig(vae_steps=3, unet_steps=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = tiny_base_path(cfg, cache_dir=str(tmp_path / "a"), progress=False)
        assert torch.get_num_threads() == 2  # the build's own thread count does not leak out
        torch.set_num_threads(1)
        one = tiny_base_path(cfg, cache_dir=str(tmp_path / "b"), progress=False)
    finally:
        torch.set_num_threads(before)
    assert two.endswith(f"-{BUILD_THREADS}t")
    assert len(_weights(two)) == 3 and _weights(two) == _weights(one)
