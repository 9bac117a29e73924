"""The monitored model rebuilt from its store: the base with the run's adapter loaded per snapshot, to encode and
generate any image at every stored epoch. Attribution, origin and `montrage encode` share it."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from montrage.components import embed_prompts, load_model, model_identity
from montrage.encode import CAPTION, condition_prompts
from montrage.probes import ProbeSet
from montrage.projection import project
from montrage.store import StoreError, StoreMismatchError, StoreReader


class StoreModel:
    """Base model from the store's `model_path` (or `model_path=`), with the run's adapters loaded per snapshot;
    any family the store was written by (its family adapter does the latents, encoding and sampling)."""

    def __init__(self, store: StoreReader, model_path: str | None = None, device: str = "cpu"):
        from montrage.family import make_family

        self.store = store
        run = store.run
        path = model_path or run.model_path
        if not path:
            raise StoreError(
                f"store {store.path!r} does not record its base model; pass model_path=... (CLI: --model-path)."
            )
        self.model = load_model(path)
        want = store.spec["model"].get("unet_config_sha")
        have = model_identity(self.model.unet, path)["unet_config_sha"]
        if want and want != have:
            raise StoreMismatchError(
                f"model {path!r} is not the model store {store.path!r} was made with (denoiser config {have} != {want}); "
                "pass the run's base model with --model-path."
            )
        self.model.resolution = int(run.resolution)
        self.family = make_family(
            self.model.parts, None, store.spec["model"].get("family") or run.family, self.resolution
        )
        self.model.snapshots = self
        self.lora = store.has_adapters
        if self.lora:
            from peft import LoraConfig, inject_adapter_in_model

            if "unet" not in run.adapters:
                raise StoreError(
                    f"store {store.path!r} holds adapter snapshots but its run description names no denoiser "
                    "adapter (field config.adapters.unet); re-run the monitoring."
                )
            for part, setup in run.adapters.items():
                config = LoraConfig(r=setup.r, lora_alpha=setup.lora_alpha, target_modules=list(setup.target_modules))
                if part == "unet":
                    self.model.unet.add_adapter(config)
                elif isinstance(self.model.parts.get(part), torch.nn.Module):  # a text encoder
                    inject_adapter_in_model(config, self.model.parts[part])
        self.device = torch.device(device)
        for part in self.family.modules():
            part.to(self.device).eval().requires_grad_(False)
        self.encode_prompt = run.encode_prompt
        self.projection = {layer: m for layer in store.layers if (m := store.projection(layer)) is not None}
        self.row: int | None = None

    @property
    def resolution(self) -> int:
        return int(self.model.resolution)

    @property
    def num_epochs(self) -> int:
        return self.store.num_epochs

    def set_epoch(self, row: int) -> None:
        """Load the adapter snapshot of stored epoch `row` (no-op for runs without snapshots)."""
        if not self.lora or row == self.row:
            return
        from peft import set_peft_model_state_dict

        by_part: dict[str, dict] = {}
        for k, v in self.store.lora_params(row).items():  # text-encoder adapters are stored as `<part>::<name>`
            part, name = k.split("::", 1) if "::" in k else ("", k)
            by_part.setdefault(part, {})[name] = torch.from_numpy(np.ascontiguousarray(v))
        for part, sd in by_part.items():
            set_peft_model_state_dict(self.model.parts[part] if part else self.model.unet, sd)
        self.family.forget_texts()
        self.row = row

    def prompts(self, n: int, prompts: list[str] | None) -> list[str]:
        """The texts n images are encoded under, as the store's training images were (see `encode_prompt`)."""
        if prompts is not None and len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts (give one per image).")
        if prompts is None and self.encode_prompt == CAPTION:
            warnings.warn(
                f"store {self.store.path!r} encodes images under their captions/prompts, but no prompt was "
                "given: using the empty prompt, which weakens attribution. Pass the generation's prompt "
                "(CLI: --prompt).",
                stacklevel=3,
            )
        return condition_prompts(self.encode_prompt, prompts if prompts is not None else [""] * n)

    def cond(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (n, seq, dim) of `prompts` (for gradient baselines that condition like the encoder)."""
        return embed_prompts(self.model.tokenizer, self.model.text_encoder, prompts)

    def trajectory(
        self, images: torch.Tensor, seeds: list[int], rows: list[int] | None = None, prompts: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """{layer: (len(rows), n, T, F)}: the images (under `prompts`, if the store is captioned) at each stored epoch."""
        rows = list(range(self.num_epochs)) if rows is None else list(rows)
        if self.num_epochs == 0:
            raise StoreError(f"store {self.store.path!r} holds no complete epoch.")
        if len(rows) > 1 and not self.lora:
            raise StoreError(
                f"store {self.store.path!r} has no LoRA snapshots, so images cannot be re-encoded per "
                "epoch; use fast mode (final epoch) or re-run with save_lora_snapshots=True."
            )
        cfg = self.store.spec
        with torch.no_grad():
            latents = self.family.latents(images)  # the VAE is not adapted: encode once, not per epoch
        prompts = self.prompts(len(images), prompts)
        per_epoch = []
        for row in rows:
            self.set_epoch(row)
            per_epoch.append(
                project(
                    self.family.encode(latents, seeds, prompts, cfg["timesteps"], cfg["layers"], cfg["pooling"]),
                    self.projection,
                )
            )
        return {layer: np.stack([p[layer] for p in per_epoch]) for layer in per_epoch[0]}

    @torch.no_grad()
    def generate(self, probes: ProbeSet, row: int) -> torch.Tensor:
        """Probe images regenerated with the weights of epoch `row` and the callback's sampler settings."""
        self.set_epoch(row)
        run = self.store.run
        return self.family.generate(probes, self.resolution, run.num_inference_steps, run.guidance_scale)
