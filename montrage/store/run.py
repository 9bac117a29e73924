"""The run description: how a run was monitored and what rebuilds its model offline, stored as the spec's `config`.

The Monitor writes it; every reader (`montrage encode`, attribution, origin) reads it back through
`StoreReader.run`, so the writer and the readers agree through one typed record rather than through strings and
copies of defaults. `from_dict` is strict: a missing or unknown field is an error naming the store and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from montrage.store.schema import StoreError


@dataclass(frozen=True)
class AdapterSetup:
    """A component's peft LoRA configuration, enough to rebuild the adapter the snapshots are loaded into."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0


@dataclass(frozen=True)
class RunDescription:
    """What the Monitor records. Fields without a default are what readers need; the rest describe the schedule."""

    # the model, as an offline reader rebuilds it
    model_path: str
    resolution: int
    family: str
    noise_kind: str
    denoiser_class: str
    noise_points: list[float]
    adapters: dict[str, AdapterSetup]  # component ("unet": the denoiser) -> its LoRA; empty for a full fine-tune
    # how the representations are computed
    layers: list[str]
    timesteps: list[int]
    pooling: str
    encode_prompt: str
    num_inference_steps: int
    guidance_scale: float
    thumbnail_size: int
    # the images and how they are read
    images: Optional[str] = None  # the folder the run was given (None: the store's per-image paths)
    image_keys: dict[str, str] = field(default_factory=dict)
    monitor_images: Any = None
    subset_seed: int = 0
    latent_cache: bool = True
    encode_batch_size: int = 32
    # the schedule and the rest of the Monitor's settings
    store_path: Optional[str] = None
    probe_prompts: Optional[list[str]] = None
    probe_seeds: list[int] = field(default_factory=list)
    probe_file: Optional[str] = None
    probe_template: Optional[str] = None
    probe_mixtures: bool = True
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    at_steps: Optional[list[int]] = None
    max_steps: Optional[int] = None
    save_lora_snapshots: bool = True
    mode: str = "auto"
    projection_width: Optional[int] = None
    projection_seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "the run description") -> RunDescription:
        """Strict: every field without a default must be there, and no other."""
        names = {f.name for f in dataclasses.fields(cls)}
        needed = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown, missing = sorted(set(data) - names), sorted(needed - set(data))
        if unknown or missing:
            raise StoreError(
                f"{where}: "
                + "; ".join(
                    ([f"unknown field(s) {unknown}"] if unknown else [])
                    + ([f"missing field(s) {missing}"] if missing else [])
                )
                + ". It was written by another montrage release: re-run the monitoring (or `montrage encode` with the "
                "release that wrote it)."
            )
        values = dict(data)
        try:
            values["adapters"] = {part: AdapterSetup(**a) for part, a in (data["adapters"] or {}).items()}
        except TypeError as err:
            raise StoreError(f"{where}: field 'adapters' does not read ({err}).") from err
        return cls(**values)
