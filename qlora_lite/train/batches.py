"""The micro-batches a run trains on: the same plan from any data position, so a resumed run
sees exactly the batches an uninterrupted one would have seen."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from ..data.batching import collate, collate_pairs, plan_batches, sample_length
from ..recipe import Recipe
from .objectives import SFT


class MicroBatch(NamedTuple):
    epoch: int
    index: int  # position in the epoch's batch plan
    tokens: int  # tokens in the batch, padding excluded
    units: dict  # what the loss divides by (objectives.py): {"tokens": trained tokens, ...}
    batch: dict | None  # collated host tensors; None when another rank trains it

    @property
    def trained(self) -> int:
        """Tokens that carry a loss."""
        return self.units["tokens"]


def mask_dtype(model) -> torch.dtype:
    """The dtype of 4D additive masks: that of the model's floating-point weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def row_capacity(cfg: Recipe, objective=None) -> int:
    """Tokens in a packed row: data.max_seq_len, twice that for preference pairs (a pair's chosen
    and rejected share a row, so a packed micro-batch holds what an unpacked one of pairs does)."""
    return cfg.data.max_seq_len * (2 if objective is not None and objective.pairs else 1)


def plan_epoch(samples, cfg: Recipe, epoch: int, shuffle: bool = True, objective=None):
    return plan_batches(samples, cfg.train.micro_batch_size, cfg.train.seed, epoch, packing=cfg.data.packing,
                        group_by_length=cfg.data.group_by_length, max_seq_len=row_capacity(cfg, objective),
                        shuffle=shuffle)


def micro_batches(samples, cfg: Recipe, epoch: int, start: int, pad_id: int,
                  dtype: torch.dtype, keep=None, objective=None) -> Iterator[MicroBatch]:
    """Micro-batches forever, from data position (epoch, start): the same plan as an
    uninterrupted run, so a resumed run sees exactly the batches it would have seen.

    `keep(n)` says whether the n-th micro-batch from `start` is this rank's; the others are
    counted but not collated (batch None). Default: all are. `objective` (objectives.py,
    default SFT) says whether samples are preference pairs and what the units are."""
    objective = objective or SFT()
    # Packed rows need no [L, L] mask: the packed attention splits them where positions restart.
    packed_mask = "position_ids" if cfg.data.packing else "4d"
    # Packed rows are all max_seq_len wide (a pair's: twice that): one shape for every step. Rows of
    # 505-512 tokens made each step's matmuls a new shape, and on CPU torch's oneDNN caches a
    # primitive per shape (+24 MB RSS a step on SmolLM2-135M, docs/performance.md, "Host memory").
    width = row_capacity(cfg, objective) if cfg.data.packing else 0
    n = 0
    while True:
        plan = plan_epoch(samples, cfg, epoch, objective=objective)
        for index in range(start, len(plan)):
            rows = [[samples[i] for i in row] for row in plan[index]]
            tokens = sum(sample_length(s, packing=True) for row in rows for s in row)  # padding excluded
            mine = keep is None or keep(n)
            batch = None
            if mine and objective.pairs:
                batch = collate_pairs(rows, pad_id, packed=cfg.data.packing, packed_mask=packed_mask, mask_dtype=dtype,
                                      width=width, nll_on_prompt=getattr(objective, "nll_on_prompt", False))
            elif mine:
                batch = collate(rows, pad_id, mask_dtype=dtype, packed_mask=packed_mask, width=width)
            yield MicroBatch(epoch, index, tokens, objective.units(rows), batch)
            n += 1
        epoch, start = epoch + 1, 0
