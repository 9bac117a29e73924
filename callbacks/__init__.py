"""Lightning callbacks (installed as `montrage.callbacks`)."""

from montrage.callbacks.attribution_curves import AttributionCurves
from montrage.callbacks.memorization_guard import MemorizationGuard
from montrage.callbacks.montrage_callback import MontrageCallback, MontrageConfigError

__all__ = ["AttributionCurves", "MemorizationGuard", "MontrageCallback", "MontrageConfigError"]
