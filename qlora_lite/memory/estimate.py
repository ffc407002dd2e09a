"""Predicted memory: the profile's categories from the architecture alone, and what fits.

Weights, adapters, gradients and optimizer state are counted tensor by tensor, the way
bitsandbytes and torch store them. Activations follow the Llama-family decoder in
transformers with non-reentrant gradient checkpointing: each layer's input is kept,
and in backward one layer is recomputed; the per-token sizes of that recompute and of
the loss were read off `MemoryTracker` runs (see tests/test_estimate.py) and are
written here term by term. The peak is the largest of a few moments: backward through
the recomputed last layer and through its MLP's down projection (where bitsandbytes
dequantizes a weight), backward through the loss or the lm_head gradients, and the
optimizer step when gradients are not accumulated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from ..errors import QloraError
from ..model.quant import keeps_dequantized_weights
from ..ops.loss import CPU_LOSS_ROW_MULTIPLE
from ..utils.units import gib, parse_size
from .estimate_inputs import (
    BF16,
    CUDA_CONTEXT,
    FRAGMENTATION,
    Arch,
    Settings,
    adapter_inputs,
    flat_bytes,
    layer_linears,
    load_arch,
    nf4_bytes,
    optimizer_bytes,
)
from .tracker import CATEGORIES, LABELS, MODES


def persistent(a: Arch, s: Settings, mode: str) -> dict:
    """Bytes of weights, adapters, gradients and optimizer state (alive the whole step)."""
    h, L, V = a.hidden_size, a.num_hidden_layers, a.vocab_size
    lin = layer_linears(a)
    small = [V * h] * (1 if a.tie_word_embeddings else 2) + [h] * (2 * L + 1)  # embeddings, norms
    base = BF16 * sum(small) + 2 * (a.head_dim // 2) * 4  # rotary inv_freq buffers (fp32)
    for d_in, d_out, bias in lin:
        w = nf4_bytes(d_in * d_out) if mode == "qlora" else BF16 * d_in * d_out
        base += L * (w + (BF16 * d_out if bias else 0))
    if mode == "full":
        trainable = small + L * [n for d_in, d_out, bias in lin for n in ([d_in * d_out] + ([d_out] if bias else []))]
        lora, kind = 0, ("paged_adamw_32bit" if s.optimizer.startswith("paged") else "adamw32")
        elem = BF16
    else:
        # Adapters, their gradients and torch AdamW's state are in lora.dtype.
        trainable = L * [n for d_in, d_out, _ in lin for n in (s.r * d_in, s.r * d_out)]
        trainable += L * [d_out for _, d_out, _ in lin] if s.use_dora else []  # DoRA magnitudes
        elem = s.lora_bytes
        if s.flat:  # views into flat buffers (train/flat.py): padded slots, gradient buffers as large
            lora, state = flat_bytes(s.optimizer, trainable, elem)
            return {"base_weights": base, "lora_params": lora, "gradients": lora, "optimizer_state": state}
        lora, kind = elem * sum(trainable), s.optimizer
    grads = elem * sum(trainable)
    return {"base_weights": base, "lora_params": lora, "gradients": grads,
            "optimizer_state": optimizer_bytes(kind, trainable, elem)}


def layer_recompute_per_token(a: Arch, s: Settings, mode: str) -> int:
    """Bytes per token alive while backward runs through one recomputed decoder layer."""
    h, i, nh = a.hidden_size, a.intermediate_size, a.num_attention_heads
    q, kv = nh * a.head_dim, a.num_key_value_heads * a.head_dim
    # Attention keeps the rotated q and k, its output and a log-sum-exp per head; the RMSNorms
    # (ops/rms_norm.py) their input and one fp32 rsqrt per token. transformers' own norms kept an
    # fp32 copy and the normalised output: 6h bytes a token more (tracker, 2026-12-04).
    common = 12 * h + 16 + 4 * q + 4 * kv + 4 * nh
    if mode == "full":
        return common + 12 * i  # gate/up outputs, silu, product and their grads
    lin = layer_linears(a)
    # Under CUDA autocast the adapter path runs in bf16 whatever lora.dtype; on CPU in lora.dtype.
    elem = BF16 if s.device == "cuda" else s.lora_bytes
    adapters = elem * s.r * len(lin)
    mask = 1 if s.device == "cuda" else elem  # CUDA dropout masks are bool
    if s.dropout > 0:  # dropout's output and mask are saved, once per input the adapters share
        dropout = sum((elem + mask) * d_in for d_in in adapter_inputs(a, s))
    else:  # without dropout the adapters keep their inputs: the two normalised hidden states (q/k/v
        # and gate/up share one each) and the MLP's product (the attention output is attention's
        # own); fp32 adapters on CPU keep a cast of the input per linear instead.
        dropout = sum(elem * d_in for d_in, _, _ in lin) if elem != BF16 else BF16 * (2 * h + i)
    # DoRA keeps each linear's base output and adapter output for the magnitude's gradient.
    dora = sum((BF16 + elem) * d_out for _, d_out, _ in lin) if s.use_dora else 0
    return common + 8 * i + adapters + dropout + dora


def dora_layer_bytes(a: Arch, s: Settings, mode: str) -> int:
    """DoRA's per-layer extra during recompute, independent of tokens.

    Every forward forms B@A and W0 + s*B@A for the norm (two weight-sized temporaries of the
    largest linear); on the NF4 base with dropout, W0 @ dropout(x) is recomputed and autograd
    keeps each linear's dequantized W0 for the input gradient, as PEFT does (a bf16 base keeps
    its own weight, nothing extra).
    """
    if not s.use_dora or mode == "full":
        return 0
    lin = layer_linears(a)
    elem = BF16 if s.device == "cuda" else s.lora_bytes  # the adapter path's dtype, as in the forward
    kept = sum(elem * d_in * d_out for d_in, d_out, _ in lin) if s.dropout > 0 and mode == "qlora" else 0
    return kept + 2 * elem * max(d_in * d_out for d_in, d_out, _ in lin)


def kept_weight_bytes(a: Arch, s: Settings, mode: str) -> int:
    """One layer's dequantized NF4 weights, kept from its recompute to its backward where
    quant.keeps_dequantized_weights says so (CPU); 0 elsewhere."""
    if mode != "qlora" or not keeps_dequantized_weights(s.device, gradient_checkpointing=True):
        return 0
    return BF16 * sum(d_in * d_out for d_in, d_out, _ in layer_linears(a))


def loss_bytes(a: Arch, s: Settings, mode: str) -> tuple[int, int]:
    """(saved, temporary) bytes alive while backward runs through the loss.

    Saved: the final norm's fp32 input and rsqrt, the shifted label-masked hidden states
    and targets, and (unchunked) the fp32 log-softmax. Temporary: the gradients of the
    log-softmax and of the fp32 logits, plus a chunk's recomputed log-softmax when chunked.
    """
    h, V = a.hidden_size, a.vocab_size
    n = s.sequences * (s.max_seq_len - 1)  # next-token targets
    if s.device == "cpu":  # padded to a multiple of rows on CPU (loss.py)
        n = -(-n // CPU_LOSS_ROW_MULTIPLE) * CPU_LOSS_ROW_MULTIPLE
    chunked = 0 < s.loss_chunk_size < n
    rows = s.loss_chunk_size if chunked else n
    norm = (4 * h + 4 + (4 * h if mode == "full" else 0)) * s.sequences * s.max_seq_len
    saved = norm + BF16 * h * n + 8 * n + (0 if chunked else 4 * rows * V)
    return saved, (12 if chunked else 8) * rows * V


def estimate_mode(a: Arch, s: Settings, mode: str) -> dict:
    """Predicted peak breakdown of one mode: {"bytes": {category: n}, "total", "phase", "host"}."""
    if mode not in MODES:
        raise QloraError(f"mode {mode!r} must be one of {', '.join(MODES)}.")
    tokens = s.sequences * s.max_seq_len
    b = {c: 0 for c in CATEGORIES}
    b.update(persistent(a, s, mode))
    if mode == "full" and s.objective == "dpo":  # no adapters to disable: the reference is a second copy
        b["base_weights"] *= 2
    # Checkpoint boundaries: every layer's input (unless offloaded), rotary cos/sin, token and position ids.
    inputs = a.num_hidden_layers * BF16 * a.hidden_size * tokens
    boundaries = (2 * BF16 * a.head_dim + 8) * tokens + 8 * s.max_seq_len + (0 if s.offload_activations else inputs)
    if tiled_mlp_tokens(a, s) < tokens:
        moments = tiled_moments(a, s, mode)
    else:
        kept = kept_weight_bytes(a, s, mode)
        recompute = layer_recompute_per_token(a, s, mode) * tokens + dora_layer_bytes(a, s, mode) + kept
        moments = {"backward (layer recompute)": (0, recompute),
                   "backward (loss)": loss_bytes(a, s, mode)}
        if mode != "full":
            # Backward through the MLP's down projection: gate/up outputs and their gradients are
            # alive, and bitsandbytes dequantizes the whole bf16 weight for the input gradient
            # (unless the layer's weights are kept: then it is among them).
            down = (2 * a.intermediate_size - 4 * a.hidden_size - 2 * s.r) * tokens
            dequant = BF16 * a.hidden_size * a.intermediate_size if mode == "qlora" and not kept else 0
            moments["backward (MLP down projection)"] = (0, moments["backward (layer recompute)"][1] + down + dequant)
    if s.offload_activations:
        # Backward brings back the input of the layer it recomputes and prefetches the one below.
        back = min(2, a.num_hidden_layers) * BF16 * a.hidden_size * tokens
        moments = {k: (saved, temp + (0 if k == "backward (loss)" else back)) for k, (saved, temp) in moments.items()}
    n = s.sequences * (s.max_seq_len - 1)
    if mode == "full" and 0 < s.loss_chunk_size < n:
        # Each chunk makes its own lm_head weight gradient; autograd sums them pairwise.
        saved = loss_bytes(a, s, mode)[0]
        moments["backward (lm_head grads)"] = (saved, 3 * BF16 * a.vocab_size * a.hidden_size)
    grads = b["gradients"]
    if s.grad_accum == 1 and not (s.flat and mode != "full"):  # flat gradient buffers stay allocated
        # Without accumulation gradients exist only from backward to the optimizer step.
        moments = {k: (saved, temp) for k, (saved, temp) in moments.items()}
        moments["optimizer step"] = (-boundaries, grads)
        grads = 0
    phase, (saved, temp) = max(moments.items(), key=lambda kv: sum(kv[1]))
    b["activations"] = boundaries + saved
    b["temporaries"] = temp
    if phase == "optimizer step":
        b["gradients"], b["temporaries"] = temp, 0
    else:
        b["gradients"] = grads
    single = {"bytes": b, "total": sum(b.values()), "phase": phase, "host": host_bytes(a, s)}
    if s.nproc > 1:  # per GPU of a data-parallel run
        from .estimate_parallel import per_gpu

        return per_gpu(a, s, mode, single)
    return single


def host_bytes(a: Arch, s: Settings) -> int:
    """Host memory the offloaded layer inputs take at the end of the forward pass.

    On CUDA they are pinned, and torch's pinned allocator rounds every block up to a power
    of two, so a layer input of 0.6 GiB takes 1 GiB of host RAM.
    """
    if not s.offload_activations:
        return 0
    one = BF16 * a.hidden_size * s.sequences * s.max_seq_len
    if s.device == "cuda":
        one = 1 << (one - 1).bit_length()
    return a.num_hidden_layers * one


def tiled_mlp_tokens(a: Arch, s: Settings) -> int:
    """Tokens per MLP tile under `s.tiled_mlp` (all tokens when untiled)."""
    from ..model.tiled_mlp import tile_count

    tokens = s.sequences * s.max_seq_len
    if not s.tiled_mlp:
        return tokens
    return math.ceil(tokens / tile_count(tokens, a.hidden_size, s.tiled_mlp))


def tiled_moments(a: Arch, s: Settings, mode: str) -> dict:
    """The moments of `estimate_mode` when the MLP and the RMSNorms run tiled (tiled_mlp.py).

    While the last layer's MLP runs backward, the layer holds per token what its attention
    saved (rotated q and k, v, the attention output and log-sum-exp, the adapters' inputs and
    dropout masks), the bf16 inputs of the post-attention norm and of the MLP, and the MLP's
    output and input gradients; one tile holds what an untiled MLP would per token (and
    bitsandbytes' dequantized weight). Terms read off tracker runs (tests/test_long_context.py).
    """
    h, i, q, kv = a.hidden_size, a.intermediate_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    tokens, tile = s.sequences * s.max_seq_len, tiled_mlp_tokens(a, s)
    cpu, drop = s.device != "cuda", s.dropout > 0 and mode != "full"
    mask = BF16 if cpu else 1
    if drop:
        inputs = adapter_inputs(a, s)
        split = 2 if s.fused else 4  # the attention's inputs first, then the MLP's
        attn_in = sum((BF16 + mask) * d_in for d_in in inputs[:split])
        mlp_in = sum((BF16 + mask) * d_in for d_in in inputs[split:]) + (BF16 * i if cpu else 0)  # CPU mask scratch
    else:
        attn_in, mlp_in = BF16 * (h + q), BF16 * (h + i)
    adapters = 2 * s.r * 4 if mode != "full" else 0
    resident = 4 * q + 4 * kv + 4 * a.num_attention_heads + adapters + attn_in + 4 * BF16 * h
    per_tile = 10 * i + 4 * h + mlp_in
    # The dequantized weight of one projection, or the layer's kept ones (kept_weight_bytes).
    extra = (kept_weight_bytes(a, s, mode) or BF16 * h * i) if mode == "qlora" else 0
    if mode == "full":
        extra = 3 * 4 * h * i  # fp32 sums of the MLP weights' gradients over tiles
    saved, temp = loss_bytes(a, s, mode)
    # The final norm keeps its bf16 input instead of an fp32 copy and rsqrt.
    saved -= (4 * h + 4 + (4 * h if mode == "full" else 0) - BF16 * h) * tokens
    return {"backward (layer, tiled MLP)": (0, resident * tokens + per_tile * tile + extra),
            "backward (loss)": (saved, temp)}


def fits(total: int, gpu_mem: float) -> bool:
    """Whether `total` tensor bytes fit on a card of `gpu_mem` bytes (context + fragmentation kept back)."""
    return total * (1 + FRAGMENTATION) + CUDA_CONTEXT <= gpu_mem


def largest(a: Arch, s: Settings, mode: str, gpu_mem: float, field: str, limit: int) -> int:
    """Largest `field` ("max_seq_len" or "micro_batch_size") up to `limit` that fits; 0 if none."""
    def ok(v):
        return fits(estimate_mode(a, replace(s, **{field: v}), mode)["total"], gpu_mem)

    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def gpu_mem_bytes(text: str) -> int:
    """`--gpu-mem` in bytes (units.parse_size); a bare number under 1 MiB is surely a missing unit."""
    n = parse_size(text, "--gpu-mem")
    if n < 2**20:
        raise QloraError(f"--gpu-mem {text!r} is {n} bytes; give a unit, e.g. 24GiB for a 24 GB card.")
    return n


def parse_tiles(text: str | None) -> int | str:
    """`--tiled-mlp` value: None -> 0 (off), "auto", or a number of tiles."""
    if text is None or text == "auto":
        return text or 0
    if not text.isdigit():
        raise QloraError(f"--tiled-mlp {text!r}: give a number of tiles or auto.")
    return int(text)


def estimate(model: str, settings: Settings, gpu_mem: float | None = None, modes=MODES) -> dict:
    """Predictions for every mode, with fit answers when `gpu_mem` is given (JSON-ready)."""
    a = load_arch(model)
    out = {"model": model, "arch": asdict(a), "settings": settings.recipe_values(), "gpu_mem": gpu_mem, "modes": {}}
    for m in modes:
        r = estimate_mode(a, settings, m)
        if gpu_mem:
            r["fits"] = fits(r["total"], gpu_mem)
            r["max_seq_len"] = largest(a, settings, m, gpu_mem, "max_seq_len", a.max_position_embeddings)
            r["max_micro_batch_size"] = largest(a, settings, m, gpu_mem, "micro_batch_size", 4096)
            r["max_seq_len_by_technique"] = largest_by_technique(a, settings, m, gpu_mem)
        out["modes"][m] = r
    return out


TECHNIQUES = {"plain": (False, 0), "offload": (True, 0), "tiled MLP": (False, "auto"), "offload + tiled MLP": (True, "auto")}


def largest_by_technique(a: Arch, s: Settings, mode: str, gpu_mem: float) -> dict:
    """Largest seq len (up to max_position_embeddings) with and without each long-context technique."""
    out = {}
    for name, (offload, tiled) in TECHNIQUES.items():
        t = replace(s, offload_activations=offload, tiled_mlp=tiled)
        out[name] = largest(a, t, mode, gpu_mem, "max_seq_len", a.max_position_embeddings)
    return out


def format_table(result: dict) -> str:
    """A markdown table: categories as rows, modes as columns, plus fit answers."""
    modes = list(result["modes"])
    s = result["settings"]
    long = (", offloaded" if s["model.offload_activations"] else "") + (
        f", tiled MLP {s['model.tiled_mlp']}" if s["model.tiled_mlp"] else "")
    lines = [f"{result['model']}: seq {s['data.max_seq_len']}, batch {s['train.micro_batch_size']}, "
             f"{'DoRA' if s['lora.use_dora'] else 'LoRA'} r={s['lora.r']} all-linear ({s['lora.dtype']}), "
             f"{s['train.optimizer']}, loss chunk {s['train.loss_chunk_size']}, gradient checkpointing{long}"
             + (f"; per GPU of {s['nproc']} ({s['train.distributed']})" if s["nproc"] > 1 else "")
             + (f"; {s['train.objective'].upper()}: batch in pairs, two sequences each"
                if s["train.objective"] != "sft" else "")
             + "; device bytes (host bytes on the last row)", "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for c in CATEGORIES:
        lines.append(f"| {LABELS[c]} | " + " | ".join(gib(result["modes"][m]["bytes"][c]) for m in modes) + " |")
    lines.append("| **predicted peak** | " + " | ".join(f"**{gib(result['modes'][m]['total'])}**" for m in modes) + " |")
    if result["gpu_mem"]:
        g = gib(result["gpu_mem"])
        lines.append(f"| fits in {g} | " + " | ".join("yes" if result["modes"][m]["fits"] else "NO" for m in modes) + " |")
        lines.append(f"| largest seq len (batch {s['train.micro_batch_size']}, max "
                     f"{result['arch']['max_position_embeddings']}) | "
                     + " | ".join(str(result["modes"][m]["max_seq_len"]) for m in modes) + " |")
        lines.append(f"| largest batch (seq {s['data.max_seq_len']}) | "
                     + " | ".join(str(result["modes"][m]["max_micro_batch_size"]) for m in modes) + " |")
        for t in TECHNIQUES:
            lines.append(f"| largest seq len, {t} | "
                         + " | ".join(str(result["modes"][m]["max_seq_len_by_technique"][t]) for m in modes) + " |")
    if s["model.offload_activations"]:
        lines.append("| host RAM for offloaded checkpoints | " + " | ".join(gib(result["modes"][m]["host"]) for m in modes)
                     + " |")
    return "\n".join(lines)
