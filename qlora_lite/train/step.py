"""One optimizer step: micro-batches forward and backward, clip, optimizer step.

`run` (loop.fit), `profile` (memory/measure.py, measure_mode) and bench/measure_7b.py all call
`train_step`, so what the profile measures is what training executes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import QloraError
from ..ops.attention import BOUNDS_KWARG, sample_bounds
from ..ops.loss import LABEL_POSITIONS, label_positions
from .objectives import SFT, detached_sums, scaled_loss, step_metrics
from .stopping import StepAbandoned


class NonFiniteLoss(QloraError):
    """The loss became NaN or inf; the optimizer step was not taken."""


@dataclass
class StepResult:
    """What one optimizer step reports.

    Args:
        loss (float): the step's loss (SFT: mean per trained token; DPO/ORPO: see objectives.py).
        trained (int): trained tokens of the step (labelled completion tokens).
        grad_norm (float): gradient norm before clipping.
        units (dict): the step's counts per unit (objectives.py), over all ranks.
        stats (dict): the objective's statistics (TRL's names), means over the step. Default {}.
    """

    loss: float
    trained: int
    grad_norm: float
    units: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _no_phase(name: str) -> None:
    """Default phase hook: nothing is measured."""


def autocast_context(device: str, compute_dtype: str):
    """bf16/fp16 autocast on CUDA. On CPU the base and adapters are already in the compute
    dtype, so autocast would only add casts."""
    if device.startswith("cuda") and compute_dtype != "float32":
        dtype = torch.bfloat16 if compute_dtype == "bfloat16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict, device: str) -> dict:
    """Copy a host batch to `device`: pinned and non-blocking on CUDA so the copy overlaps compute.

    What the forward would otherwise read back from the GPU (a host sync each) is taken from the
    host batch first: the positions of the labelled tokens and the packed samples' bounds. The
    CPU takes the same path, so a CPU test sees what the forward does on CUDA.
    """
    out = dict(batch, **{LABEL_POSITIONS: label_positions(batch["labels"])})
    if "position_ids" in batch:
        out[BOUNDS_KWARG] = sample_bounds(batch["position_ids"])
    if not device.startswith("cuda"):
        return out
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}


def train_step(model, batches: list[dict], params: list[torch.Tensor], optimizer, *, device: str,
               max_grad_norm: float, loss_chunk_size: int, autocast=None, scaler=None,
               normalizer: dict | None = None, sync: Callable | None = None,
               phase: Callable[[str], None] = _no_phase, objective=None,
               stop: Callable[[], int] | None = None) -> StepResult:
    """Forward and backward every micro-batch, then clip and step the optimizer.

    Each loss term is divided by its count over the whole step (SFT: the trained tokens; DPO:
    the pairs), not per micro-batch, so gradient accumulation weighs every token or pair the
    same. A NaN/inf loss raises NonFiniteLoss before the optimizer touches the weights.

    Args:
        model: the LoRA-wrapped model, in train mode.
        batches (list[dict]): host (CPU) micro-batches: input_ids, labels, optional masks.
        params (list[Tensor]): the trainable parameters (clipped together).
        optimizer: a torch/bitsandbytes optimizer over `params`.
        device (str): where the model is.
        max_grad_norm (float): clip threshold; 0 reports the norm without clipping.
        loss_chunk_size (int): see loss.chunked_cross_entropy.
        autocast: context manager for the forward (autocast_context); Default none.
        scaler (torch.amp.GradScaler | None): fp16 loss scaling. Default None.
        normalizer (dict | None): the counts per unit the terms are divided by. Default: those
            of `batches` (a data-parallel run passes the counts of the global step).
        sync (callable | None): called with the step's local sums (a 1-D tensor) after the
            backward passes; sums gradients and them over data-parallel ranks and returns the
            global sums (distributed.step_sync). Default None (one process).
        phase (callable): called with "forward", "backward", "optimizer" as the step
            proceeds (the memory tracker's phases). Default: nothing.
        objective: what the step minimises (objectives.py). Default SFT().
        stop (callable | None): asked before each micro-batch after the first; a non-zero
            answer (a stop signal, stopping.StopFlag.poll) drops the step: gradients are zeroed,
            the optimizer is not stepped, and StepAbandoned is raised. Default None.
    """
    autocast = autocast or contextlib.nullcontext()
    objective = objective or SFT()
    units = normalizer or count_units(objective, batches)
    sums = torch.zeros(len(objective.terms) + len(objective.stats), device=device)  # terms, then stats
    inputs = [to_device(b, device) for b in batches]  # host reads and copies, all before the forwards
    for i, batch in enumerate(inputs):
        if i and stop is not None and (code := stop()):
            optimizer.zero_grad(set_to_none=True)
            raise StepAbandoned(code)
        phase("forward")
        with autocast:
            terms, stats = objective.loss(model, batch, loss_chunk_size)
        phase("backward")
        scaled = scaled_loss(objective, terms, units)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        sums += detached_sums(terms, stats)
        del terms, stats, scaled
    phase("optimizer")
    if sync is not None:
        sums = sync(sums)  # NaN on any rank is NaN on every rank: all stop alike
    return optimizer_step(sums, units, objective, params, optimizer, max_grad_norm, scaler)


def optimizer_step(sums: torch.Tensor, units: dict, objective, params, optimizer, max_grad_norm: float,
                   scaler=None) -> StepResult:
    """The end of a step, after the backward passes: clip, read the step's one host sync, refuse a
    NaN/inf loss, step the optimizer and zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    values, grad_norm = read_step(sums, clip_grad_norm(params, max_grad_norm))
    loss, stats = step_metrics(objective, values, units)
    if not math.isfinite(loss):  # before the optimizer touches the weights
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {loss}")
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, trained=units.get("tokens", 0), grad_norm=grad_norm, units=units, stats=stats)


