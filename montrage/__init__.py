"""MONTRAGE: monitor diffusion fine-tuning for data attribution and origin attribution."""

__version__ = "0.1.0"
__all__ = ["Monitor"]


def __getattr__(name):  # `from montrage import Monitor` without importing torch for `montrage --help`
    if name == "Monitor":
        from montrage.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'montrage' has no attribute {name!r}")
