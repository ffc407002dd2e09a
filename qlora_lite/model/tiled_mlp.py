"""Sequence-tiled MLP (and RMSNorms): forward, recompute and backward over tiles of tokens.

At 64k tokens one MLP intermediate of Llama-3-8B (L x 14336 bf16) is 1.9 GB and backward
through the MLP holds several (gate and up outputs, the activation, their gradients, LoRA
dropout masks). The MLP is token-wise, so it can run over tiles of tokens: the forward pass
keeps only the MLP input, and backward recomputes one tile at a time and takes its gradients,
so what the MLP holds is bounded by a tile. This is TiledMLP of Arctic Long Sequence Training
(arXiv 2506.13996; DeepSpeed `ulysses_sp.TiledMLP`).

The RMSNorms are token-wise too and get the same treatment: transformers' RMSNorm keeps an
fp32 copy of its input for backward and its backward makes about seven fp32 temporaries of
L x d; once the MLP is tiled that is the next peak (measured with the tracker). Tiled, a norm
keeps only its bf16 input and works in fp32 one tile at a time.

Unlike DeepSpeed's, the adapter gradients are returned to autograd rather than accumulated
into `.grad` inside backward: hooks on parameters (the tracker's, DDP's) see one gradient per
step, and tiles are summed in fp32 before the one rounding to the parameter dtype. Each tile's
RNG state is kept, so LoRA dropout draws the same masks in the recompute as in the forward
pass (not the masks an untiled MLP would draw: the same distribution, other numbers).
"""

from __future__ import annotations

import math
import types

import torch

from ..errors import QloraError

AUTO = "auto"
# "auto" never makes tiles shorter than this: each tile pays fixed costs (bitsandbytes
# dequantizes every weight at every call, autograd and Python per tile). On a 2-core CPU,
# 128-token tiles ran a 256-wide MLP 2x slower than untiled, 1024-token tiles 7% slower.
MIN_AUTO_TILE = 1024


def tile_count(n_tokens: int, hidden_size: int, setting) -> int:
    """Tiles for an MLP over `n_tokens` tokens; 1 means untiled.

    Args:
        n_tokens (int): tokens in the micro-batch (batch x sequence).
        hidden_size (int): model width.
        setting (int | str): model.tiled_mlp: 0 off, N tiles, or "auto": tiles of `hidden_size`
            tokens (DeepSpeed's default, so a tile's intermediates are the size of the MLP's own
            weights), never shorter than MIN_AUTO_TILE.
    """
    if setting == AUTO:
        return max(1, math.ceil(n_tokens / max(hidden_size, MIN_AUTO_TILE)))
    return max(1, min(int(setting), n_tokens))


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class TiledFunction(torch.autograd.Function):
    """y = f(x) for a token-wise f, computed tile by tile; saves only x (and each tile's RNG state)."""

    @staticmethod
    def forward(ctx, mlp_forward, tiles: int, x: torch.Tensor, *params):
        flat = x.reshape(-1, x.shape[-1])
        ctx.mlp_forward, ctx.params, ctx.states = mlp_forward, params, []
        # Backward runs outside any autocast region; the tiles' recompute must see the forward's.
        kind = x.device.type
        ctx.autocast = dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                            enabled=torch.is_autocast_enabled(kind))
        outs = []
        with torch.no_grad():
            for part in flat.tensor_split(tiles):
                ctx.states.append(_rng_state(x.device))
                outs.append(mlp_forward(part))
        ctx.save_for_backward(x)
        ctx.tiles = tiles
        return torch.cat(outs).reshape(*x.shape[:-1], outs[0].shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        want_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(flat) if want_x else None
        sums = [None] * len(ctx.params)
        start = 0
        rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
        with rng, torch.enable_grad(), torch.autocast(**ctx.autocast):
            for part, g, state in zip(flat.tensor_split(ctx.tiles), grad_flat.tensor_split(ctx.tiles), ctx.states):
                _set_rng_state(x.device, state)
                part = part.detach().requires_grad_(want_x)
                out = ctx.mlp_forward(part)
                inputs = ([part] if want_x else []) + list(ctx.params)
                grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
                if want_x:
                    grad_x[start:start + part.shape[0]] = grads[0]
                    grads = grads[1:]
                # fp32 sums: one rounding to the parameter dtype, as the untiled matmul does.
                for i, gp in enumerate(grads):
                    if gp is not None:
                        sums[i] = gp.float() if sums[i] is None else sums[i].add_(gp)
                start += part.shape[0]
        grad_params = [None if s is None else s.to(p.dtype) for s, p in zip(sums, ctx.params)]
        return (None, None, None if grad_x is None else grad_x.reshape(x.shape), *grad_params)


def tiled_forward(module, setting, plain_forward, x: torch.Tensor) -> torch.Tensor:
    """A token-wise module's forward over tiles of tokens when training; `plain_forward` otherwise."""
    tiles = tile_count(x.shape[:-1].numel(), x.shape[-1], setting)
    params = [p for p in module.parameters() if p.requires_grad]
    if tiles == 1 or not torch.is_grad_enabled() or not (x.requires_grad or params):
        return plain_forward(x)
    return TiledFunction.apply(plain_forward, tiles, x, *params)


NORMS = ("input_layernorm", "post_attention_layernorm")


def tile_mlps(model, setting) -> int:
    """Make every decoder layer's `mlp` and RMSNorms (and the final norm) run tiled; returns
    how many modules (model.tiled_mlp).

    The modules stay where they are (state dict names and adapters unchanged): only their
    `forward` is wrapped, and adapters attached later are found at each call.

    Args:
        model: a transformers causal LM.
        setting (int | str): N tiles or "auto" (see `tile_count`).
    """
    decoder = model.get_decoder()
    mlps = [layer.mlp for layer in decoder.layers if hasattr(layer, "mlp")]
    if not mlps:
        raise QloraError("model.tiled_mlp: this model's decoder layers have no `mlp`; set model.tiled_mlp: 0.")
    norms = [getattr(layer, n) for layer in decoder.layers for n in NORMS if hasattr(layer, n)]
    modules = mlps + norms + ([decoder.norm] if hasattr(decoder, "norm") else [])
    for m in modules:
        plain = m.forward
        m.forward = types.MethodType(lambda self, x, _plain=plain: tiled_forward(self, setting, _plain, x), m)
    return len(modules)
