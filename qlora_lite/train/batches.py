"""The micro-batches a run trains on: the same plan from any data position, so a resumed run
sees exactly the batches an uninterrupted one would have seen."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from ..data.batching import collate, plan_batches
from ..data.dataset import IGNORE_INDEX
from ..recipe import Recipe


class MicroBatch(NamedTuple):
    epoch: int
    index: int  # position in the epoch's batch plan
    tokens: int  # tokens in the batch, padding excluded
    trained: int  # tokens that carry a loss (step.count_trained of the collated batch)
    batch: dict | None  # collated host tensors; None when another rank trains it


def mask_dtype(model) -> torch.dtype:
    """The dtype of 4D additive masks: that of the model's floating-point weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def plan_epoch(samples, cfg: Recipe, epoch: int, shuffle: bool = True):
    return plan_batches(samples, cfg.train.micro_batch_size, cfg.train.seed, epoch, packing=cfg.data.packing,
                        group_by_length=cfg.data.group_by_length, max_seq_len=cfg.data.max_seq_len,
                        shuffle=shuffle)


def micro_batches(samples, cfg: Recipe, epoch: int, start: int, pad_id: int,
                  dtype: torch.dtype, keep=None) -> Iterator[MicroBatch]:
    """Micro-batches forever, from data position (epoch, start): the same plan as an
    uninterrupted run, so a resumed run sees exactly the batches it would have seen.

    `keep(n)` says whether the n-th micro-batch from `start` is this rank's; the others are
    counted but not collated (batch None). Default: all are."""
    # Packed rows need no [L, L] mask: the packed attention splits them where positions restart.
    packed_mask = "position_ids" if cfg.data.packing else "4d"
    # Packed rows are all max_seq_len wide: one shape for every step. Rows of 505-512 tokens
    # made each step's matmuls a new shape, and on CPU torch's oneDNN caches a primitive per
    # shape (+24 MB RSS a step on SmolLM2-135M, docs/performance.md, "Host memory").
    width = cfg.data.max_seq_len if cfg.data.packing else 0
    n = 0
    while True:
        plan = plan_epoch(samples, cfg, epoch)
        for index in range(start, len(plan)):
            rows = [[samples[i] for i in row] for row in plan[index]]
            tokens = sum(len(s["input_ids"]) for row in rows for s in row)  # padding excluded
            # After the one-token shift a sample trains on its labels[1:]; packing masks the
            # first token of every later sample in a row, so the sum is the same either way.
            trained = sum(sum(1 for y in s["labels"][1:] if y != IGNORE_INDEX) for row in rows for s in row)
            mine = keep is None or keep(n)
            batch = collate(rows, pad_id, mask_dtype=dtype, packed_mask=packed_mask, width=width) if mine else None
            yield MicroBatch(epoch, index, tokens, trained, batch)
            n += 1
        epoch, start = epoch + 1, 0
