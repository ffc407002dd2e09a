"""The LoRA layer and the free functions around it: attach, mark trainable, count, merge.

One class serves both modes: it wraps a `bnb.nn.Linear4bit` (QLoRA) or a plain
`nn.Linear` (bf16 LoRA) held as `.base`, so the quantized base is never subclassed.
With `lora.use_dora` it also holds DoRA's magnitude; DoRA's math lives in dora.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import QloraError
from ..model.quant import keeps_dequantized_weights, linear_4bit, logical_numel, quant_state
from ..recipe import LoraConfig
from ..utils import env
from ..utils.dtypes import torch_dtype
from .dora import dora_delta, init_magnitude
from .fused import group_shared_inputs, lora_forward

ADAPTER_PARAM_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


# Dropout masks on CPU cost the generator (mt19937), not the multiply: bernoulli_ draws once
# per element. One 64-bit draw split into four 15-bit uniforms needs a quarter of the draws;
# the drop probability is then p rounded to a multiple of 1/32768.
_UNIFORM_BITS = 15
# The bit patterns of 1.0 in the 2-byte float dtypes: a 0/1 int16 mask times this, viewed as
# the dtype, is the 0.0/1.0 mask without a conversion pass.
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


class LoRADropout(nn.Dropout):
    """nn.Dropout with a 4x cheaper mask on CPU; elsewhere (CUDA's philox is fast) torch's own.

    `drop(x)` zeroes without rescaling: LoRALinear folds the 1/(1-p) into its scale, applied
    to the rank-r activations instead of a full-width pass (B(A(x*m))*c = B(A(x*m)*c)).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self.drop(x) * (1.0 / (1.0 - self.p))  # in fp32 arithmetic: 1/(1-p) in bf16 is 0.2% off

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """x with each element zeroed with probability p, not rescaled (training only)."""
        return x * self.keep_mask(x)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """1 where x is kept (probability 1 - p), 0 where dropped: bool on a GPU, x's dtype on CPU."""
        if x.device.type != "cpu":
            return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - self.p)
        n = x.numel()
        u = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
        # keep = (u >= threshold) as 0/1, in int16 arithmetic: bool tensors take slow paths.
        threshold = round(self.p * 2**_UNIFORM_BITS)
        keep = u.bitwise_and_(2**_UNIFORM_BITS - 1).sub_(threshold - 1).clamp_(0, 1).view(x.shape)
        one = _ONE_BITS.get(x.dtype)
        return keep.mul_(one).view(x.dtype) if one else keep.to(x.dtype)


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))), with A: r x d_in (kaiming), B: d_out x r (zeros).

    Args:
        base (nn.Linear | bnb.nn.Linear4bit): the frozen layer.
        r (int): rank.
        alpha (float): scale numerator.
        dropout (float): dropout on the adapter input. Default 0.0.
        rslora (bool): scale = alpha / sqrt(r) instead of alpha / r. Default False.
        dtype (torch.dtype): adapter dtype. Default torch.bfloat16.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        device = _module_device(base)
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # Same init as PEFT/torchtune: B = 0 makes the adapted model start as the base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # DoRA's magnitude (lora/dora.py); None for plain LoRA.
        self.register_parameter("lora_magnitude_vector", None)
        self.keep_dequantized = False  # set by keep_dequantized_weights
        self.fused = False  # the fused path (fused.py) where it applies; set by attach_lora
        self.shared_input = None  # the fused.SharedInput of the linears that read this one's input
        self.disabled = False  # the base alone (adapters_disabled: DPO's reference pass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        if self.disabled:
            return linear_4bit(self.base, x) if self.keep_dequantized else self.base(x)
        if self.fused and self.fusable(x):
            if self.shared_input is not None:
                return self.shared_input(self, x, self.dropout_mask)
            return lora_forward([self], x, self.dropout_mask(x))[0]
        out = linear_4bit(self.base, x) if self.keep_dequantized else self.base(x)
        # Under autocast the matmul dtype is chosen for us; outside it, run the adapter in
        # its own dtype and cast back, as PEFT does, so both stacks round identically.
        autocast = torch.is_autocast_enabled(x.device.type)
        a_in = x if autocast else x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is not None:
            # PEFT adds DoRA's term in the adapter dtype and casts the sum back.
            y = out + dora_delta(self, a_in, out)
            return y if autocast else y.to(out.dtype)
        # PEFT computes B(A(dropout(x))) * scale; the scale (and dropout's 1/(1-p)) multiply the
        # rank-r activations here instead, r/d_out of the work. Exact when the factor is a power
        # of two (alpha = 2r: 2.0); otherwise the products differ by bf16 rounding.
        if self.training and isinstance(self.dropout, LoRADropout) and self.dropout.p > 0:
            h, scale = self.lora_A(self.dropout.drop(a_in)), self.scale / (1.0 - self.dropout.p)
        else:
            h, scale = self.lora_A(a_in), self.scale
        delta = self.lora_B(h * scale)
        return out + delta.to(out.dtype)

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether fused.py computes this layer for `x`: plain LoRA (not DoRA), x in the adapters'
        dtype and in the base's compute dtype, the base's weight unsharded and in a layout it reads."""
        if self.lora_magnitude_vector is not None or x.dtype != self.lora_A.weight.dtype:
            return False
        base = self.base
        qs = quant_state(base.weight)
        if qs is None:
            return base.weight.dtype == x.dtype and getattr(base, "sharded_quant_state", None) is None
        return base.compute_dtype == x.dtype and not getattr(qs, "packing_format_for_cpu", False)

    def dropout_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Dropout's keep mask for x in training with dropout, else None."""
        if self.training and isinstance(self.dropout, LoRADropout) and self.dropout.p > 0:
            return self.dropout.keep_mask(x)
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has gradient checkpointing on (named
    `is_activation_checkpointing` since transformers 5, which warns on the old name)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def is_linear(m: nn.Module) -> bool:
    """A linear layer we can adapt: nn.Linear and bitsandbytes' 4-bit/8-bit linears (subclasses)."""
    return isinstance(m, nn.Linear)


