"""cft-adapters: continual fine-tuning of language ability with QLoRA adapters."""

__version__ = "0.1.0"
