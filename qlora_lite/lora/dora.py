"""DoRA (weight-decomposed LoRA) on top of a LoRALinear: the math, as PEFT computes it.

W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row, with W0 the dequantized NF4 weight (QDoRA) and m a
trainable magnitude vector of d_out entries initialised to the row norms of W0 + s*B@A. The
norm is detached from the graph (section 4.3 of the DoRA paper, and PEFT), so the forward is

    y = base(x) + (m/n - 1) * base(x) + (m/n) * s * B(A(x))

where the base output is reused unless dropout is active (then W0 @ dropout(x) is recomputed,
as PEFT does). Each expression follows peft/tuners/lora/dora.py operation for operation, so
with fp32 adapters the logits equal PEFT's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in memory and in adapter files


def base_weight(base: nn.Module) -> torch.Tensor:
    """W0 as the forward sees it: bitsandbytes' dequantization of a 4-bit weight, else the weight."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w.detach()
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(w.data, qs)


def lora_weight(lora_A: nn.Linear, lora_B: nn.Linear) -> torch.Tensor:
    """B @ A (d_out x d_in) through the two layers' forwards on A's rows, PEFT's way of computing it.

    PEFT feeds an identity matrix through A; eye @ A.T is A.T exactly, so A.T is fed directly.
    """
    return lora_B(lora_A.weight.T.contiguous()).T


def weight_norm(w0: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of W0 + scale * delta (PEFT's "column norm" of W.T), in the sum's dtype."""
    w = w0 + scale * delta
    return torch.linalg.norm(w, dim=1).to(w.dtype)


@torch.no_grad()
def init_magnitude(module) -> None:
    """Give a LoRALinear its magnitude vector: ||W0 + scale*B@A|| per output row (PEFT's init).

    PEFT computes it before it casts the adapters to fp32, so in the base's dtype (bf16): the
    same here, then cast to the adapter dtype. At init the model therefore differs from the
    base by that rounding of m (m/n = 1 + O(2^-8)), exactly as PEFT's does.
    """
    a, b = module.lora_A.weight, module.lora_B.weight
    w0 = base_weight(module.base).to(a.device)
    norm = weight_norm(w0, (b @ a).to(w0.dtype), module.scale).to(a.dtype)
    module.lora_magnitude_vector = nn.Parameter(norm, requires_grad=True)


def dora_delta(module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to the base output: (m/n - 1) * base + (m/n) * scale * B(A(x)).

    Args:
        module (LoRALinear): a layer with `lora_magnitude_vector`.
        x (Tensor): (..., d_in) input, already in the adapter dtype outside autocast.
        base_out (Tensor): (..., d_out) base(x).
    """
    with torch.no_grad():  # the norm is a constant for the gradient (detached in PEFT)
        delta = lora_weight(module.lora_A, module.lora_B).to(x.dtype)
    w0 = base_weight(module.base).to(x.dtype)
    norm = weight_norm(w0, delta, module.scale).detach()
    mag_norm_scale = (module.lora_magnitude_vector / norm).view(1, -1)
    if module.training and not isinstance(module.dropout, nn.Identity):
        x = module.dropout(x)
        base_result = F.linear(x, w0)
    else:
        bias = getattr(module.base, "bias", None)
        base_result = base_out - bias if bias is not None else base_out
    lora_result = module.lora_B(module.lora_A(x))
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * module.scale


def dora_merged_weight(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """m / ||W0 + scale*B@A|| * (W0 + scale*B@A) in fp32 (PEFT's DoRA merge, never re-quantized).

    Args:
        w0 (Tensor): d_out x d_in base weight (the dequantized NF4 weight).
        lora_A (Tensor): r x d_in.
        lora_B (Tensor): d_out x r.
        magnitude (Tensor): d_out.
        scale (float): alpha / r (or alpha / sqrt(r)).
    """
    delta = (lora_B.float() @ lora_A.float()) * scale
    norm = weight_norm(w0, delta, 1)
    return (magnitude.float() / norm).view(-1, 1) * (w0 + delta)