def linear_names(model: nn.Module) -> list[str]:
    """Full module paths of every linear layer except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if is_linear(m) and m is not head and n]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Module paths selected by `target_modules` ("all-linear" or a list of name suffixes).

    Raises QloraError when a name matches no linear layer, listing the ones the model has.
    """
    names = linear_names(model)
    if target_modules == "all-linear":
        if not names:
            raise QloraError("lora.target_modules='all-linear' matched no linear layer in this model.")
        return names
    chosen: list[str] = []
    for t in target_modules:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise QloraError(
                f"lora.target_modules entry {t!r} matches no linear layer. "
                f"This model's linear layers are: {', '.join(suffixes)} (or use 'all-linear')."
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def attach_lora(model: nn.Module, cfg: LoraConfig, targets: list[str] | None = None,
                dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the targeted linears of `model` in LoRALinear, in place; freeze everything else.

    On CPU, with the model's gradient checkpointing on, the NF4 bases keep their dequantized
    weight for backward (keep_dequantized_weights).

    Args:
        model (nn.Module): the base model.
        cfg (LoraConfig): r, alpha, dropout, target_modules, rslora, dtype.
        targets (list[str] | None): explicit module paths; default from cfg.target_modules.
        dtype (torch.dtype | None): overrides cfg.dtype (a parity check's choice). Default None.

    Returns:
        list[str]: the adapted module paths.
    """
    targets = find_targets(model, cfg.target_modules) if targets is None else targets
    dtype = dtype or torch_dtype(cfg.dtype)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise QloraError(f"Module {name!r} already has a LoRA adapter.")
        if not is_linear(base):
            raise QloraError(f"Module {name!r} is a {type(base).__name__}, not a linear layer.")
        setattr(parent, child, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, dtype))
        if cfg.use_dora:
            init_magnitude(getattr(parent, child))
    mark_only_lora_trainable(model)
    keep_dequantized_weights(model, _module_device(model), _checkpointing(model))
    use_fused(model, env.enabled(env.FUSED))
    return list(targets)


def use_fused(model: nn.Module, on: bool = True) -> None:
    """Run the model's LoRA linears through fused.py where it applies (`LoRALinear.fusable`), the
    linears that read one input (q/k/v, gate/up) in one call; `on=False` restores the unfused path."""
    modules = lora_modules(model)
    for m in modules.values():
        m.fused, m.shared_input = on, None
    if on:
        group_shared_inputs(modules)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes its base alone (PEFT's `disable_adapter()`): DPO's
    reference without a second copy of the weights."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


def keep_dequantized_weights(model: nn.Module, device, gradient_checkpointing: bool) -> None:
    """Let the 4-bit bases keep their dequantized weight for backward where the rule says so
    (quant.keeps_dequantized_weights: CPU under gradient checkpointing). attach_lora applies
    it for the model as loaded; call again after moving the model or changing checkpointing."""
    import bitsandbytes as bnb

    on = keeps_dequantized_weights(device, gradient_checkpointing)
    for m in lora_modules(model).values():
        m.keep_dequantized = on and isinstance(m.base, bnb.nn.Linear4bit)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(ADAPTER_PARAM_NAMES))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(ADAPTER_PARAM_NAMES)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed `<module path>.lora_A.weight` / `.lora_B.weight` (no `.base`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
        if m.lora_magnitude_vector is not None:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted at their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """`trainable N of M (x.xx%)`."""
    n, total = count_parameters(model)
    return f"trainable {n:,} of {total:,} ({100 * n / max(total, 1):.2f}%)"


def expected_lora_params(model: nn.Module) -> int:
    """r * (d_in + d_out) (+ d_out with DoRA) summed over adapted layers: the count the formula promises."""
    return sum(m.r * (m.in_features + m.out_features) + (m.out_features if m.lora_magnitude_vector is not None else 0)
               for m in lora_modules(model).values())


def merged_weight(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + scale * B @ A, computed in fp32 (never re-quantized).

    Args:
        w0 (Tensor): d_out x d_in base weight (any float dtype).
        lora_A (Tensor): r x d_in.
        lora_B (Tensor): d_out x r.
        scale (float): alpha / r (or alpha / sqrt(r)).
    """
    return w0.float() + scale * (lora_B.float() @ lora_A.float())
