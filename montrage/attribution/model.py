"""The attribution model: a small MLP from a pair's table features to a score in [0, 1], and its losses.

Trained on probe generations, whose ground truth is known by construction, with a bounded loss: the shifted
cosine between the predicted and the ground-truth attribution vector of each probe (MONTRAGE's footnote 5), or
per-pair MSE / BCE as ablations.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import torch

from montrage.errors import MontrageError

Loss = Literal["scos", "scos+rank", "mse", "bce"]
RANK_WEIGHT = 0.1


class AttributionModelError(MontrageError, ValueError):
    """A missing, corrupted or mismatched attribution-model file."""


class AttributionModel(torch.nn.Module):
    """score(q, i) = mean over `members` MLPs of sigmoid(MLP(standardized features of the pair)).

    The members are trained independently from their own initializations (`member_scores`); their mean is the
    score, so the ranking within a concept does not hinge on one initialization."""

    def __init__(self, in_dim: int, hidden: int = 64, depth: int = 2, members: int = 1):
        super().__init__()
        dims = [in_dim] + [hidden] * depth

        def mlp() -> torch.nn.Sequential:
            layers: list[torch.nn.Module] = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
            layers.append(torch.nn.Linear(dims[-1], 1))
            return torch.nn.Sequential(*layers)

        self.nets = torch.nn.ModuleList([mlp() for _ in range(members)])
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sigma", torch.ones(in_dim))
        self.config = {"in_dim": in_dim, "hidden": hidden, "depth": depth, "members": members}

    def set_normalization(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        self.mu.copy_(flat.mean(0))
        self.sigma.copy_(flat.std(0).clamp_min(1e-6))

    def member_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(members, *x.shape[:-1]) each member's scores; the members' layers run as one batched product each."""
        lead = x.shape[:-1]
        h = ((x - self.mu) / self.sigma).reshape(1, -1, x.shape[-1])  # (1, rows, D), shared by the members
        linears = [[m for m in net if isinstance(m, torch.nn.Linear)] for net in self.nets]
        for i in range(len(linears[0])):
            w = torch.stack([lin[i].weight.T for lin in linears])  # (members, in, out)
            b = torch.stack([lin[i].bias for lin in linears]).unsqueeze(1)
            h = torch.baddbmm(b, h.expand(len(linears), -1, -1) if h.shape[0] == 1 else h, w)
            if i < len(linears[0]) - 1:
                h = torch.nn.functional.gelu(h)
        return torch.sigmoid(h.squeeze(-1)).reshape(len(linears), *lead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_scores(x).mean(0)

    @torch.no_grad()
    def score(self, x) -> "torch.Tensor":
        return self(torch.as_tensor(x, dtype=torch.float32))

    def save(self, path: str, meta: dict) -> None:
        """`path`.safetensors (weights) and `path`.json (architecture, features, store identity, fit report)."""
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path + ".safetensors")
        with open(path + ".json", "w") as fh:
            json.dump({"model": self.config, **meta}, fh, indent=1)

    @classmethod
    def load(cls, path: str) -> tuple["AttributionModel", dict]:
        from safetensors.torch import load_file

        for suffix in (".json", ".safetensors"):
            if not os.path.isfile(path + suffix):
                raise AttributionModelError(
                    f"attribution model {path + suffix!r} is missing: run `montrage attribute fit STORE` first."
                )
        try:
            with open(path + ".json") as fh:
                meta = json.load(fh)
            model = cls(**meta["model"])
            state = load_file(path + ".safetensors")
            state = {
                ("nets.0." + k[4:] if k.startswith("net.") else k): v for k, v in state.items()
            }  # one-member files
            model.load_state_dict(state)
        except Exception as err:  # any parse/shape error means the files cannot be trusted
            raise AttributionModelError(
                f"attribution model {path!r} is corrupted or from another montrage version ({type(err).__name__}: {err}); "
                "re-run `montrage attribute fit STORE`."
            ) from err
        return model.eval(), meta


def within_rank_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Listwise cross-entropy of the within-concept targets among their concept's images, over the probes whose
    positive targets take two levels (exemplars above the rest of their concept; 0 when there are none)."""
    pos = target > 0
    top = pos & (target >= target.amax(dim=-1, keepdim=True) - 1e-6)
    rows = (pos & ~top).any(dim=-1)
    if not bool(rows.any()):
        return pred.sum() * 0.0
    logit = torch.logit(pred[rows].clamp(1e-6, 1 - 1e-6)).masked_fill(~pos[rows], float("-inf"))
    logp = torch.log_softmax(logit, dim=-1).masked_fill(~top[rows], 0.0)
    return (-logp.sum(dim=-1) / top[rows].sum(dim=-1)).mean()


def ensemble_loss(model: AttributionModel, x: torch.Tensor, target: torch.Tensor, kind: Loss) -> torch.Tensor:
    """The members' mean loss: each member fits the target on its own (their gradients do not mix)."""
    return torch.stack([attribution_loss(p, target, kind) for p in model.member_scores(x)]).mean()


def attribution_loss(pred: torch.Tensor, target: torch.Tensor, kind: Loss = "scos") -> torch.Tensor:
    """pred, target (Q, N) in [0, 1]. 'scos': 1 - mean shifted cosine of each query's attribution vectors;
    'scos+rank': plus `RANK_WEIGHT` x `within_rank_loss`."""
    if kind in ("scos", "scos+rank"):
        cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8)
        value = (1.0 - (1.0 + cos) / 2.0).mean()
        return value + RANK_WEIGHT * within_rank_loss(pred, target) if kind == "scos+rank" else value
    if kind == "mse":
        return torch.nn.functional.mse_loss(pred, target)
    if kind == "bce":
        return torch.nn.functional.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target)
    raise ValueError(f"unknown loss {kind!r}: use 'scos', 'mse' or 'bce'.")
