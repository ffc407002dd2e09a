"""Dtype names: what recipes and the command line write, and the torch dtypes they mean."""

from __future__ import annotations

import torch

# Recipe names (model.quantization.compute_dtype, lora.dtype), as torch spells them.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# `export --dtype` short names.
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a recipe name ("bfloat16") or a short name ("bf16")."""
    return DTYPES[SHORT_NAMES.get(name, name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The recipe name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")
