"""Per-GPU memory of a data-parallel run, from the single-process estimate.

DDP: every GPU holds what one process holds, plus the flat bucket the adapter gradients are
summed in (the size of the gradients, alive only while they are reduced after backward).

FSDP (parallel/fsdp.py): every parameter is cut into `gpus` row blocks (dim 0, padded to a
multiple of `gpus`); a rank keeps one block of each, plus what is never sharded: bitsandbytes'
quant constants (absmax, codes) and the rotary buffers. Gradients and optimizer state follow
their parameters' blocks. While a layer computes, its weights are gathered whole:
the decoder's own unit (embeddings) stays gathered after the forward (FSDP's root), and in
backward the layer being recomputed is gathered with the next one prefetched. The estimate is
the largest rank's (rank 0 holds the first, full-size block of every parameter).
"""

from __future__ import annotations

from .estimate_inputs import BF16, Arch, Settings, layer_linears, nf4_bytes, optimizer_bytes


def block(rows: int, gpus: int) -> int:
    """Rows of the largest block when `rows` are split over `gpus` (FSDP pads to a multiple)."""
    return -(-rows // gpus)


def _linear_weight(d_in: int, d_out: int, mode: str, gpus: int) -> int:
    """Bytes one rank holds of a linear's weight: NF4 packed bytes (a [n/2, 1] uint8 tensor)
    split, quant constants whole; bf16 split by output rows."""
    n = d_in * d_out
    if mode == "qlora":
        return block(n // 2, gpus) + nf4_bytes(n) - n // 2
    return BF16 * block(d_out, gpus) * d_in


def _lora_numels(a: Arch, s: Settings, gpus: int) -> list[int]:
    """Elements one rank holds of each adapter tensor: A is r x d_in, B is d_out x r."""
    return a.num_hidden_layers * [n for d_in, d_out, _ in layer_linears(a)
                                  for n in (block(s.r, gpus) * d_in, block(d_out, gpus) * s.r)]


def fsdp_persistent(a: Arch, s: Settings, mode: str) -> dict:
    """Bytes of weights, adapters, gradients and optimizer state one FSDP rank holds."""
    g, h, L, V = s.nproc, a.hidden_size, a.num_hidden_layers, a.vocab_size
    embeddings = BF16 * V * h if a.tie_word_embeddings else 2 * BF16 * block(V, g) * h  # a tied head is not sharded
    base = embeddings + (2 * L + 1) * BF16 * block(h, g) + 2 * (a.head_dim // 2) * 4
    for d_in, d_out, bias in layer_linears(a):
        base += L * (_linear_weight(d_in, d_out, mode, g) + (BF16 * block(d_out, g) if bias else 0))
    if mode == "full":  # every weight trains: its gradient and fp32 Adam state follow its block
        rest = base - 2 * (a.head_dim // 2) * 4
        return {"base_weights": base, "lora_params": 0, "gradients": rest, "optimizer_state": 4 * rest}
    lora = _lora_numels(a, s, g)
    return {"base_weights": base, "lora_params": BF16 * sum(lora), "gradients": BF16 * sum(lora),
            "optimizer_state": optimizer_bytes(s.optimizer, lora)}


def gathered_layer(a: Arch, s: Settings, mode: str) -> int:
    """Bytes of one decoder layer's weights and adapters gathered whole (padded blocks x gpus)."""
    g = s.nproc
    total = 2 * BF16 * g * block(a.hidden_size, g)  # its two norms
    for d_in, d_out, bias in layer_linears(a):
        n = d_in * d_out
        total += g * block(n // 2, g) if mode == "qlora" else BF16 * g * block(d_out, g) * d_in
        total += BF16 * g * (block(s.r, g) * d_in + block(d_out, g) * s.r)
        total += BF16 * g * block(d_out, g) if bias else 0
    return a.num_hidden_layers and total


def per_gpu(a: Arch, s: Settings, mode: str, single: dict) -> dict:
    """The single-process breakdown `single` (estimate.estimate_mode) turned into one GPU's.

    Args:
        a (Arch): the model.
        s (Settings): with gpus and strategy.
        mode (str): "qlora", "lora" or "full" (FSDP: qlora and lora).
        single (dict): {"bytes", "total", "phase"} for one process.
    """
    b = dict(single["bytes"])
    if s.nproc <= 1:
        return single
    if s.distributed == "ddp":
        if single["phase"] == "optimizer step":  # the flat bucket next to the gradients
            b["temporaries"] += b["gradients"]
        return {"bytes": b, "total": sum(b.values()), "phase": single["phase"], "host": single["host"]}
    persistent = fsdp_persistent(a, s, mode)
    if s.grad_accum == 1 and single["phase"] != "optimizer step":
        persistent["gradients"] = 0  # freed after each step, as in one process
    b.update(persistent)
    g = s.nproc
    root = BF16 * g * block(a.vocab_size, g) * a.hidden_size if not a.tie_word_embeddings else 0
    b["temporaries"] += root + 2 * gathered_layer(a, s, mode)  # embeddings, current + prefetched layer
    return {"bytes": b, "total": sum(b.values()), "phase": single["phase"], "host": single["host"]}
