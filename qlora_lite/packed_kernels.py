"""The kernels that run causal attention over packed rows, each sample attending only to itself.

Every kernel takes transformers' layout, q [B, H, L, D] and k, v [B, H_kv, L, D], plus the
forward's `PackedRows`, and returns [B, L, H, D]. A row's right padding continues its last
sample's positions, so here it is just trailing tokens of that sample: causal attention never
lets a real token see it, and it carries no loss.

- `per_sample`: a Python loop, one attention call per sample and row.
- `sdpa_padded`: every sample gathered into one [n_samples, H, max_len, D] batch, padded at the
  end, one causal SDPA call, scattered back (one launch per layer on a GPU).
- `flash_varlen`: FlashAttention-2's varlen kernel on the flat [B*L, H, D] tokens with cu_seqlens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Up to this many tokens per sample, attention on CPU is faster as matmul + softmax than
# through the SDPA kernel (measured on AVX-512 bf16, 8 heads of 64); the fp32 scores it
# holds are H * n^2 * 4 bytes, 8 MB at 512.
CPU_MATMUL_ATTENTION_MAX = 512


@dataclass
class PackedRows:
    """One forward's packed layout, read on the host; its device index tensors are built once.

    attention.add_sample_bounds makes one per forward, so every layer (and its recompute under
    gradient checkpointing) shares the same index tensors, built from host lists: no host sync.

    Args:
        bounds (list[list[tuple[int, int]]]): per row, each sample's (start, end); the samples
            of a row cover it end to end (attention.sample_bounds).
        length (int): L, the padded row length.
    """

    bounds: list[list[tuple[int, int]]]
    length: int
    _built: dict = field(default_factory=dict, repr=False)

    def spans(self) -> list[tuple[int, int]]:
        """(start, length) of every sample in the flat [B*L] token order."""
        return [(b * self.length + s, e - s) for b, row in enumerate(self.bounds) for s, e in row]

    def varlen_index(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [n_samples + 1] on `device`, max_seqlen as a host int)."""
        key = ("varlen", str(device))
        if key not in self._built:
            spans = self.spans()
            cu = [s for s, _ in spans] + [len(self.bounds) * self.length]
            self._built[key] = (_host_to(cu, torch.int32, device), max(n for _, n in spans))
        return self._built[key]

    def padded_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(gather [n*m], inverse [B*L], n samples, m = longest sample) for the padded layout.

        Slot j of sample i reads token start_i + min(j, n_i - 1): the end padding repeats the
        sample's last token, a finite value no real query attends to (causal). Token t of
        sample i at offset j comes back from slot i*m + j.
        """
        key = ("padded", str(device))
        if key not in self._built:
            spans = self.spans()
            m = max(n for _, n in spans)
            gather = [s + min(j, n - 1) for s, n in spans for j in range(m)]
            inverse = [i * m + j for i, (_, n) in enumerate(spans) for j in range(n)]
            self._built[key] = (_host_to(gather, torch.long, device), _host_to(inverse, torch.long, device),
                                len(spans), m)
        return self._built[key]


def _host_to(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`: pinned and copied without blocking on CUDA."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


def per_sample(q, k, v, rows: PackedRows, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """One `causal_attention` call per sample: sum(n_i^2) work, one launch per sample and layer."""
    out = []
    for b, spans in enumerate(rows.bounds):
        parts = [causal_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], dropout, scale)
                 for s, e in spans]
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=0)).transpose(1, 2).contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, h, L, D] -> [B*L, h, D], the token-major layout of varlen kernels."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b * length, h, d)


def sdpa_padded(q, k, v, rows: PackedRows, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """All samples as one end-padded batch through one causal SDPA call: n * m^2 work, one launch.

    Padded slots sit after every real token of their sample, so `is_causal` keeps them out of
    every real query; their outputs are dropped by the inverse gather, so their gradients are 0.
    """
    b, heads, length, d = q.shape
    gather, inverse, n, m = rows.padded_index(q.device)

    def padded(x):
        return _flat(x).index_select(0, gather).view(n, m, x.shape[1], d).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), dropout_p=dropout, is_causal=True,
                                         scale=scale, enable_gqa=k.shape[1] != heads)
    return out.transpose(1, 2).reshape(n * m, heads, d).index_select(0, inverse).view(b, length, heads, d)


def flash_varlen(q, k, v, rows: PackedRows, dropout: float = 0.0, scale: float | None = None,
                 varlen_fn=None) -> torch.Tensor:
    """FlashAttention-2's varlen kernel over the flat tokens: sum(n_i^2) work, one launch.

    Grouped-query k and v keep their H_kv heads (FA2 takes them as they are).

    Args:
        varlen_fn (callable | None): a function with flash_attn.flash_attn_varlen_func's
            signature; default that function (a test passes a pure-torch one).
    """
    if varlen_fn is None:
        from flash_attn import flash_attn_varlen_func as varlen_fn
    b, heads, length, d = q.shape
    cu_seqlens, max_seqlen = rows.varlen_index(q.device)
    out = varlen_fn(_flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout,
                    softmax_scale=scale, causal=True)
    return out.view(b, length, heads, d)


KERNELS = {"per_sample": per_sample, "sdpa_padded": sdpa_padded, "flash_varlen": flash_varlen}
