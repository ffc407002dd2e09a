"""qlora-lite: QLoRA fine-tuning for one consumer GPU."""

__version__ = "0.1.0"
