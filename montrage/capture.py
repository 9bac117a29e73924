"""Forward hooks on modules named by their dotted path, with pooled outputs (timm's FeatureHooks, for UNets)."""

from __future__ import annotations

from typing import Literal

import torch

from montrage.errors import MontrageError

Pooling = Literal["mean", "max", "mean_max"]


class UnknownModuleError(MontrageError, ValueError):
    """A hooked module name that the model does not have."""


def pool(x: torch.Tensor, how: Pooling) -> torch.Tensor:
    """(B, C, *spatial) or (B, tokens, C) -> (B, features)."""
    if x.dim() == 3:  # attention outputs: (B, tokens, C)
        x = x.transpose(1, 2)
    flat = x.flatten(2) if x.dim() > 2 else x[..., None]
    if how == "mean":
        return flat.mean(-1)
    if how == "max":
        return flat.amax(-1)
    if how == "mean_max":
        return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)
    raise ValueError(f"unknown pooling {how!r}: use 'mean', 'max' or 'mean_max'.")


def block_names(model: torch.nn.Module) -> list[str]:
    """Names worth hooking: top-level modules and the entries of top-level module lists (e.g. 'up_blocks.1')."""
    names = []
    for name, child in model.named_children():
        names.append(name)
        if isinstance(child, torch.nn.ModuleList):
            names += [f"{name}.{k}" for k in range(len(child))]
    return names


def resolve_modules(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """Modules by dotted name, on the unwrapped model (DDP/compile/peft prefixes in `names` are ignored)."""
    from montrage.components import strip_wrapper_prefixes, unwrap

    model = unwrap(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if strip_wrapper_prefixes(n) not in modules]
    if missing:
        raise UnknownModuleError(
            f"unknown hooked module(s) {missing} in {type(model).__name__}. Use dotted names from "
            f"`model.named_modules()`; the available blocks are: {', '.join(block_names(model))}."
        )
    return {n: modules[strip_wrapper_prefixes(n)] for n in names}


class FeatureHooks:
    """Collect pooled outputs of named modules while active; handles are removed on exit.

    Tuple outputs (e.g. down blocks' (hidden, residuals)) are unwrapped to their first element, unless `select`
    says otherwise (joint transformer blocks return (text, image): the image stream is the second).
    """

    def __init__(self, model: torch.nn.Module, names: list[str], pooling: Pooling = "mean", select=None):
        """`select(module, output)` picks the stream to pool (default: the first element of a tuple output)."""
        self.modules = resolve_modules(model, list(names))
        self.pooling = pooling
        self.select = select
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self._handles = []

    def _hook(self, name):
        def fn(module, _inputs, output):
            if self.select is not None:
                output = self.select(module, output)
            elif isinstance(output, (tuple, list)):
                output = output[0]
            if hasattr(output, "sample") and not torch.is_tensor(output):
                output = output.sample
            self.outputs[name].append(pool(output.detach().float(), self.pooling).cpu())

        return fn

    def __enter__(self) -> "FeatureHooks":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop(self) -> dict[str, torch.Tensor]:
        """Captured features per module, concatenated over calls along the batch axis, then cleared."""
        out = {n: torch.cat(v) if v else torch.empty(0) for n, v in self.outputs.items()}
        self.outputs = {n: [] for n in self.outputs}
        return out
