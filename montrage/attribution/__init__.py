"""MONTRAGE data attribution: table from the store's trajectories, attribution model, offline queries."""

from montrage.attribution.fit import fit_attribution
from montrage.attribution.model import AttributionModel, AttributionModelError
from montrage.attribution.query import Attributor

__all__ = ["Attributor", "AttributionModel", "AttributionModelError", "fit_attribution"]
