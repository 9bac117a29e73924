"""Lightning callbacks (installed as `montrage.callbacks`)."""

from montrage.callbacks.montrage_callback import MontrageCallback, MontrageConfigError

__all__ = ["MontrageCallback", "MontrageConfigError"]
