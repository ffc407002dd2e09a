"""The adapters: the LoRA and DoRA layers and their math, and PEFT-format adapter files."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.lora module
