"""Attention for packed rows at the cost of their samples, not of the row.

A packed row of n samples under one [L, L] block-diagonal mask pays for L^2 scores, most of
them masked out, and the masked kernel is the slow one. In training, `packed_sdpa` splits each
row where its position_ids restart at 0 and runs causal attention within each sample: sum(n_i^2)
work (m^2 per sample for the padded kernel) and no mask, the same result. Right padding needs
no mask either: causal attention never looks ahead, and padded positions carry no loss. Which
kernel does it (ops/packed_kernels.py) is `attention_kernel`'s one rule.

Outside training (generation with a cache or left padding) it is plain SDPA with the mask
transformers builds, so `use_packed_attention(model)` is safe to leave on; a forward handed its
sample bounds (a host batch through step.to_device: DPO's reference pass, evaluation) is split
as in training whatever the mode.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import QloraError
from .packed_kernels import KERNELS, PackedRows, torch_varlen_available

PACKED_ATTENTION = "qlora_lite_packed"
# The forward kwarg that carries one forward's sample bounds down to every attention call.
BOUNDS_KWARG = "packed_sample_bounds"
# Forces the kernel of packed rows, e.g. QLORA_LITE_ATTENTION=sdpa_padded (benchmarks, debugging).
KERNEL_ENV = "QLORA_LITE_ATTENTION"
# On CPU the per-sample loop beats SDPA over end-padded buckets (the padding is real work there,
# and short samples take the matmul path): bench/attention_kernels.py --layers 2 --rows 4 --rounds 7
# --threads 1, packed Alpaca rows, bf16, medians; attention alone / the whole step, sdpa_padded
# time over per_sample's (2026-11-28, 1 thread of a loaded 2-core AVX-512/AMX machine):
#   hidden 576, 9 heads on 3 kv (SmolLM2), rows of 512:  1.55x / 1.10x
#   hidden 576, 9 heads on 3 kv,           rows of 1024: 1.26x / 1.01x
#   hidden 512, 8 heads,                   rows of 512:  1.27x / 1.05x
#   hidden 512, 8 heads,                   rows of 1024: 1.12x / 0.97x
CPU_KERNEL = "per_sample"
HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def flash_attn_installed() -> bool:
    """Whether the `flash-attn` package (FlashAttention-2, the `flash` extra) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def attention_kernel(device: torch.device | str, dtype: torch.dtype, forced: str | None = None) -> str:
    """The kernel packed rows run on: "flash_varlen", "torch_varlen", "sdpa_padded" or "per_sample".

    On CUDA in fp16/bf16: FlashAttention-2's varlen kernel, from flash-attn when it is installed,
    else from torch itself (torch >= 2.10); otherwise SDPA over end-padded samples (a few launches
    per layer instead of one per sample). Which of them is fastest on a GPU is not measured yet
    (bench/gpu_speed.py and checks/gpu_check.py stage b2 time them). On CPU: the measured faster
    one, CPU_KERNEL.

    Args:
        device (torch.device | str): where the attention runs.
        dtype (torch.dtype): the dtype of q, k, v.
        forced (str | None): a kernel name that overrides the rule; default the KERNEL_ENV
            environment variable, if set.
    """
    device = torch.device(device)
    forced = forced or os.environ.get(KERNEL_ENV) or None
    half_cuda = device.type == "cuda" and dtype in HALF
    runs = {"flash_varlen": half_cuda and flash_attn_installed(), "torch_varlen": half_cuda and torch_varlen_available()}
    if forced is not None:
        if forced not in KERNELS:
            raise QloraError(f"Unknown packed attention kernel {forced!r} (from {KERNEL_ENV} or the caller); "
                             f"use one of {', '.join(KERNELS)}.")
        if not runs.get(forced, True):
            needs = ("flash-attn (pip install 'qlora-lite[flash]')" if forced == "flash_varlen"
                     else "torch >= 2.10 (torch.nn.attention.varlen)")
            raise QloraError(f"The {forced} attention kernel needs CUDA, fp16/bf16 and {needs}; here: "
                             f"{device.type}, {dtype}, flash-attn "
                             f"{'installed' if flash_attn_installed() else 'not installed'}, torch "
                             f"{torch.__version__}. Unset {KERNEL_ENV} or pick sdpa_padded.")
        return forced
    if device.type == "cuda":
        return next((name for name in ("flash_varlen", "torch_varlen") if runs[name]), "sdpa_padded")
    return CPU_KERNEL


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
    """Forward pre-hook of the decoder: one `PackedRows` per training forward, shared by every layer.

    Every layer of one forward (and its recompute under checkpointing) gets the same
    position_ids; transformers passes extra forward kwargs down to the attention function
    (as it does flash-attention's cu_seq_lens), so the layout travels with the call, and its
    index tensors are built once. The bounds come from the host batch (step.to_device); when a
    caller gives none they are read from position_ids here (a host sync on CUDA).

    Training rows need no mask (`packed_sdpa` ignores it), so the decoder gets an empty 4D one,
    which transformers passes on as it is: given none, it reads the position_ids back to look
    for packed rows (masking_utils.find_packed_sequence_indices, `.all()`: a host sync on CUDA
    every forward); given the 2D padding mask, it builds a [B, 1, L, L] mask for nothing.
    """
    position_ids, bounds = kwargs.get("position_ids"), kwargs.get(BOUNDS_KWARG)
    if position_ids is None or not (decoder.training or bounds is not None):
        return args, kwargs
    if not isinstance(bounds, PackedRows):
        kwargs[BOUNDS_KWARG] = PackedRows(bounds if bounds is not None else sample_bounds(position_ids),
                                          position_ids.shape[1])
    if len(args) < 2:  # attention_mask is the decoder's second positional argument
        kwargs["attention_mask"] = position_ids.new_empty((0, 0, 0, 0), dtype=torch.bool)
    return args, kwargs


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                position_ids=None, packed_sample_bounds=None, kernel: str | None = None, varlen_fn=None,
                **kwargs):
    """An AttentionInterface function: packed causal attention in training or when handed the
    sample bounds, plain SDPA otherwise.

    Args:
        module: the attention module (for `training`).
        query (Tensor): [B, H, L, D]. key, value (Tensor): [B, H_kv, L, D].
        attention_mask (Tensor | None): transformers' mask, used outside training.
        dropout (float): attention dropout. scaling (float | None): softmax scale.
        position_ids (Tensor | None): [B, L], restarting at 0 for each packed sample.
        packed_sample_bounds (PackedRows | list | None): the forward's layout, made once per
            forward by `add_sample_bounds`; built here when absent.
        kernel (str | None): force a kernel (packed_kernels.KERNELS); default `attention_kernel`.
        varlen_fn (callable | None): the varlen function of `kernel` (flash_varlen by default),
            a test's stand-in that runs anywhere. Default the kernel's own.

    Returns: ([B, L, H, D] attention output, None)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    same_length = query.shape[2] == key.shape[2]
    # Bounds handed to the forward mark a batch laid out for training (step.to_device), also when it
    # runs in eval mode: DPO's reference pass over packed pairs must not attend across samples.
    packed = module.training or packed_sample_bounds is not None
    if not (packed and position_ids is not None and same_length):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    rows = packed_sample_bounds
    if not isinstance(rows, PackedRows):
        rows = PackedRows(rows if rows is not None else sample_bounds(position_ids), query.shape[2])
    if varlen_fn is not None:  # a test's stand-in for a varlen kernel's function, run wherever
        return KERNELS[kernel or "flash_varlen"](query, key, value, rows, dropout, scaling, varlen_fn=varlen_fn), None
    name = attention_kernel(query.device, query.dtype, kernel)
    return KERNELS[name](query, key, value, rows, dropout, scaling), None


def use_packed_attention(model, kernel: str | None = None, varlen_fn=None) -> None:
    """Register `packed_sdpa` with transformers and switch `model` to it (eval/generate unchanged).

    Args:
        model: a transformers causal LM.
        kernel (str | None): force one kernel for this model (benchmarks, tests); default the
            rule of `attention_kernel`.
        varlen_fn (callable | None): run flash_varlen with this varlen function (a test's
            pure-torch reference); default None.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask_when_padded(*args, attention_mask=None, **kwargs):
        # Training forwards never get here (add_sample_bounds hands the decoder an empty 4D
        # mask). A forward without a 2D mask would otherwise get a [B, 1, L, L] block mask built
        # from its position_ids; padded batches (eval, generation) get SDPA's mask as before.
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    name, fn = PACKED_ATTENTION, packed_sdpa
    if kernel is not None or varlen_fn is not None:
        # One registered name per forced kernel (registrations are global, keyed by name); no
        # "flash" in it: transformers takes any name containing it for its own flash-attention.
        tag = (kernel or "varlen").replace("flash", "fa2") + (f"_{id(varlen_fn)}" if varlen_fn else "")
        name = f"{PACKED_ATTENTION}_{tag}"
        fn = functools.partial(packed_sdpa, kernel=kernel, varlen_fn=varlen_fn)
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_when_padded)
    model.set_attn_implementation(name)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not getattr(decoder, "_qlora_sample_bounds_hook", False):
        decoder.register_forward_pre_hook(add_sample_bounds, with_kwargs=True)
        decoder._qlora_sample_bounds_hook = True
