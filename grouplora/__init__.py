"""grouplora: one language model for many datasets, through grouped LoRA adapters."""

__version__ = "0.1.0"
