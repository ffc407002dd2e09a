"""LoRA linears in few ops: the fused path of `layer.LoRALinear`.

One autograd function computes, for the k linears of a module that read one input x (q/k/v and
gate/up; k = 1 for o and down):

    y_i = x @ W_i.T (+ b_i) + s * ((x * m) @ A_i.T) @ B_i.T

- W_i is dequantized through bitsandbytes' registered ops (`quant.dequantize_4bit`), with none of
  bitsandbytes' Python layers (`Linear4bit.forward`, `matmul_4bit`, `MatMul4Bit`) around it;
- one dropout mask m and one A matmul serve the k linears (their A_i stacked: k*r rows);
- the scale s (alpha/r, times dropout's 1/(1-p)) rides in each B matmul's `addmm_`, which adds
  the adapter's product to the base output in the same call;
- backward takes the A gradients of all k in one matmul, and the adapter's share of the input
  gradient in one more, added to the base's share in place (`addmm_` without dropout);
- with `keep` (gradient checkpointing on, quant.keeps_dequantized_weights), the dequantized W_i
  of the recompute serve the backward: two dequantizations of a weight a step, not three; and
  when x needs no gradient (the first layer's input), the base's input gradient is skipped.

Sharing one mask across q/k/v (and across gate/up) departs from PEFT, which draws one per adapter:
each adapter still sees dropout with probability p on its input. Without dropout the fused path
computes PEFT's function and differs from the unfused path only in where bf16 rounds (the base
output and the adapter product are summed in one matmul accumulation, not rounded apart).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..model.quant import dequantize_4bit, quant_state


@dataclass
class Plan:
    """What one call of `LoRAFunction` computes, besides its tensors.

    Args:
        bases (list[nn.Module]): the frozen linears (bnb.nn.Linear4bit or nn.Linear), in output order.
        r (int): the adapters' rank.
        scale (float): alpha/r, times 1/(1-p) when a dropout mask is applied.
        keep (bool): save the dequantized weights for backward instead of dequantizing again.
    """

    bases: list
    r: int
    scale: float
    keep: bool


def base_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a `dtype` matrix: dequantized for a 4-bit base, itself otherwise."""
    qs = quant_state(base.weight)
    if qs is None:
        return base.weight
    return dequantize_4bit(base.weight, qs, dtype)


# A parameter with this attribute set has a `.grad` that lives as long as the parameter (a view
# into the optimizer's flat gradient buffer, train/flat.py) and is zeroed by the optimizer: the
# backward below adds its gradient into it with the matmul that makes it, instead of returning
# it for autograd to add.
GRAD_BUFFER = "grad_is_buffer"


def _accumulates(p: torch.Tensor) -> bool:
    return getattr(p, GRAD_BUFFER, False) and p.grad is not None


class LoRAFunction(torch.autograd.Function):
    """y_i = x @ W_i.T + b_i + s * ((x * m) @ A_i.T) @ B_i.T for the k linears of `plan`."""

    @staticmethod
    def forward(ctx, x, mask, plan: Plan, *adapters):
        k, r = len(plan.bases), plan.r
        a, b = adapters[:k], adapters[k:]
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if mask is None else x2 * mask.reshape(x2.shape)
        a_all = a[0] if k == 1 else torch.cat(a)  # [k*r, d_in]
        h = torch.mm(xd, a_all.t())  # [N, k*r]
        outputs, weights = [], []
        for i, base in enumerate(plan.bases):
            w = base_weight(base, x.dtype)
            y = torch.mm(x2, w.t()) if base.bias is None else torch.addmm(base.bias.to(x.dtype), x2, w.t())
            y.addmm_(h[:, i * r:(i + 1) * r], b[i].t(), alpha=plan.scale)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            weights.append(w if plan.keep or quant_state(base.weight) is None else None)
        ctx.plan, ctx.x_shape, ctx.masked, ctx.adapters = plan, x.shape, mask is not None, adapters
        ctx.kept = [w is not None for w in weights]
        masks = [mask.reshape(x2.shape)] if mask is not None else []
        ctx.save_for_backward(xd, h, a_all, *masks, *(w for w in weights if w is not None))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        plan, k, r, s = ctx.plan, len(ctx.plan.bases), ctx.plan.r, ctx.plan.scale
        a, b = ctx.adapters[:k], ctx.adapters[k:]
        xd, h, a_all, *rest = ctx.saved_tensors
        mask = rest.pop(0) if ctx.masked else None
        kept = iter(rest)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[3 + k]
        n = xd.shape[0]
        gx, grad_a, grad_b = None, [None] * k, [None] * k
        # d loss / d h without the scale s, transposed (each adapter's rows contiguous); s rides in
        # the matmuls and adds below (alpha=, value=) instead of a pass of its own.
        gh_t = h.new_empty(k * r, n)
        for i, (base, g) in enumerate(zip(plan.bases, grads)):
            w = next(kept) if ctx.kept[i] else None
            if g is None:  # an output the model did not use
                gh_t[i * r:(i + 1) * r].zero_()
                continue
            g2 = g.reshape(n, -1)
            if need_x:
                w = w if w is not None else base_weight(base, g2.dtype)
                gx = torch.mm(g2, w) if gx is None else gx.addmm_(g2, w)
            if need_b:
                grad_b[i] = _weight_grad(b[i], g2.t(), h[:, i * r:(i + 1) * r], s)
            torch.mm(b[i].t(), g2.t(), out=gh_t[i * r:(i + 1) * r])
        if need_a:
            if all(_accumulates(p) for p in a):
                grad_a = [_weight_grad(p, gh_t[i * r:(i + 1) * r], xd, s) for i, p in enumerate(a)]
            else:
                g_all = torch.mm(gh_t, xd).mul_(s)
                grad_a = [g_all[i * r:(i + 1) * r] for i in range(k)]
        if need_x:
            gx = _add_input_grad(gx, gh_t.t(), a_all, mask, s)
            gx = gx.view(ctx.x_shape)
        return (gx, None, None, *grad_a, *grad_b)


