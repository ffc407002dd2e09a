"""Training: setup, the loop, one optimizer step, optimizers and schedules, metrics and trackers."""

from .._moved import forward

__getattr__ = forward(__name__, __path__[0])  # the names of the old qlora_lite.train module
