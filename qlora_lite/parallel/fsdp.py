"""FSDP-QLoRA: the 4-bit base and the adapters sharded across ranks with torch's FSDP2
(`fully_shard`), so each rank holds ~1/world of the weights between uses.

bitsandbytes keeps an NF4 weight as packed uint8 bytes (a parameter) plus a `quant_state`
(absmax, code, shape: not a parameter). FSDP2 shards the packed bytes like any tensor and
all-gathers them per decoder layer for its forward and backward; mixed dtypes in one layer
(uint8 packed bytes, bf16 norms and adapters) travel as bytes. What FSDP2 cannot keep is the
`quant_state` attached to the parameter object (its unsharded parameter is a plain tensor),
and bitsandbytes' forward would then re-wrap `module.weight` behind FSDP's back. So each 4-bit
layer keeps a reference to its quant_state and calls `bnb.matmul_4bit` itself: the same call
`Linear4bit.forward` makes. The quant_state tensors are small (absmax: one byte per 64 weights
with double quantization) and stay replicated.

Gradients: the loss is already divided by the global step's trained tokens, so FSDP must sum
the adapters' gradients over ranks, not average them (divide factor 1, sum-only comms).
Optimizers: torch's AdamW runs on the sharded (DTensor) adapters; bitsandbytes' 8-bit and
paged optimizers do not take DTensors, and the optimizer state is sharded anyway.
"""

from __future__ import annotations

import types

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import QloraError
from ..lora.layer import lora_modules
from .distributed import World


def sharded_4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward for a weight FSDP gathered into a plain tensor: the same matmul with
    the quant_state kept aside (bitsandbytes.nn.Linear4bit.forward, CPU packing off)."""
    import bitsandbytes as bnb

    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return bnb.matmul_4bit(x, self.weight.t(), bias=bias, quant_state=self.sharded_quant_state).to(inp_dtype)


def keep_quant_states(model) -> int:
    """Give every 4-bit layer the forward above; returns how many it found."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.sharded_quant_state = m.weight.quant_state
            m.forward = types.MethodType(sharded_4bit_forward, m)
            n += 1
    return n


def shard_model(model, world: World) -> None:
    """fully_shard each decoder layer, then the decoder (embeddings, final norm), on a 1-D mesh
    of all ranks; gradients summed, not averaged.

    The output head is sharded in one unit with the final norm: the chunked loss (loss.py)
    multiplies by the head's weight directly instead of calling the module, so the head is
    gathered by the norm's forward and kept gathered until the norm's backward, which
    brackets every use the loss makes of it. A head tied to the embeddings stays whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep_quant_states(model)
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (world.size,))  # explicit: on CPU it must not pick CUDA
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise QloraError(f"train.distributed: fsdp needs a decoder with `.layers`; {type(model).__name__} has none.")
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    units = [fully_shard(layer, mesh=mesh) for layer in layers]
    tied = head.weight is model.get_input_embeddings().weight
    if not tied and isinstance(getattr(decoder, "norm", None), torch.nn.Module):
        fully_shard([decoder.norm, head], mesh=mesh, reshard_after_forward=False)
        units.append(decoder.norm)  # the unit's handle (a list of modules returns the list)
    units.append(fully_shard(decoder, mesh=mesh, ignored_params={head.weight} if tied else None))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state gathered to full CPU tensors, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded(model, optimizer, adapter: dict[str, dict[str, torch.Tensor]], optimizer_state: dict) -> None:
    """Give each rank its shard of a checkpoint's full adapter and optimizer state (written by
    any world size; runs.checkpoint reads the files).

    Args:
        model: the sharded LoRA model.
        optimizer: torch AdamW over its DTensor adapters.
        adapter (dict): {module path: {"lora_A": A, "lora_B": B}}, whole tensors.
        optimizer_state (dict): the full optimizer state keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for key, p in (("lora_A", m.lora_A.weight), ("lora_B", m.lora_B.weight)):
                load_shard(p, adapter[name][key])
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def load_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `param` (a DTensor shard or a plain tensor)."""
    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        part = distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)
