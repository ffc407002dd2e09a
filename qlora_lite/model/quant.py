"""bitsandbytes 4-bit weights seen as tensors: what a packed weight stands for.

A `Params4bit` holds two 4-bit codes per byte and carries a `quant_state` (shape, absmax,
code, nested state); every question about "is this a 4-bit weight" is answered here.
"""

from __future__ import annotations

import torch

from ..errors import QloraError


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


# ---------------------------------------------------------------- the frozen 4-bit matmul


def keeps_dequantized_weights(device, gradient_checkpointing: bool) -> bool:
    """Whether a run's NF4 linears keep their dequantized weight from forward to backward.

    bitsandbytes' matmul dequantizes a weight in forward and again in backward, so under
    gradient checkpointing each weight is dequantized three times a step (forward, recompute,
    backward). Kept by autograd instead, the recompute's copy serves the backward, and the
    checkpoint frees it with the layer's other recomputed tensors: one layer's weights at a
    time (7 MB on SmolLM2-135M, 0.4 GB on a 7B). Only on CPU, where dequantizing is 8% of a
    step (docs/performance.md, "Where the time goes"); on a GPU the dequantize kernel is a small share of
    the step and the memory is worth more. Without checkpointing the copies would pile up
    over all layers.
    """
    return gradient_checkpointing and torch.device(device).type == "cpu"


def dequantize_4bit(weight: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """A packed 4-bit weight as a `qs.shape` tensor of `dtype`, through bitsandbytes' registered ops
    (no Python wrapper layers): the nested absmax first, then the 4-bit codes. Bit for bit what
    `bitsandbytes.functional.dequantize_4bit` (and so MatMul4Bit) computes.

    Args:
        weight (Tensor): the packed uint8 codes (Params4bit data).
        qs: its bitsandbytes QuantState.
        dtype (torch.dtype): the output dtype (the compute dtype).
    """
    absmax = qs.absmax
    if qs.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.view(-1, 1), absmax, qs.blocksize, qs.quant_type,
                                                          qs.shape, dtype)


class _KeepDequantized(torch.autograd.Function):
    """x @ W.T + bias for a frozen 4-bit W that saves its dequantized W for the input gradient.

    The arithmetic is bitsandbytes' (its default gemm_4bit: absmax of the nested state, then
    dequantize_4bit into x's dtype, then linear; backward: grad @ W), so results are bit for
    bit MatMul4Bit's.
    """

    @staticmethod
    def forward(ctx, x, weight, qs, bias):
        w = dequantize_4bit(weight, qs, x.dtype)
        ctx.save_for_backward(w)
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return torch.matmul(grad, w) if ctx.needs_input_grad[0] else None, None, None, None


def linear_4bit(base, x: torch.Tensor) -> torch.Tensor:
    """`base(x)` for a bnb.nn.Linear4bit, keeping the dequantized weight for backward.

    Follows Linear4bit.forward: compute in base.compute_dtype, return in x's dtype.
    """
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)  # the quant_state an FSDP all-gather drops
    qs = base.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False) or base.compute_dtype is None:
        return base(x)  # layouts and first calls only bitsandbytes' own forward handles
    bias = None if base.bias is None else base.bias.to(base.compute_dtype)
    return _KeepDequantized.apply(x.to(base.compute_dtype), base.weight, qs, bias).to(x.dtype)