def _weight_grad(p: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float):
    """scale * left @ right, the gradient of adapter weight p: added into p's gradient buffer
    (returning None to autograd) where it has one, else returned."""
    if _accumulates(p):
        p.grad.addmm_(left, right, alpha=scale)
        return None
    return torch.mm(left, right).mul_(scale)


def _add_input_grad(gx, gh: torch.Tensor, a_all: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """gx + scale * (gh @ a_all) * mask, the adapters' share of the input gradient added to the
    base's (gx None when the base's was not taken), in as few passes as the dtypes allow."""
    if mask is None:
        return torch.mm(gh, a_all).mul_(scale) if gx is None else gx.addmm_(gh, a_all, alpha=scale)
    lora = torch.mm(gh, a_all)
    if gx is None:
        return lora.mul_(mask).mul_(scale)
    if mask.dtype == lora.dtype:  # CPU masks are 0/1 in the compute dtype: one fused pass
        return gx.addcmul_(lora, mask, value=scale)
    return gx.add_(lora.mul_(mask), alpha=scale)  # a GPU's bool mask


def lora_forward(modules: list, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The outputs of the LoRALinears `modules` (one adapter rank and scale) on their shared input x.

    Args:
        modules (list[LoRALinear]): linears that read x, in the order their outputs are returned.
        x (Tensor): (..., d_in), in the adapters' dtype.
        mask (Tensor | None): dropout's keep mask, shaped like x (bool, or 0/1 in x's dtype);
            None without dropout.
    """
    first = modules[0]
    scale = first.scale / (1.0 - first.dropout.p) if mask is not None else first.scale
    plan = Plan([m.base for m in modules], first.r, scale, first.keep_dequantized)
    return LoRAFunction.apply(x, mask, plan, *(m.lora_A.weight for m in modules),
                              *(m.lora_B.weight for m in modules))


class SharedInput:
    """The LoRA linears of one module that read the same input (q/k/v, gate/up).

    The first of them called with an input computes all of their outputs in one `lora_forward`;
    the others, called next with that same tensor, take theirs. A call with any other tensor
    starts over for that tensor, so each member always gets its output for its own input, whatever
    order or inputs a model uses. The input is held weakly, the outputs only until they are taken.
    """

    def __init__(self, members: list):
        self.members = members
        self._input = None  # weakref to the input of the outputs waiting in _pending
        self._pending: dict[int, torch.Tensor] = {}

    def __call__(self, member, x: torch.Tensor, mask_fn) -> torch.Tensor:
        if self._input is not None and self._input() is x and id(member) in self._pending:
            out = self._pending.pop(id(member))
            if not self._pending:
                self._input = None
            return out
        outs = lora_forward(self.members, x, mask_fn(x))
        self._pending = {id(m): o for m, o in zip(self.members, outs) if m is not member}
        self._input = weakref.ref(x) if self._pending else None
        return outs[self.members.index(member)]


# Linears that transformers' decoders call on one input, by their last name (Llama, Mistral,
# Qwen2, Gemma, ...).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_shared_inputs(lora_modules: dict) -> int:
    """Give each set of LoRA linears that read one input (SHARED_INPUTS, same parent module, same
    rank, scale and dropout) a `SharedInput`; returns how many groups were made."""
    by_parent: dict[tuple[str, int], list] = {}
    for name, m in lora_modules.items():
        parent, _, leaf = name.rpartition(".")
        for g, names in enumerate(SHARED_INPUTS):
            if leaf in names:
                by_parent.setdefault((parent, g), []).append((names.index(leaf), m))
    groups = 0
    for members in by_parent.values():
        mods = [m for _, m in sorted(members, key=lambda t: t[0])]
        same = {(m.r, m.scale, getattr(m.dropout, "p", 0.0), m.in_features) for m in mods}
        if len(mods) > 1 and len(same) == 1:
            group = SharedInput(mods)
            for m in mods:
                m.shared_input = group
            groups += 1
    return groups
