"""Fine-tuning recipes (installed as `montrage.recipes`): LightningModules, data modules, configs, the tiny base."""

from montrage.recipes.data import ConceptDataModule, DreamBoothDataModule
from montrage.recipes.fine_tune import DiffusionFineTune

__all__ = ["ConceptDataModule", "DreamBoothDataModule", "DiffusionFineTune"]
