"""One optimizer step: micro-batches forward and backward, clip, optimizer step.

`run` (loop.fit), `profile` (memory/measure.py, measure_mode) and bench/measure_7b.py all call
`train_step`, so what the profile measures is what training executes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.dataset import IGNORE_INDEX
from ..errors import QloraError
from ..ops.attention import BOUNDS_KWARG, sample_bounds
from ..ops.loss import LABEL_POSITIONS, causal_lm_loss, label_positions


class NonFiniteLoss(QloraError):
    """The loss became NaN or inf; the optimizer step was not taken."""


@dataclass
class StepResult:
    """What one optimizer step reports.

    Args:
        loss (float): mean loss per trained token over the whole step.
        trained (int): trained tokens of the step (the loss's normaliser).
        grad_norm (float): gradient norm before clipping.
    """

    loss: float
    trained: int
    grad_norm: float


def _no_phase(name: str) -> None:
    """Default phase hook: nothing is measured."""


def autocast_context(device: str, compute_dtype: str):
    """bf16/fp16 autocast on CUDA. On CPU the base and adapters are already in the compute
    dtype, so autocast would only add casts."""
    if device.startswith("cuda") and compute_dtype != "float32":
        dtype = torch.bfloat16 if compute_dtype == "bfloat16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def count_trained(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the one-token shift (read on the host batch: no sync)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
               normalizer: int | None = None, sync: Callable | None = None,
               phase: Callable[[str], None] = _no_phase) -> StepResult:
    """Forward and backward every micro-batch, then clip and step the optimizer.

    The loss is normalised by the trained tokens of the whole step, not per micro-batch, so
    gradient accumulation weighs every trained token the same. A NaN/inf loss raises
    NonFiniteLoss before the optimizer touches the weights.

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
        normalizer (int | None): trained tokens the loss is divided by. Default: those of
            `batches` (a data-parallel run passes the count of the global step).
        sync (callable | None): called with the step's local loss sum after the backward
            passes; sums gradients and loss over data-parallel ranks and returns the global
            loss sum (distributed.step_sync). Default None (one process).
        phase (callable): called with "forward", "backward", "optimizer" as the step
            proceeds (the memory tracker's phases). Default: nothing.
    """
    autocast = autocast or contextlib.nullcontext()
    trained = sum(count_trained(b["labels"]) for b in batches)
    denom = max(normalizer if normalizer is not None else trained, 1)
    step_loss = torch.zeros((), device=device)
    inputs = [to_device(b, device) for b in batches]  # host reads and copies, all before the forwards
    for batch in inputs:
        phase("forward")
        with autocast:
            loss_sum, _ = causal_lm_loss(model, batch, loss_chunk_size)
        phase("backward")
        scaled = loss_sum / denom
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss_sum.detach()
        del loss_sum, scaled
    phase("optimizer")
    if sync is not None:
        step_loss = sync(step_loss)  # NaN on any rank is NaN on every rank: all stop alike
        trained = denom
    if scaler is not None:
        scaler.unscale_(optimizer)
    loss, grad_norm = read_step(step_loss, clip_grad_norm(params, max_grad_norm), trained)
    if not math.isfinite(loss):  # before the optimizer touches the weights
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {loss}")
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, trained=trained, grad_norm=grad_norm)


def read_step(loss_sum: torch.Tensor, norm: torch.Tensor, trained: int) -> tuple[float, float]:
    """The one host sync of a step: (mean loss per trained token, gradient norm), read together."""
    loss_sum, grad_norm = torch.stack([loss_sum.float(), norm.float().to(loss_sum.device)]).tolist()
    return loss_sum / max(trained, 1), grad_norm


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
