"""Training data: read rows, render prompts with templates, tokenize with response masks, plan and collate batches."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.data module
