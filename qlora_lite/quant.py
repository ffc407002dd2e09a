"""bitsandbytes 4-bit weights seen as tensors: what a packed weight stands for.

A `Params4bit` holds two 4-bit codes per byte and carries a `quant_state` (shape, absmax,
code, nested state); every question about "is this a 4-bit weight" is answered here.
"""

from __future__ import annotations

import torch

from .errors import QloraError


def quant_state(t: torch.Tensor):
    """The bitsandbytes QuantState of a 4-bit weight, None for any other tensor."""
    return getattr(t, "quant_state", None)


def is_4bit(t: torch.Tensor) -> bool:
    """Whether `t` is a packed bitsandbytes 4-bit weight."""
    return quant_state(t) is not None


def logical_shape(t: torch.Tensor) -> torch.Size:
    """The shape a tensor stands for: a 4-bit weight's unpacked shape."""
    qs = quant_state(t)
    return qs.shape if qs is not None else t.shape


def logical_numel(t: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    return logical_shape(t).numel()


def quant_state_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a 4-bit weight's quant_state (absmax, code, nested state); [] otherwise."""
    qs, out = quant_state(t), []
    while qs is not None:
        out += [x for x in (qs.absmax, qs.code, getattr(qs, "offset", None)) if torch.is_tensor(x)]
        qs = getattr(qs, "state2", None)
    return out


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """The weight as training's forward saw it: bitsandbytes' dequantization for 4-bit."""
    qs = quant_state(t)
    if qs is None:
        return t.detach()
    if getattr(qs, "packing_format_for_cpu", False):
        raise QloraError("This 4-bit model has been repacked by bitsandbytes' CPU inference path (an eval "
                         "forward ran on it), which rounds its scales; export from a freshly loaded model.")
    import bitsandbytes.functional as F

    return F.dequantize_4bit(t.data, qs)
