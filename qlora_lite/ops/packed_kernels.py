"""The kernels that run causal attention over packed rows, each sample attending only to itself.

Every kernel takes transformers' layout, q [B, H, L, D] and k, v [B, H_kv, L, D], plus the
forward's `PackedRows`, and returns [B, L, H, D]. A row's right padding continues its last
sample's positions, so here it is just trailing tokens of that sample: causal attention never
lets a real token see it, and it carries no loss.

- `per_sample`: a Python loop, one attention call per sample and row.
- `sdpa_padded`: the samples gathered into [n_samples, H, max_len, D] batches padded at the end,
  one per length bucket, one causal SDPA call each, scattered back (a few launches per layer).
- `flash_varlen`: FlashAttention-2's varlen kernel on the flat [B*L, H, D] tokens with cu_seqlens.
- `torch_varlen`: the same kernel inside PyTorch (`torch.nn.attention.varlen.varlen_attn`, torch
  >= 2.10 on CUDA): no extra package.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Up to this many tokens per sample, attention on CPU is faster as matmul + softmax than
# through the SDPA kernel (measured on AVX-512 bf16, 8 heads of 64); the fp32 scores it
# holds are H * n^2 * 4 bytes, 8 MB at 512.
CPU_MATMUL_ATTENTION_MAX = 512
CPU_ATTENTION_LENGTH_MULTIPLE = 32


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

    def padded_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """(gather, inverse, buckets) for the padded layout: samples grouped by length bucket.

        Each bucket of n samples of at most m tokens is an [n, m] block of slots; `gather` [sum
        n*m] lists, block after block, the token each slot reads, `inverse` [B*L] the slot each
        token comes back from. Slot j of a sample of n_i tokens reads its token min(j, n_i - 1):
        the end padding repeats the last token, a finite value no real query attends to (causal).

        Returns: (gather, inverse) on `device`, and the (n, m) of each bucket as host ints.
        """
        key = ("padded", str(device))
        if key not in self._built:
            spans = self.spans()
            buckets: dict[int, list[int]] = {}
            for i, (_, n) in enumerate(spans):
                buckets.setdefault(padded_bucket(n), []).append(i)
            gather, inverse, shapes = [], [0] * (len(self.bounds) * self.length), []
            for members in buckets.values():
                m = max(spans[i][1] for i in members)
                for i in members:
                    s, n = spans[i]
                    inverse[s:s + n] = range(len(gather), len(gather) + n)
                    gather += [s + min(j, n - 1) for j in range(m)]
                shapes.append((len(members), m))
            self._built[key] = (_host_to(gather, torch.long, device), _host_to(inverse, torch.long, device), shapes)
        return self._built[key]


def padded_bucket(n: int) -> int:
    """The length bucket of an n-token sample for `sdpa_padded`: (2^(k-1), 2^k], k = this.

    One end-padded batch of all samples pads each to the longest: a 2,000-token sample beside
    twenty of 100 makes 21 x 2,000^2 of work for ~2,000^2 + 20 x 100^2. Samples padded only
    within a power-of-two bucket at most double in length (4x the work, ~1.5x typically), for
    a handful of SDPA calls per layer (samples of 60-400 tokens: 3-4 buckets).
    """
    return max(n - 1, 1).bit_length()


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
    # Samples end-padded to a multiple of CPU_ATTENTION_LENGTH_MULTIPLE: a handful of matmul
    # shapes instead of one per sample length (oneDNN keeps a primitive per shape for the whole
    # run). Exact: under the causal mask no real query sees the zero keys after it, and the
    # padded queries' outputs are dropped.
    m = -(-n // CPU_ATTENTION_LENGTH_MULTIPLE) * CPU_ATTENTION_LENGTH_MULTIPLE
    if m != n:
        q, k, v = (F.pad(x, (0, 0, 0, m - n)) for x in (q, k, v))
    # Query head h attends with key/value head h // groups: stack each group's rows.
    qg = q.reshape(1, kv_heads, groups * m, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    future = torch.ones(m, m, dtype=torch.bool, device=q.device).triu_(1).repeat(groups, 1)
    probs = torch.softmax(scores.float().masked_fill_(future, float("-inf")), dim=-1)
    return torch.matmul(probs.to(q.dtype), v).reshape(1, heads, m, d)[:, :, :n]


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
    """Samples as end-padded batches, one causal SDPA call per length bucket: a few launches per layer.

    Padded slots sit after every real token of their sample, so `is_causal` keeps them out of
    every real query; their outputs are dropped by the inverse gather, so their gradients are 0.
    """
    b, heads, length, d = q.shape
    gather, inverse, shapes = rows.padded_index(q.device)
    sizes = [n * m for n, m in shapes]

    def blocks(x):  # [B, h, L, D] -> one [n, h, m, D] per bucket
        parts = _flat(x).index_select(0, gather).split(sizes)
        return [p.view(n, m, x.shape[1], d).transpose(1, 2) for p, (n, m) in zip(parts, shapes)]

    out = [F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, is_causal=True, scale=scale,
                                          enable_gqa=k.shape[1] != heads).transpose(1, 2).reshape(-1, heads, d)
           for qb, kb, vb in zip(blocks(q), blocks(k), blocks(v))]
    return (out[0] if len(out) == 1 else torch.cat(out)).index_select(0, inverse).view(b, length, heads, d)


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


def torch_varlen(q, k, v, rows: PackedRows, dropout: float = 0.0, scale: float | None = None,
                 varlen_fn=None) -> torch.Tensor:
    """PyTorch's varlen attention (FlashAttention-2 inside torch) over the flat tokens: one launch.

    Its signature changed between torch 2.10 (`is_causal`) and 2.12 (`window_size`, `enable_gqa`):
    the keywords are read off the function. It has no dropout: with attention dropout the padded
    kernel runs instead.

    Args:
        varlen_fn (callable | None): a function with varlen_attn's signature; default torch's
            (a test passes a pure-torch one).
    """
    if dropout > 0:
        return sdpa_padded(q, k, v, rows, dropout, scale)
    if varlen_fn is None:
        from torch.nn.attention.varlen import varlen_attn as varlen_fn
    b, heads, length, d = q.shape
    cu_seqlens, max_seqlen = rows.varlen_index(q.device)
    out = varlen_fn(_flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                    **varlen_causal(varlen_fn, grouped=k.shape[1] != heads))
    return out.view(b, length, heads, d)


def varlen_causal(fn, grouped: bool) -> dict:
    """The keywords that make `fn` (a varlen_attn of some torch version) causal, grouped-query aware."""
    params = inspect.signature(fn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = grouped
    return kwargs


@functools.lru_cache(maxsize=1)
def torch_varlen_available() -> bool:
    """Whether this torch has varlen_attn with a causal switch (torch >= 2.10)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return "window_size" in params or "is_causal" in params


KERNELS = {"per_sample": per_sample, "sdpa_padded": sdpa_padded, "flash_varlen": flash_varlen,
           "torch_varlen": torch_varlen}
