"""LightningCLI over the recipes: `montrage fit --config demo.yaml` (or sd15-lora.yaml, sd15-dreambooth.yaml)."""

from __future__ import annotations

import os

from pytorch_lightning.cli import LightningCLI


def config_path(name: str) -> str:
    """Path of a bundled config (`demo.yaml`, `sd15-lora.yaml`, `sd15-dreambooth.yaml`)."""
    return os.path.join(os.path.dirname(__file__), "configs", name)


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    from montrage.recipes.fine_tune import DiffusionFineTune

    return LightningCLI(
        DiffusionFineTune,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
