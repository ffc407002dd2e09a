"""Optimizers (bitsandbytes' paged and 8-bit AdamW, torch AdamW) and LR schedules."""

from __future__ import annotations

import math
import warnings

import torch

# On CPU bitsandbytes keeps paged state in ordinary memory and warns on every parameter; the
# recipe stays portable (the same paged optimizer pages on CUDA), so the warning is noise here.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Args: name (str): paged_adamw_8bit | paged_adamw_32bit | adamw_8bit | adamw."""
    import bitsandbytes as bnb

    classes = {
        # Paged state lives in CUDA unified memory and is evicted to the host under memory
        # pressure instead of failing; on CPU bitsandbytes falls back to ordinary buffers.
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw": torch.optim.AdamW,
    }
    return classes[name](params, lr=lr, weight_decay=weight_decay)


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


def restore_paged_state(optimizer) -> None:
    """Put a loaded bitsandbytes paged optimizer's state back into paged (unified) memory.

    `load_state_dict` gives ordinary tensors, which bitsandbytes then moves onto the GPU as
    they are: a resumed run would hold its optimizer state in device memory after all. On CUDA
    each state buffer that bitsandbytes would page (>= 1e5 elements) is copied into a paged
    buffer; elsewhere (CPU, small tensors, non-paged optimizers) nothing changes.
    """
    if not getattr(optimizer, "is_paged", False):
        return
    import bitsandbytes.functional as F

    for p, state in optimizer.state.items():
        if p.device.type != "cuda" or p.numel() < PAGED_MIN_NUMEL:
            continue
        for key in ("state1", "state2"):
            v = state.get(key)
            if torch.is_tensor(v) and not getattr(v, "is_paged", False):
                buf = F.get_paged(*v.shape, dtype=v.dtype, device=p.device)
                buf.copy_(v.to(p.device))
                optimizer.page_mng.paged_tensors.append(buf)
                state[key] = buf


# bitsandbytes pages the state of parameters with at least this many elements (get_state_buffer).
PAGED_MIN_NUMEL = 100_000
