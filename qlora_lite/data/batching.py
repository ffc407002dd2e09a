"""Batches for the training loop: a deterministic plan per epoch, then padding or packing.

    plan = plan_batches(samples, micro_batch_size, seed, epoch, packing=False,
                        group_by_length=True, max_seq_len=512)
        -> list of batches; a batch is a list of rows; a row is a list of sample indices
           (one index per row unless packing). The same arguments give the same plan, so a
           resumed run skips to its data position with plan[done_batches:].
    batch = collate([[samples[i] for i in row] for row in plan[k]], pad_id)
        -> {"input_ids", "labels", "position_ids", "attention_mask"} torch tensors, padded to
           the longest row of the batch (never to max_seq_len).
    batch = collate_pairs([[pairs[i] for i in row] for row in plan[k]], pad_id, packed)
        -> the same for preference pairs (data/preference.py), plus which sequence each
           labelled token belongs to (`collate_pairs`).

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
    lengths = [sample_length(s, packing) for s in samples]
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


def sample_length(sample: dict, packing: bool = False) -> int:
    """Tokens a sample takes in a row: an SFT sample's own length; a preference pair's chosen plus
    rejected when packed (they share a row), else the longer of the two (each has its own row)."""
    if "input_ids" in sample:
        return len(sample["input_ids"])
    c, r = len(sample["chosen"]["input_ids"]), len(sample["rejected"]["input_ids"])
    return c + r if packing else max(c, r)


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


# What `collate_pairs` adds to a batch: for every labelled token (in `label_positions` order) the
# sequence it belongs to (chosen of the k-th pair: k, its rejected: pairs + k) and whether it is a
# completion token (not one of the chosen prompt's tokens that ORPO's NLL on the whole sequence adds).
TARGET_SEQUENCE, TARGET_COMPLETION, PAIRS, REFERENCE_LOGPS = "target_sequence", "target_completion", "pairs", "reference_logps"


def collate_pairs(rows: Sequence[Sequence[dict]], pad_id: int, packed: bool = False, packed_mask: str = "4d",
                  mask_dtype: torch.dtype = torch.float32, width: int = 0, nll_on_prompt: bool = False) -> dict:
    """A batch of preference pairs: unpacked, rows [chosen_0 .. chosen_P-1, rejected_0 .. rejected_P-1]
    (TRL's order); packed, each row holds its pairs' chosen and rejected as separate samples.

    Args:
        rows (Sequence[Sequence[dict]]): per plan row, its pairs ({"chosen": sample, "rejected": sample}).
            Unpacked rows hold one pair each.
        pad_id (int): token id for padding.
        packed (bool): pack each row's pairs into one row. Default False.
        packed_mask, mask_dtype, width: as `collate`.
        nll_on_prompt (bool): also label the chosen sequences' prompt tokens (ORPO's NLL with
            data.train_on: all, as TRL computes it); they are marked as no completion token.
            Default False.

    Returns: `collate`'s tensors, plus TARGET_SEQUENCE [n] (int64), TARGET_COMPLETION [n] (bool),
        PAIRS (int) and, when every pair carries precomputed reference log-probs ("reference":
        [chosen, rejected]), REFERENCE_LOGPS [2 * pairs] (fp32, chosen first).
    """
    pairs = [p for row in rows for p in row]
    n = len(pairs)

    def chosen(p):
        s = p["chosen"]
        if not nll_on_prompt:
            return s
        return {"input_ids": s["input_ids"], "labels": [IGNORE_INDEX] + list(s["input_ids"][1:])}

    if packed:
        seq_rows = [[s for p in row for s in (chosen(p), p["rejected"])] for row in rows]
        order = [[(k, n + k)[j] for k in ks for j in (0, 1)] for ks in _ranges([len(row) for row in rows])]
    else:
        seq_rows = [[chosen(p)] for p in pairs] + [[p["rejected"]] for p in pairs]
        order = [[i] for i in range(2 * n)]
    batch = collate(seq_rows, pad_id, packed_mask=packed_mask, mask_dtype=mask_dtype, width=width)
    width = batch["input_ids"].shape[1]
    sequence = torch.full((len(seq_rows), width), -1, dtype=torch.long)
    completion = torch.zeros((len(seq_rows), width), dtype=torch.bool)
    for r, (row, ids) in enumerate(zip(seq_rows, order)):
        at = 0
        for s, i in zip(row, ids):
            k = len(s["input_ids"])
            sequence[r, at:at + k] = i
            original = pairs[i % n]["chosen" if i < n else "rejected"]["labels"]
            completion[r, at:at + k] = torch.tensor(original) != IGNORE_INDEX
            at += k
    labelled = batch["labels"][:, 1:] != IGNORE_INDEX
    batch[TARGET_SEQUENCE] = sequence[:, 1:][labelled]
    batch[TARGET_COMPLETION] = completion[:, 1:][labelled]
    batch[PAIRS] = n
    if n and all("reference" in p for p in pairs):
        batch[REFERENCE_LOGPS] = torch.tensor([p["reference"][0] for p in pairs] + [p["reference"][1] for p in pairs],
                                              dtype=torch.float32)
    return batch


def _ranges(sizes: list[int]) -> list[range]:
    """Consecutive index ranges of the given sizes: [2, 1] -> [range(0, 2), range(2, 3)]."""
    out, at = [], 0
    for k in sizes:
        out.append(range(at, at + k))
        at += k
    return out


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
