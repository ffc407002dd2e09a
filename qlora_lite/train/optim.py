"""Optimizers (bitsandbytes' paged and 8-bit AdamW, torch AdamW) and LR schedules."""

from __future__ import annotations

import functools
import math
import warnings

import torch

from ..utils import env
from .flat import FlatOptimizer, flatten

# On CPU bitsandbytes keeps paged state in ordinary memory and warns on every parameter; the
# recipe stays portable (the same paged optimizer pages on CUDA), so the warning is noise here.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def optimizer_classes() -> dict:
    """The class of each train.optimizer name (recipe.OPTIMIZERS)."""
    import bitsandbytes as bnb

    return {
        # Paged state lives in CUDA unified memory and is evicted to the host under memory
        # pressure instead of failing; on CPU bitsandbytes falls back to ordinary buffers.
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw": torch.optim.AdamW,
    }


def build_optimizer(name: str, params, lr: float, weight_decay: float,
                    full_precision: bool = False) -> torch.optim.Optimizer:
    """The optimizer of train.optimizer over `params`, stepping them as flat buffers (flat.py)
    unless they are FSDP shards or QLORA_LITE_FLAT=0.

    Args:
        name (str): paged_adamw_8bit | paged_adamw_32bit | adamw_8bit | adamw.
        params (list[Tensor]): the trainable parameters. Flattening makes their data and
            gradients views into the optimizer's buffers (`optimizer_params`).
        lr (float): peak learning rate. weight_decay (float): AdamW's.
        full_precision (bool): fp32 Adam state whatever the name, paged when the name is, on
            the tensors as they are: the full fine-tune that profile compares against. Default False.
    """
    import bitsandbytes as bnb

    if full_precision:
        cls = bnb.optim.PagedAdamW32bit if name.startswith("paged") else bnb.optim.AdamW32bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    cls, params = optimizer_classes()[name], list(params)
    if not env.enabled(env.FLAT) or any(hasattr(p, "device_mesh") for p in params):  # FSDP's DTensor shards
        return cls(params, lr=lr, weight_decay=weight_decay)
    buffers = flatten(params, eight_bit=name.endswith("8bit"))
    optimizer = flat_class(cls)([b.param for b in buffers], lr=lr, weight_decay=weight_decay)
    optimizer.flat, optimizer.order, optimizer.unflat_class = buffers, params, cls
    return optimizer


@functools.lru_cache(maxsize=None)
def flat_class(cls: type) -> type:
    """`cls` with FlatOptimizer's state layout and 32-bit buffers (one class per optimizer class)."""
    return type(f"Flat{cls.__name__}", (FlatOptimizer, cls), {})


def optimizer_params(optimizer) -> list[torch.Tensor]:
    """The tensors the optimizer steps (a flat optimizer's buffers): what clipping and a
    data-parallel gradient sum go over."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr at a step: linear warmup, then cosine/linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total))


def apply_schedule(scheduler) -> None:
    """Set each param group's lr to the schedule's value at the scheduler's current step.

    A loaded checkpoint brings back the lr its run computed for the next step. A resume that
    changes the length (train.max_steps, train.epochs) changes the cosine or linear curve, and
    the first step after it would still take the old curve's lr. This is LambdaLR's own formula,
    so an unchanged schedule gets back exactly the saved lr.
    """
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
