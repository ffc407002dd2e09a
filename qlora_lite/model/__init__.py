"""The frozen base: load it in NF4 and freeze it, 4-bit weights as tensors, tiny local models, long-context techniques."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.model module