def count_units(objective, batches: list[dict]) -> dict:
    """The counts per unit (objectives.py) of host batches, summed."""
    units: dict = {}
    for b in batches:
        for u, n in objective.batch_units(b).items():
            units[u] = units.get(u, 0) + n
    return units


def read_step(sums: torch.Tensor, norm: torch.Tensor) -> tuple[list[float], float]:
    """The one host sync of a step: the summed loss terms and statistics, and the gradient norm."""
    values = torch.cat([sums.float().reshape(-1), norm.float().reshape(1).to(sums.device)]).tolist()
    return values[:-1], values[-1]


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) and return the norm before clipping, as a 0-d tensor
    (reading it is the caller's one host sync)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in grads]))


def grad_scaler(compute_dtype: str, lora_dtype: str, device: str):
    """The GradScaler fp16 compute needs (None otherwise), after checking the precision fits the device.

    bf16 is the default compute dtype; a GPU without it (T4, V100) must say float16, and fp16
    training keeps fp32 adapters and scales the loss, as PEFT + the Trainer do: fp16 adapter
    weights and their optimizer updates would underflow.

    Args:
        compute_dtype (str): model.quantization.compute_dtype.
        lora_dtype (str): lora.dtype.
        device (str): the resolved device.
    """
    if device.startswith("cuda") and compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise QloraError(f"{torch.cuda.get_device_name()} has no bfloat16 support; set "
                         "model.quantization.compute_dtype: float16 and lora.dtype: float32 "
                         "(fp16 compute with fp32 adapters and loss scaling).")
    if compute_dtype != "float16":
        return None
    if lora_dtype != "float32":
        raise QloraError(f"model.quantization.compute_dtype: float16 needs lora.dtype: float32 (got {lora_dtype}): "
                         "fp16 training keeps the adapters in fp32 and scales the loss, as PEFT + Trainer do.")
    return torch.amp.GradScaler(device.split(":")[0])
