"""Memory: the tracker that measures it, the profile that reports it, the estimate that predicts it."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.memory module
