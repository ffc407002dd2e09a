"""Attention for packed rows at the cost of their samples, not of the row.

A packed row of n samples under one [L, L] block-diagonal mask pays for L^2 scores, most of
them masked out, and the masked kernel is the slow one. In training, `packed_sdpa` splits each
row where its position_ids restart at 0 and runs causal attention on each sample's own slice:
sum(n_i^2) work and no mask, the same result (what flash-attention's varlen kernel does on a
GPU). Right padding needs no mask either: causal attention never looks ahead, and padded
positions carry no loss.

Outside training (eval, generation with a cache or left padding) it is plain SDPA with the
mask transformers builds, so `use_packed_attention(model)` is safe to leave on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "qlora_lite_packed"
# Up to this many tokens per sample, attention on CPU is faster as matmul + softmax than
# through the SDPA kernel (measured on AVX-512 bf16, 8 heads of 64); the fp32 scores it
# holds are H * n^2 * 4 bytes, 8 MB at 512.
CPU_MATMUL_ATTENTION_MAX = 512
# The forward kwarg that carries one forward's sample bounds down to every attention call.
BOUNDS_KWARG = "packed_sample_bounds"


def sample_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sample: a sample starts where its position is 0.

    Args:
        position_ids (Tensor): [B, L] positions restarting at 0 for each packed sample.
    """
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def add_sample_bounds(decoder, args, kwargs):
    """Forward pre-hook of the decoder: read the sample bounds once per forward.

    Every layer of one forward (and its recompute under checkpointing) gets the same
    position_ids; transformers passes extra forward kwargs down to the attention function
    (as it does flash-attention's cu_seq_lens), so the bounds travel with the call and each
    layer is spared a host sync on CUDA.
    """
    position_ids = kwargs.get("position_ids")
    if decoder.training and position_ids is not None and kwargs.get(BOUNDS_KWARG) is None:
        kwargs[BOUNDS_KWARG] = sample_bounds(position_ids)
    return args, kwargs


def causal_attention(q, k, v, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal attention of one sample: q [1, H, n, D], k and v [1, H_kv, n, D] -> [1, H, n, D].

    Grouped-query heads are never copied H/H_kv times (transformers' repeat_kv): SDPA takes
    them with enable_gqa, and the CPU path folds each group's query heads into one matmul. On
    CPU the SDPA kernel is 2-3x slower than two matmuls and a softmax for short samples (it is
    tuned for long ones), so those take the plain path, softmax in fp32 as in eager.
    """
    _, heads, n, d = q.shape
    kv_heads = k.shape[1]
    if q.device.type != "cpu" or n > CPU_MATMUL_ATTENTION_MAX or dropout > 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=kv_heads != heads)
    groups = heads // kv_heads
    # Query head h attends with key/value head h // groups: stack each group's rows.
    qg = q.reshape(1, kv_heads, groups * n, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1).repeat(groups, 1)
    probs = torch.softmax(scores.float().masked_fill_(future, float("-inf")), dim=-1)
    return torch.matmul(probs.to(q.dtype), v).reshape(1, heads, n, d)


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                position_ids=None, packed_sample_bounds=None, **kwargs):
    """An AttentionInterface function: per-sample causal SDPA in training, plain SDPA otherwise.

    Args:
        module: the attention module (for `training` and `num_key_value_groups`).
        query (Tensor): [B, H, L, D]. key, value (Tensor): [B, H_kv, L, D].
        attention_mask (Tensor | None): transformers' mask, used outside training.
        dropout (float): attention dropout. scaling (float | None): softmax scale.
        position_ids (Tensor | None): [B, L], restarting at 0 for each packed sample.
        packed_sample_bounds (list | None): `sample_bounds(position_ids)`, read once per
            forward by `add_sample_bounds`; computed here when absent.

    Returns: ([B, L, H, D] attention output, None)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    same_length = query.shape[2] == key.shape[2]
    if not (module.training and position_ids is not None and same_length):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    rows = []
    bounds = packed_sample_bounds if packed_sample_bounds is not None else sample_bounds(position_ids)
    for b, spans in enumerate(bounds):
        parts = [causal_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                  dropout, scaling) for s, e in spans]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> None:
    """Register `packed_sdpa` with transformers and switch `model` to it (eval/generate unchanged)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    # The mask transformers builds for SDPA is what the non-training path needs.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not getattr(decoder, "_qlora_sample_bounds_hook", False):
        decoder.register_forward_pre_hook(add_sample_bounds, with_kwargs=True)
        decoder._qlora_sample_bounds_hook = True
