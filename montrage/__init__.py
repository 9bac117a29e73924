"""MONTRAGE: monitor diffusion fine-tuning for data attribution and origin attribution."""

__version__ = "0.1.0"
