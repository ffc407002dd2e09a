"""Flat parameter buffers: the adapters' parameters and gradients as views into a few flat tensors.

An optimizer over hundreds of small adapter tensors launches a few kernels per tensor, and
bitsandbytes 0.50's `Optimizer8bit.step` also calls `torch.cuda.synchronize()` after every
parameter (448 host syncs a step on a 7B with r16 on all linears). Over flat buffers the step is
a handful of kernels and syncs, gradient clipping is one norm, and a data-parallel gradient sum
one collective per buffer.

Every adapter tensor stays an `nn.Parameter` of its module (its `.data` and `.grad` are views into
the buffers), so the modules, PEFT adapter files and the memory tracker see what they saw before;
autograd adds each gradient into its view in place. The optimizer state is converted to and
from the per-parameter layout of the same optimizer over the unflattened tensors
(`FlatOptimizer.state_dict`), so checkpoints keep their format and resume either way.

The updates equal the per-tensor optimizer's element for element: AdamW is elementwise; for
bitsandbytes' 8-bit state (one absmax per 256 elements) every tensor starts at a multiple of 256
in its buffer, so no block straddles two tensors, and tensors under bitsandbytes' 8-bit minimum
(4096 elements) go to a buffer of their own with 32-bit state, as they would have per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..lora.fused import GRAD_BUFFER

OPT8_BLOCK = 256  # bitsandbytes' blockwise 8-bit state: one absmax per 256 elements
OPT8_MIN_SIZE = 4096  # bitsandbytes keeps tensors smaller than this in 32-bit state
BLOCKWISE_KEYS = ("absmax1", "absmax2")


@dataclass
class Slot:
    """Where one parameter lives in a flat buffer."""

    param: nn.Parameter
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.param.numel()


@dataclass
class FlatBuffer:
    """One flat parameter and the parameters viewing into it.

    Args:
        param (nn.Parameter): the 1-D buffer the optimizer steps; `.grad` is its gradient buffer.
        slots (list[Slot]): the parameters in it, in order.
        fp32_state (bool): bitsandbytes 8-bit optimizers keep 32-bit state for it (small tensors).
    """

    param: nn.Parameter
    slots: list[Slot]
    fp32_state: bool = False


def slot_numel(numel: int, eight_bit: bool) -> int:
    """Elements a tensor of `numel` takes in a flat buffer: whole 256-element blocks in an 8-bit one."""
    return -(-numel // OPT8_BLOCK) * OPT8_BLOCK if eight_bit else numel


def fp32_state(numel: int, eight_bit: bool) -> bool:
    """Whether a tensor goes to the 32-bit-state buffer: under bitsandbytes' 8-bit minimum."""
    return eight_bit and numel < OPT8_MIN_SIZE


def buffer_numels(numels: list[int], eight_bit: bool) -> dict[bool, int]:
    """{fp32 state?: elements} of the buffers `flatten` makes for tensors of `numels` (one dtype
    and device): what the estimate counts."""
    out: dict[bool, int] = {}
    for n in numels:
        small = fp32_state(n, eight_bit)
        out[small] = out.get(small, 0) + slot_numel(n, eight_bit and not small)
    return out


def flatten(params: list[nn.Parameter], eight_bit: bool) -> list[FlatBuffer]:
    """Move `params` into flat buffers (one per dtype and device; with `eight_bit`, small tensors
    apart) and make each parameter's data and gradient views into them.

    Args:
        params (list[nn.Parameter]): the trainable tensors, as the optimizer would get them.
        eight_bit (bool): lay out for bitsandbytes' 8-bit blockwise state (see the module docstring).
    """
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device, fp32_state(p.numel(), eight_bit)), []).append(p)
    buffers = []
    for (dtype, device, small), members in groups.items():
        aligned = eight_bit and not small
        slots, n = [], 0
        for p in members:
            slots.append(Slot(p, n))
            n += slot_numel(p.numel(), aligned)
        data = torch.zeros(n, dtype=dtype, device=device)
        grad = torch.zeros_like(data)
        for s in slots:
            data[s.start:s.stop].copy_(s.param.detach().reshape(-1))
            s.param.data = data[s.start:s.stop].view(s.param.shape)
            s.param.grad = grad[s.start:s.stop].view(s.param.shape)
            setattr(s.param, GRAD_BUFFER, True)  # the fused LoRA backward adds into it in place
        flat = nn.Parameter(data)
        flat.grad = grad
        buffers.append(FlatBuffer(flat, slots, fp32_state=small))
    return buffers


