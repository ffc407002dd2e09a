"""Batches for the training loop: a deterministic plan per epoch, then padding or packing.

    plan = plan_batches(samples, micro_batch_size, seed, epoch, packing=False,
                        group_by_length=True, max_seq_len=512)
        -> list of batches; a batch is a list of rows; a row is a list of sample indices
           (one index per row unless packing). The same arguments give the same plan, so a
           resumed run skips to its data position with plan[done_batches:].
    batch = collate([[samples[i] for i in row] for row in plan[k]], pad_id)
        -> {"input_ids", "labels", "position_ids", "attention_mask"} torch tensors, padded to
           the longest row of the batch (never to max_seq_len).

Unpacked batches carry a 2D padding mask. Packed rows hold several samples; position_ids
restart at 0 for each, the first token of each sample gets no loss (it would be predicted
from the previous sample), and attention stays within each sample through a 4D additive
block-diagonal causal mask [B, 1, L, L] in `mask_dtype` (the model's compute dtype, as sdpa
requires). Transformers passes a 4D mask through unchanged to eager and sdpa attention.
With packed_mask="position_ids" the mask is left out and transformers derives the same
blocks from the restarting position_ids, saving the L x L tensor (also what flash-attention
needs) -- but only when the forward makes no KV cache: pass use_cache=False (the config's
default use_cache=True builds one, and then samples silently attend across each other).
Training should pass use_cache=False anyway: a cache is wasted memory there.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from .dataset import IGNORE_INDEX

# Length grouping sorts within windows of this many batches: big enough that batches are
# nearly uniform in length, small enough that the order stays random across the epoch.
GROUP_WINDOW_BATCHES = 32


def plan_batches(
    samples: Sequence[dict],
    micro_batch_size: int,
    seed: int,
    epoch: int,
    packing: bool = False,
    group_by_length: bool = False,
    max_seq_len: int | None = None,
    shuffle: bool = True,
) -> list[list[list[int]]]:
    """The epoch's batches as lists of rows of sample indices; deterministic in (seed, epoch).

    Args:
        samples (Sequence[dict]): tokenized samples with "input_ids".
        micro_batch_size (int): rows per batch.
        seed (int): the run seed.
        epoch (int): epoch number; each epoch gets its own order.
        packing (bool): pack samples into rows of up to max_seq_len tokens. Default False.
        group_by_length (bool): batch samples of similar length (unpacked only). Default False.
        max_seq_len (int | None): row capacity when packing. Default None (longest sample).
        shuffle (bool): False keeps data order (eval). Default True.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    rng = random.Random(seed * 1_000_003 + epoch)
    if packing:
        rows = pack_rows(lengths, max_seq_len or max(lengths, default=1))
        if shuffle:
            rng.shuffle(rows)
        return _chunks(rows, micro_batch_size)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if not (shuffle and group_by_length):
        return _chunks([[i] for i in order], micro_batch_size)
    window = micro_batch_size * GROUP_WINDOW_BATCHES
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batches += _chunks([[i] for i in part], micro_batch_size)
    rng.shuffle(batches)
    # The batch holding the longest sample goes first so an out-of-memory shows at step 1.
    longest = max(range(len(batches)), key=lambda b: max(lengths[r[0]] for r in batches[b]), default=0)
    if batches:
        batches.insert(0, batches.pop(longest))
    return batches


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample lengths into rows of `capacity` tokens.

    Samples longer than `capacity` get a row of their own (dataset.py truncates them already).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted, for best fit by bisect
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def collate(
    rows: Sequence[Sequence[dict]],
    pad_id: int,
    packed_mask: str = "4d",
    mask_dtype: torch.dtype = torch.float32,
    width: int = 0,
) -> dict[str, torch.Tensor]:
    """Pad rows of samples to the batch's longest row; rows of several samples are packed.

    Args:
        rows (Sequence[Sequence[dict]]): per row, its samples ({"input_ids", "labels"}).
        pad_id (int): token id for padding (its label is -100).
        packed_mask (str): for packed batches, "4d" (block-diagonal additive mask) or
            "position_ids" (no mask; transformers infers the blocks). Default "4d".
        mask_dtype (torch.dtype): dtype of the 4D mask; match the model's compute dtype.
            Default torch.float32.
        width (int): pad to at least this many tokens (packed rows: their capacity, so every
            step has one shape). Default 0: the longest row.

    Returns: input_ids, labels, position_ids [B, L] (int64) and attention_mask: [B, L]
        (unpacked), [B, 1, L, L] (packed, "4d") or absent (packed, "position_ids").
    """
    width = max(width, max(sum(len(s["input_ids"]) for s in row) for row in rows))
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    seq_id = torch.full((b, width), -1, dtype=torch.long)  # which sample each token is; -1 = padding
    for r, row in enumerate(rows):
        at = n = 0
        for k, s in enumerate(row):
            n = len(s["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(s["input_ids"])
            labels[r, at : at + n] = torch.tensor(s["labels"])
            if k > 0:
                labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            seq_id[r, at : at + n] = k
            at += n
        # Padding continues the positions so that packed-sequence detection sees no new sample.
        position_ids[r, at:] = torch.arange(n, n + width - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if all(len(row) <= 1 for row in rows):
        batch["attention_mask"] = (seq_id >= 0).long()
    elif packed_mask == "4d":
        batch["attention_mask"] = packed_attention_mask(seq_id, mask_dtype)
    elif packed_mask != "position_ids":
        raise ValueError(f"packed_mask must be '4d' or 'position_ids', got {packed_mask!r}")
    return batch


def packed_attention_mask(seq_id: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: 0 where query and key are in the same sample and key <= query.

    Padding (seq_id -1) attends only to itself, so no softmax row is all -inf (NaN).
    """
    length = seq_id.shape[1]
    same = seq_id[:, :, None] == seq_id[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    pad_self = (seq_id < 0)[:, :, None] & torch.eye(length, dtype=torch.bool)
    allowed = (same & causal & (seq_id >= 0)[:, :, None]) | pad_self
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
