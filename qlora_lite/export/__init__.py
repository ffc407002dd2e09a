"""After training: merge the adapter into a plain model folder, GGUF, and verify the export."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.export module
