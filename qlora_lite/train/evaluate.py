"""The eval pass: the objective's loss and statistics over the held-out samples, in a fixed order."""

from __future__ import annotations

import torch

from ..data.batching import collate, collate_pairs, plan_batches
from .objectives import SFT, detached_sums, step_metrics
from .step import to_device


@torch.no_grad()
def evaluate(model, samples, batch_size, pad_id, chunk, device, autocast, max_batches=None, objective=None) -> dict:
    """{"loss": ..., and the objective's statistics}: SFT's mean loss per trained token, DPO's and
    ORPO's means over the held-out pairs (TRL's names), computed as a training step would."""
    objective = objective or SFT()
    model.eval()
    sums, units = None, {}
    plan = plan_batches(samples, batch_size, 0, 0, shuffle=False)
    for rows in plan[:max_batches]:
        rows = [[samples[i] for i in r] for r in rows]
        batch = (collate_pairs(rows, pad_id, nll_on_prompt=getattr(objective, "nll_on_prompt", False))
                 if objective.pairs else collate(rows, pad_id))
        for u, n in objective.batch_units(batch).items():
            units[u] = units.get(u, 0) + n
        with autocast:
            terms, stats = objective.loss(model, to_device(batch, device), chunk)
        part = detached_sums(terms, stats).double()
        sums = part if sums is None else sums + part
    if sums is None:
        return {"loss": 0.0}
    loss, stats = step_metrics(objective, sums.tolist(), units)  # one host sync for the whole eval
    return {"loss": loss, **stats}
