"""Dtype names: what recipes and the command line write, and the torch dtypes they mean.

The names are defined here once; torch is imported only to turn one into a dtype, so that a
recipe loads (and a wrong name is refused) without importing torch.
"""

from __future__ import annotations

# Recipe names (model.quantization.compute_dtype, lora.dtype), as torch spells them.
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
LORA_DTYPES = ("bfloat16", "float32")  # fp16 adapter updates underflow: fp16 compute keeps fp32 adapters
# `export --dtype` short names.
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    """The torch dtype of a recipe name ("bfloat16") or a short name ("bf16")."""
    import torch

    full = SHORT_NAMES.get(name, name)
    if full not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; one of {', '.join(COMPUTE_DTYPES + tuple(SHORT_NAMES))}")
    return getattr(torch, full)


def dtype_name(dtype) -> str:
    """The recipe name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")
