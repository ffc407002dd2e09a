"""Which GGML type each tensor of a GGUF gets for an `export --gguf` type: llama.cpp's rule.

This follows `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp for the types we write:
the output head (or the token embeddings when the head is tied to them) gets Q6_K; for Q4_K_M and
Q5_K_M, attn_v and ffn_down get Q6_K in the layers `use_more_bits` picks (the first and last
eighth and every third one between); 1-D tensors (norms, biases) stay F32. A tensor whose rows
are not a multiple of the type's block falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0; F16 when even that does not divide the row) and is counted as a fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# --gguf name -> (llama.cpp's file type name, the default tensor type). The types the converter
# writes itself (f16, bf16, q8_0) are not here.
REQUANT_TYPES = {
    "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("MOSTLY_Q5_1", "Q5_1"),
    "q4_K_M": ("MOSTLY_Q4_K_M", "Q4_K"),
    "q5_K_M": ("MOSTLY_Q5_K_M", "Q5_K"),
    "q6_K": ("MOSTLY_Q6_K", "Q6_K"),
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's, for rows not a multiple of 256
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class TypePlan:
    """The GGML type of every tensor of one file, and which ones fell back."""

    types: dict[str, str] = field(default_factory=dict)  # tensor name -> GGML type name
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (wanted, written)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], gguf_type: str, block_sizes: dict[str, int]) -> TypePlan:
    """The GGML type of each tensor for `--gguf gguf_type`.

    Args:
        tensors (list[tuple[str, tuple]]): (GGUF tensor name, numpy shape) in file order.
        gguf_type (str): a key of REQUANT_TYPES.
        block_sizes (dict[str, int]): GGML type name -> weights per block.
    """
    _, default = REQUANT_TYPES[gguf_type]
    names = [n for n, _ in tensors]
    has_output = "output.weight" in names
    n_layers = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.match(n))), default=-1)
    plan = TypePlan()
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith(".weight"):
            plan.types[name] = "F32"
            continue
        wanted = _wanted(name, gguf_type, default, has_output, n_layers)
        row = shape[-1]
        written = wanted
        if row % block_sizes[wanted]:
            written = FALLBACK.get(wanted, "F16")
            if row % block_sizes[written]:
                written = "F16"
            plan.fallbacks[name] = (wanted, written)
        plan.types[name] = written
    return plan


def _wanted(name: str, gguf_type: str, default: str, has_output: bool, n_layers: int) -> str:
    """llama_tensor_get_type's choice before the row-length fallback."""
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return "Q6_K"  # the head: llama.cpp gives it Q6_K for every type we write
    m = _LAYER.match(name)
    if gguf_type in ("q4_K_M", "q5_K_M") and m and (".attn_v." in name or ".ffn_down" in name):
        return "Q6_K" if use_more_bits(int(m.group(1)), n_layers) else default
    return default
