"""What per-sample gradients with torch.func need from diffusers models (shared by attribution baselines and origin).

`torch.func.grad` cannot run through the saved-tensor hooks of gradient checkpointing, and `vmap` has no batching
rule for the fused CPU attention kernels.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eval_without_checkpointing(*modules: torch.nn.Module | None):
    """eval() (no dropout: deterministic features) and gradient checkpointing off; every submodule's mode and
    checkpointing flag are restored afterwards."""
    mods = [m for root in modules if root is not None for m in root.modules()]
    modes = [(m, m.training) for m in mods]
    ckpt = [m for m in mods if getattr(m, "gradient_checkpointing", None) is True]
    for m in mods:
        m.training = False
    for m in ckpt:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m in ckpt:
            m.gradient_checkpointing = True


def vmap_safe_attention(device: torch.device):
    """On CPU the math attention backend (batched matmuls, same values) instead of the fused kernel, which vmap would
    loop over with a warning per call; other devices keep their kernels."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