class FlatOptimizer:
    """Mixin for an optimizer class stepping `FlatBuffer`s: 32-bit state where a buffer asks for
    it, and state dicts in the layout of the same optimizer over the unflattened parameters."""

    flat: list[FlatBuffer]
    order: list[nn.Parameter]  # the parameters as the caller gave them: the state dict's order
    unflat_class: type

    def get_config(self, gindex, pindex, group):  # bitsandbytes' per-parameter configuration
        config = super().get_config(gindex, pindex, group)
        if self.flat[pindex].fp32_state:
            config["optim_bits"] = 32
        return config

    def step(self, closure=None):
        for b in self.flat:
            reattach(b)
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers in place: the parameters' gradients are views into them."""
        for b in self.flat:
            b.param.grad.zero_()

    def _shadow(self):
        group = self.param_groups[0]
        shadow = self.unflat_class(self.order, lr=group["lr"], weight_decay=group["weight_decay"])
        shadow.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        return shadow

    def state_dict(self) -> dict:
        """The state the same optimizer over the unflattened parameters would hold (copies)."""
        shadow = self._shadow()
        for b in self.flat:
            state = self.state.get(b.param)
            for s in b.slots if state else ():
                shadow.state[s.param] = {k: member_value(k, v, b, s).clone() if torch.is_tensor(v) else v
                                         for k, v in state.items()}
        return shadow.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a per-parameter state dict (from `state_dict`, or written without flat buffers)."""
        shadow = self._shadow()
        shadow.load_state_dict(state_dict)
        self.param_groups[0].update({k: v for k, v in shadow.param_groups[0].items() if k != "params"})
        for pindex, b in enumerate(self.flat):
            states = [shadow.state.get(s.param) for s in b.slots]
            first = next((st for st in states if st), None)
            if first is None:
                continue
            flat_state = self._fresh_state(b, pindex, first)
            for s, st in zip(b.slots, states):
                for k, v in (st or {}).items():
                    if per_member(k, flat_state[k], b):
                        view = member_value(k, flat_state[k], b, s)
                        view.copy_(v.reshape(view.shape))
            self.state[b.param] = flat_state

    def _fresh_state(self, b: FlatBuffer, pindex: int, like: dict) -> dict:
        """State for buffer `b` with the members' shared values (step, quantization maps) and zeroed
        per-element and per-block values, allocated as the optimizer allocates it (paged where it pages)."""
        if hasattr(self, "init_state"):  # bitsandbytes
            self.state[b.param] = {}
            self.init_state(self.param_groups[0], b.param, 0, pindex)
            state = self.state[b.param]
        else:
            state = {k: torch.zeros_like(b.param) for k, v in like.items() if torch.is_tensor(v) and v.dim()}
        for k, v in like.items():  # shared values: step counters, quantization maps
            if not per_member(k, state.get(k), b):
                state[k] = v.clone() if torch.is_tensor(v) else v
        for n in (1, 2):  # 8-bit codes: the padding between members holds the code of 0.0, as a
            # fresh buffer's does after its first step (code 0 is -1.0 in the signed map)
            codes, qmap = state.get(f"state{n}"), state.get(f"qmap{n}")
            if torch.is_tensor(codes) and codes.dtype == torch.uint8 and torch.is_tensor(qmap):
                codes.fill_(int(qmap.abs().argmin()))
        return state


def reattach(b: FlatBuffer) -> None:
    """Make every member's data and gradient views into `b` again if code outside replaced them
    (`p.grad = None`, `p.data = ...`), keeping their values: a step never misses a gradient."""
    size = b.param.element_size()
    for s in b.slots:
        p, at = s.param, s.start * size  # pointer arithmetic: no tensor op unless a view was replaced
        if p.data_ptr() != b.param.data_ptr() + at:
            data = b.param.data[s.start:s.stop]
            data.copy_(p.detach().reshape(-1))
            p.data = data.view(p.shape)
        if p.grad is None or p.grad.data_ptr() != b.param.grad.data_ptr() + at:
            grad = b.param.grad[s.start:s.stop]
            grad.copy_(p.grad.reshape(-1)) if p.grad is not None else grad.zero_()
            p.grad = grad.view(p.shape)


def per_member(key: str, v, b: FlatBuffer) -> bool:
    """Whether a flat state value holds each member's own values (per element or per 8-bit block)."""
    return torch.is_tensor(v) and (v.shape == b.param.shape or key in BLOCKWISE_KEYS)


def member_value(key: str, v, b: FlatBuffer, s: Slot):
    """A member's share of a flat state value: a view of its elements or absmax blocks, or the
    value itself where it is shared (step counters, quantization maps)."""
    if not per_member(key, v, b):
        return v
    if key in BLOCKWISE_KEYS:
        return v[s.start // OPT8_BLOCK:-(-s.stop // OPT8_BLOCK)]
    return v[s.start:s.stop].view(s.param.shape)
