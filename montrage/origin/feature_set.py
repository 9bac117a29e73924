"""What origin features are: the families (`FAMILIES`, ...), the spec a set of features was extracted with
(`FeatureSpec`, stored beside the values and checked on reuse) and the values themselves (`FeatureSet`). How they
are computed is `montrage.origin.features`."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
import torch

from montrage.components import DiffusionModel
from montrage.origin.errors import OriginError
from montrage.origin.model import check_same_model

FAMILIES = ("loss", "grad_x", "grad_theta")  # the paper's
PIA_FAMILIES = ("loss_pia",)
REFERENCE_FAMILIES = ("loss_ref", "grad_x_ref")
CLID_FAMILIES = ("clid_null", "clid_perturbed")
SNAPSHOT_FAMILIES = ("loss_snapshots",)
ALL_FAMILIES = FAMILIES + PIA_FAMILIES + REFERENCE_FAMILIES + CLID_FAMILIES + SNAPSHOT_FAMILIES


def has_adapter(unet: torch.nn.Module) -> bool:
    """Whether the UNet carries a PEFT adapter (LoRA) that can be switched off to give the reference model."""
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def default_families(model: "DiffusionModel") -> tuple[str, ...]:
    """montrage's default: the paper's families, the PIA-noise losses, and the reference pair for adapter models."""
    return FAMILIES + PIA_FAMILIES + (REFERENCE_FAMILIES if has_adapter(model.unet) else ())


def default_timesteps(num_train_timesteps: int = 1000, count: int = 20) -> list[int]:
    """`count` timesteps at a uniform stride over [0, T): 0, T/count, 2T/count, ... (the paper's t = 0, k, 2k, ...)."""
    if count < 1:
        raise OriginError(f"the number of timesteps must be at least 1, not {count}.")
    count = min(int(count), int(num_train_timesteps))
    return [int(t) for t in np.floor(np.arange(count) * (num_train_timesteps / count)).astype(int)]


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What was computed and how: stored with every features file and classifier, so predictions use the same."""

    timesteps: tuple[int, ...]
    families: tuple[str, ...] = FAMILIES
    params: str | tuple[str, ...] = "trainable"
    noise: str = "random"
    noise_seed: int = 0
    prompt: str = ""
    layer_norms: bool = False
    draws: int = 1
    snapshots: tuple[int, ...] = ()  # store rows whose adapters `loss_snapshots` is computed under
    captions_for: str = "all"  # given captions condition every family ("all") or only CLiD's ("clid")

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "snapshots", tuple(int(r) for r in self.snapshots))
        if not isinstance(self.params, str):
            object.__setattr__(self, "params", tuple(self.params))
        if not self.timesteps:
            raise OriginError("the timestep grid is empty: give at least one timestep.")
        bad = [f for f in self.families if f not in ALL_FAMILIES]
        if bad or not self.families:
            raise OriginError(f"unknown feature families {bad}: choose from {', '.join(ALL_FAMILIES)}.")
        if int(self.draws) < 1:
            raise OriginError(f"draws (ε per image and timestep) must be at least 1, not {self.draws}.")
        object.__setattr__(self, "draws", int(self.draws))
        if self.noise == "pia" and self.draws != 1:
            raise OriginError("PIA's noise is deterministic (ε_θ(x, 0)): several draws would repeat it; use draws=1.")
        if self.noise not in ("random", "pia"):
            raise OriginError(f"noise must be 'random' (fresh seeded ε per image and t) or 'pia', not {self.noise!r}.")
        if isinstance(self.params, str) and self.params not in ("trainable", "all"):
            raise OriginError(
                f"params must be 'trainable', 'all' or a list of parameter-name prefixes, not {self.params!r}."
            )
        if self.needs_snapshots and not self.snapshots:
            raise OriginError(
                "the loss_snapshots family needs the store rows to compute it at (snapshots=...): build "
                "the spec with `store_feature_spec`, or drop the family."
            )
        if self.snapshots and not self.needs_snapshots:
            raise OriginError("snapshots are given but the loss_snapshots family is not among the families.")
        if self.captions_for not in ("all", "clid"):
            raise OriginError(
                f"captions_for must be 'all' (captions condition every family) or 'clid' (only CLiD's; "
                f"the others under `prompt`), not {self.captions_for!r}."
            )

    @property
    def needs_theta(self) -> bool:
        return "grad_theta" in self.families or self.layer_norms

    @property
    def needs_reference(self) -> bool:
        return any(f in self.families for f in REFERENCE_FAMILIES)

    @property
    def needs_captions(self) -> bool:
        return any(f in self.families for f in CLID_FAMILIES)

    @property
    def needs_snapshots(self) -> bool:
        return any(f in self.families for f in SNAPSHOT_FAMILIES)

    def columns(self, family: str) -> list[str]:
        """Names of a family's columns: one per timestep; `loss_snapshots` one per (snapshot, t), snapshot-major."""
        if family in SNAPSHOT_FAMILIES:
            return [f"{family}@row={r},t={t}" for r in self.snapshots for t in self.timesteps]
        return [f"{family}@t={t}" for t in self.timesteps]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["families"] = list(self.families)
        d["snapshots"] = list(self.snapshots)
        d["params"] = self.params if isinstance(self.params, str) else list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise OriginError(f"feature spec has unknown fields {sorted(unknown)}; it was written by a newer montrage.")
        params = d.get("params", "trainable")
        return cls(**{**d, "params": params if isinstance(params, str) else tuple(params)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def compatible(self, other: "FeatureSpec") -> bool:
        """Whether features computed under `other` can be scored by a model fit under this spec: same timesteps,
        noise kind, θ, prompt, number of draws, snapshot rows and caption use (the noise seed only draws other ε
        from the same distribution; a mean over more draws has a narrower distribution, so it is not
        interchangeable)."""
        keys = ("timesteps", "noise", "params", "prompt", "draws", "snapshots", "captions_for")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclasses.dataclass
class FeatureSet:
    """Features of N images at T timesteps: arrays (N, T) per family, optional per-tensor norms (N, T, G)."""

    spec: FeatureSpec
    identity: dict
    ids: list[str]
    values: dict[str, np.ndarray]
    layer_norms: np.ndarray | None = None
    layer_names: list[str] | None = None
    label: str | None = None
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def timesteps(self) -> list[int]:
        return list(self.spec.timesteps)

    def subset(self, rows) -> "FeatureSet":
        rows = np.asarray(rows)
        return dataclasses.replace(
            self,
            ids=[self.ids[i] for i in np.arange(len(self.ids))[rows]],
            values={k: v[rows] for k, v in self.values.items()},
            layer_norms=None if self.layer_norms is None else self.layer_norms[rows],
        )

    def at_timesteps(self, timesteps: Sequence[int]) -> "FeatureSet":
        """The same images restricted to some of the timesteps (for window ablations)."""
        pos = {t: j for j, t in enumerate(self.spec.timesteps)}
        missing = [t for t in timesteps if t not in pos]
        if missing:
            raise OriginError(f"timesteps {missing} are not in this feature set's grid {list(self.spec.timesteps)}.")
        cols = [pos[t] for t in timesteps]
        T = len(self.spec.timesteps)
        snap_cols = [s * T + j for s in range(len(self.spec.snapshots)) for j in cols]
        return dataclasses.replace(
            self,
            spec=dataclasses.replace(self.spec, timesteps=tuple(timesteps)),
            values={k: v[:, snap_cols if k in SNAPSHOT_FAMILIES else cols] for k, v in self.values.items()},
            layer_norms=None if self.layer_norms is None else self.layer_norms[:, cols],
        )


def concat_feature_sets(sets: Sequence[FeatureSet], label: str | None = None) -> FeatureSet:
    """Rows of several feature sets of one model and one spec, in order (e.g. images from several sources)."""
    if not sets:
        raise OriginError("no feature sets to concatenate.")
    first = sets[0]
    for fs in sets[1:]:
        check_same_model(first.identity, fs.identity, "one of the feature sets", "Concatenate features of one model.")
        if not first.spec.compatible(fs.spec) or set(fs.values) != set(first.values):
            raise OriginError(
                "feature sets with different timesteps, noise, θ, prompt or families cannot be "
                "concatenated; compute them with one spec."
            )
    layers = None
    if all(fs.layer_norms is not None for fs in sets):
        layers = np.concatenate([fs.layer_norms for fs in sets])
    return dataclasses.replace(
        first,
        ids=[i for fs in sets for i in fs.ids],
        label=label,
        values={k: np.concatenate([fs.values[k] for fs in sets]) for k in first.values},
        layer_norms=layers,
        layer_names=first.layer_names if layers is not None else None,
        seconds=sum(fs.seconds for fs in sets),
    )
