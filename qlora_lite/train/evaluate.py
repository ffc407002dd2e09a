"""The eval pass: token-weighted mean loss over the held-out samples."""

from __future__ import annotations

import torch

from ..data.batching import collate, plan_batches
from ..ops.loss import causal_lm_loss
from .step import to_device


@torch.no_grad()
def eval_loss(model, samples, batch_size, pad_id, chunk, device, autocast, max_batches=None) -> float:
    """Token-weighted mean loss over the eval samples, in a fixed order."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    plan = plan_batches(samples, batch_size, 0, 0, shuffle=False)
    for rows in plan[:max_batches]:
        batch = collate([[samples[i] for i in r] for r in rows], pad_id)
        with autocast:
            s, n = causal_lm_loss(model, to_device(batch, device), chunk)
        total, count = total + s.double(), count + n
    return float(total) / max(count, 1)  # one host sync for the whole eval
