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
from dataclasses import asdict, dataclass
from pathlib import Path

from .dtypes import torch_dtype
from .errors import QloraError
from .memory import CATEGORIES, LABELS, MODES
from .readers import read_json
from .recipe import LORA_DTYPES, Recipe
from .units import gib, parse_size

CONFIG_DIR = Path(__file__).parent / "configs"
BF16 = 2
NF4_BLOCK = 64  # elements per absmax
NF4_BLOCK2 = 256  # absmax values per second-level (fp32) absmax
# Per quantized weight: NF4 code (16 fp32), nested absmax code (256 fp32), fp32 offset.
NF4_CONSTANTS = 16 * 4 + 256 * 4 + 4
OPT8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
OPT8_BLOCK = 256
OPT8_QMAPS = 2 * 256 * 4  # the shared signed/unsigned dynamic maps
# What a card can give to tensors: the CUDA context and allocator fragmentation are not ours.
CUDA_CONTEXT = 0.5 * 2**30
FRAGMENTATION = 0.05


@dataclass
class Arch:
    """The numbers of a decoder-only transformer that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    head_dim: int = 0
    name: str = ""

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"


@dataclass
class Settings:
    """What the estimate assumes about the run (the recipe's values).

    Args:
        seq_len (int): tokens per sample. Default 2048.
        batch_size (int): samples per micro-batch. Default 1.
        lora_r (int): adapter rank, all-linear. Default 16.
        lora_dropout (float): adapter input dropout (its masks are kept). Default 0.05.
        optimizer (str): train.optimizer. Default "paged_adamw_8bit".
        loss_chunk_size (int): train.loss_chunk_size; 0 = full fp32 logits. Default 1024.
        grad_accum (int): > 1 keeps gradients alive through the next forward; 1 frees
            them after each step. Default 16.
        device (str): "cuda" (bool dropout masks) or "cpu" (masks in bf16). Default "cuda".
        lora_dtype (str): lora.dtype, "bfloat16" or "float32" (2x adapter and gradient bytes;
            on CPU, without autocast, the adapter path runs in fp32 too). Default "bfloat16".
        dora (bool): lora.use_dora: a magnitude vector per linear and DoRA's saved tensors. Default False.
        gpus (int): data-parallel processes; the estimate is per GPU (the largest rank). Default 1.
        strategy (str): "ddp" (every GPU holds everything) or "fsdp" (base, adapters,
            gradients and optimizer state sharded; see estimate_parallel). Default "ddp".
        offload_activations (bool): model.offload_activations: layer inputs wait in host memory.
            Default False.
        tiled_mlp (int | str): model.tiled_mlp: 0, N tiles or "auto". Default 0.
    """

    seq_len: int = 2048
    batch_size: int = 1
    lora_r: int = 16
    lora_dropout: float = 0.05
    optimizer: str = "paged_adamw_8bit"
    loss_chunk_size: int = 1024
    grad_accum: int = 16
    device: str = "cuda"
    lora_dtype: str = "bfloat16"
    dora: bool = False
    gpus: int = 1
    strategy: str = "ddp"
    offload_activations: bool = False
    tiled_mlp: int | str = 0

    def __post_init__(self):
        if self.lora_dtype not in LORA_DTYPES:
            raise QloraError(f"lora dtype {self.lora_dtype!r} must be one of {', '.join(LORA_DTYPES)}.")

    @property
    def lora_bytes(self) -> int:
        """Bytes per adapter element."""
        return torch_dtype(self.lora_dtype).itemsize


def settings_from_recipe(recipe: Recipe, seq_len: int | None = None, device: str = "cuda") -> Settings:
    """The Settings a recipe trains with (LoRA rank, dropout and dtype, optimizer, loss, batch).

    Args:
        recipe (Recipe): the recipe.
        seq_len (int | None): default the recipe's data.max_seq_len (2048 without data).
        device (str): "cuda" or "cpu". Default "cuda".
    """
    t = recipe.train
    return Settings(seq_len=seq_len or (recipe.data.max_seq_len if recipe.data else 2048),
                    batch_size=t.micro_batch_size, lora_r=recipe.lora.r, lora_dropout=recipe.lora.dropout,
                    optimizer=t.optimizer, loss_chunk_size=t.loss_chunk_size, grad_accum=t.grad_accum,
                    device=device, lora_dtype=recipe.lora.dtype, dora=recipe.lora.use_dora,
                    offload_activations=recipe.model.offload_activations, tiled_mlp=recipe.model.tiled_mlp)


def load_arch(model: str) -> Arch:
    """An Arch from a shipped name (llama-2-7b, ...), a folder or config.json, or a Hub id.

    Args:
        model (str): see above; a Hub id downloads config.json only.
    """
    shipped = CONFIG_DIR / f"{model}.json"
    p = Path(model).expanduser()
    if shipped.is_file():
        path = shipped
    elif p.is_dir() and (p / "config.json").is_file():
        path = p / "config.json"
    elif p.is_file():
        path = p
    elif p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.json")))
        raise QloraError(f"Model {model!r} is not a config.json, a model folder, a Hub id (org/name) or a "
                         f"shipped config ({names}).")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as e:  # network, auth, missing repo: all need the same advice
            raise QloraError(f"Could not read config.json of {model!r} from the Hub ({e}); pass a local "
                             "folder or config.json instead.") from None
    cfg = read_json(path, "pass a model's config.json (a Hugging Face model folder holds one)")
    cfg = cfg.get("text_config", cfg)
    try:
        return Arch(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"], tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            model_type=cfg.get("model_type", "llama"), head_dim=cfg.get("head_dim") or 0, name=model)
    except KeyError as e:
        raise QloraError(f"{path}: config.json has no {e.args[0]!r}; only Llama-style decoders are supported.") from None


def layer_linears(a: Arch) -> list[tuple[int, int, bool]]:
    """(d_in, d_out, has_bias) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    q, kv, h, i = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim, a.hidden_size, a.intermediate_size
    b = a.qkv_bias
    return [(h, q, b), (h, kv, b), (h, kv, b), (q, h, False), (h, i, False), (h, i, False), (i, h, False)]


def nf4_bytes(n: int) -> int:
    """Bytes of an n-element NF4 weight with double quantization: 4 bits + uint8 absmax per
    64 + fp32 absmax per 256 blocks + constants (about 4.127 bits per parameter)."""
    blocks = math.ceil(n / NF4_BLOCK)
    return n // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_CONSTANTS


def optimizer_bytes(kind: str, numels: list[int], elem_bytes: int = BF16) -> int:
    """Optimizer state for trainable tensors of `numels` elements.

    Args:
        kind (str): "paged_adamw_8bit" / "adamw_8bit" (bnb blockwise 8-bit), "paged_adamw_32bit"
            / "adamw32" (fp32 state), "adamw" (torch: state in the parameter dtype + a step scalar).
        numels (list[int]): elements per trainable tensor.
        elem_bytes (int): parameter dtype size (torch AdamW). Default 2.
    """
    if kind == "adamw":
        return sum(2 * elem_bytes * n + 4 for n in numels)
    if kind.endswith("8bit"):
        big = [n for n in numels if n >= OPT8_MIN_SIZE]
        small = sum(8 * n for n in numels if n < OPT8_MIN_SIZE)
        return small + sum(2 * n + 2 * 4 * math.ceil(n / OPT8_BLOCK) for n in big) + (OPT8_QMAPS if big else 0)
    return sum(8 * n for n in numels)


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
        trainable = L * [n for d_in, d_out, _ in lin for n in (s.lora_r * d_in, s.lora_r * d_out)]
        trainable += L * [d_out for _, d_out, _ in lin] if s.dora else []  # DoRA magnitudes
        elem = s.lora_bytes
        lora, kind = elem * sum(trainable), s.optimizer
    grads = elem * sum(trainable)
    return {"base_weights": base, "lora_params": lora, "gradients": grads,
            "optimizer_state": optimizer_bytes(kind, trainable, elem)}


def layer_recompute_per_token(a: Arch, s: Settings, mode: str) -> int:
    """Bytes per token alive while backward runs through one recomputed decoder layer."""
    h, i, nh = a.hidden_size, a.intermediate_size, a.num_attention_heads
    q, kv = nh * a.head_dim, a.num_key_value_heads * a.head_dim
    # RMSNorms keep an fp32 copy, the normalised output and rsqrt; attention keeps the
    # rotated q and k, its output and a log-sum-exp per head.
    common = 18 * h + 8 + 4 * q + 4 * kv + 4 * nh
    if mode == "full":
        return common + 12 * i  # gate/up outputs, silu, product and their grads
    lin = layer_linears(a)
    # Under CUDA autocast the adapter path runs in bf16 whatever lora.dtype; on CPU in lora.dtype.
    elem = BF16 if s.device == "cuda" else s.lora_bytes
    adapters = elem * s.lora_r * len(lin)
    mask = 1 if s.device == "cuda" else elem  # CUDA dropout masks are bool
    if s.lora_dropout > 0:  # dropout's output and mask are saved
        dropout = sum((elem + mask) * d_in for d_in, _, _ in lin)
    else:  # without dropout only a cast of the input (fp32 adapters on CPU) is a new tensor
        dropout = sum(elem * d_in for d_in, _, _ in lin) if elem != BF16 else 0
    # DoRA keeps each linear's base output and adapter output for the magnitude's gradient.
    dora = sum((BF16 + elem) * d_out for _, d_out, _ in lin) if s.dora else 0
    return common + 8 * i + adapters + dropout + dora


def dora_layer_bytes(a: Arch, s: Settings, mode: str) -> int:
    """DoRA's per-layer extra during recompute, independent of tokens.

    Every forward forms B@A and W0 + s*B@A for the norm (two weight-sized temporaries of the
    largest linear); on the NF4 base with dropout, W0 @ dropout(x) is recomputed and autograd
    keeps each linear's dequantized W0 for the input gradient, as PEFT does (a bf16 base keeps
    its own weight, nothing extra).
    """
    if not s.dora or mode == "full":
        return 0
    lin = layer_linears(a)
    elem = BF16 if s.device == "cuda" else s.lora_bytes  # the adapter path's dtype, as in the forward
    kept = sum(elem * d_in * d_out for d_in, d_out, _ in lin) if s.lora_dropout > 0 and mode == "qlora" else 0
    return kept + 2 * elem * max(d_in * d_out for d_in, d_out, _ in lin)


def loss_bytes(a: Arch, s: Settings, mode: str) -> tuple[int, int]:
    """(saved, temporary) bytes alive while backward runs through the loss.

    Saved: the final norm's fp32 input and rsqrt, the shifted label-masked hidden states
    and targets, and (unchunked) the fp32 log-softmax. Temporary: the gradients of the
    log-softmax and of the fp32 logits, plus a chunk's recomputed log-softmax when chunked.
    """
    h, V = a.hidden_size, a.vocab_size
    n = s.batch_size * (s.seq_len - 1)  # next-token targets
    chunked = 0 < s.loss_chunk_size < n
    rows = s.loss_chunk_size if chunked else n
    norm = (4 * h + 4 + (4 * h if mode == "full" else 0)) * s.batch_size * s.seq_len
    saved = norm + BF16 * h * n + 8 * n + (0 if chunked else 4 * rows * V)
    return saved, (12 if chunked else 8) * rows * V


def estimate_mode(a: Arch, s: Settings, mode: str) -> dict:
    """Predicted peak breakdown of one mode: {"bytes": {category: n}, "total", "phase", "host"}."""
    if mode not in MODES:
        raise QloraError(f"mode {mode!r} must be one of {', '.join(MODES)}.")
    tokens = s.batch_size * s.seq_len
    b = {c: 0 for c in CATEGORIES}
    b.update(persistent(a, s, mode))
    # Checkpoint boundaries: every layer's input (unless offloaded), rotary cos/sin, token and position ids.
    inputs = a.num_hidden_layers * BF16 * a.hidden_size * tokens
    boundaries = (2 * BF16 * a.head_dim + 8) * tokens + 8 * s.seq_len + (0 if s.offload_activations else inputs)
    if tiled_mlp_tokens(a, s) < tokens:
        moments = tiled_moments(a, s, mode)
    else:
        recompute = layer_recompute_per_token(a, s, mode) * tokens + dora_layer_bytes(a, s, mode)
        moments = {"backward (layer recompute)": (0, recompute),
                   "backward (loss)": loss_bytes(a, s, mode)}
        if mode != "full":
            # Backward through the MLP's down projection: gate/up outputs and their gradients are
            # alive, and bitsandbytes dequantizes the whole bf16 weight for the input gradient.
            down = (2 * a.intermediate_size - 4 * a.hidden_size - 2 * s.lora_r) * tokens
            dequant = BF16 * a.hidden_size * a.intermediate_size if mode == "qlora" else 0
            moments["backward (MLP down projection)"] = (0, moments["backward (layer recompute)"][1] + down + dequant)
    if s.offload_activations:
        # Backward brings back the input of the layer it recomputes and prefetches the one below.
        back = min(2, a.num_hidden_layers) * BF16 * a.hidden_size * tokens
        moments = {k: (saved, temp + (0 if k == "backward (loss)" else back)) for k, (saved, temp) in moments.items()}
    n = s.batch_size * (s.seq_len - 1)
    if mode == "full" and 0 < s.loss_chunk_size < n:
        # Each chunk makes its own lm_head weight gradient; autograd sums them pairwise.
        saved = loss_bytes(a, s, mode)[0]
        moments["backward (lm_head grads)"] = (saved, 3 * BF16 * a.vocab_size * a.hidden_size)
    grads = b["gradients"]
    if s.grad_accum == 1:
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
    if s.gpus > 1:  # per GPU of a data-parallel run
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
    one = BF16 * a.hidden_size * s.batch_size * s.seq_len
    if s.device == "cuda":
        one = 1 << (one - 1).bit_length()
    return a.num_hidden_layers * one


def tiled_mlp_tokens(a: Arch, s: Settings) -> int:
    """Tokens per MLP tile under `s.tiled_mlp` (all tokens when untiled)."""
    from .tiled_mlp import tile_count

    tokens = s.batch_size * s.seq_len
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
    tokens, tile = s.batch_size * s.seq_len, tiled_mlp_tokens(a, s)
    cpu, drop = s.device != "cuda", s.lora_dropout > 0 and mode != "full"
    mask = BF16 if cpu else 1
    lin = layer_linears(a)
    if drop:
        attn_in = sum((BF16 + mask) * d_in for d_in, _, _ in lin[:4])
        mlp_in = sum((BF16 + mask) * d_in for d_in, _, _ in lin[4:]) + (BF16 * i if cpu else 0)  # CPU bernoulli scratch
    else:
        attn_in, mlp_in = BF16 * (h + q), BF16 * (h + i)
    adapters = 2 * s.lora_r * 4 if mode != "full" else 0
    resident = 4 * q + 4 * kv + 4 * a.num_attention_heads + adapters + attn_in + 4 * BF16 * h
    per_tile = 10 * i + 4 * h + mlp_in
    extra = BF16 * h * i if mode == "qlora" else 0  # the dequantized weight of one projection
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
    """Largest `field` ("seq_len" or "batch_size") up to `limit` that fits; 0 if none."""
    def ok(v):
        return fits(estimate_mode(a, Settings(**{**asdict(s), field: v}), mode)["total"], gpu_mem)

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
    out = {"model": model, "arch": asdict(a), "settings": asdict(settings), "gpu_mem": gpu_mem, "modes": {}}
    for m in modes:
        r = estimate_mode(a, settings, m)
        if gpu_mem:
            r["fits"] = fits(r["total"], gpu_mem)
            r["max_seq_len"] = largest(a, settings, m, gpu_mem, "seq_len", a.max_position_embeddings)
            r["max_batch_size"] = largest(a, settings, m, gpu_mem, "batch_size", 4096)
            r["max_seq_len_by_technique"] = largest_by_technique(a, settings, m, gpu_mem)
        out["modes"][m] = r
    return out


TECHNIQUES = {"plain": (False, 0), "offload": (True, 0), "tiled MLP": (False, "auto"), "offload + tiled MLP": (True, "auto")}


def largest_by_technique(a: Arch, s: Settings, mode: str, gpu_mem: float) -> dict:
    """Largest seq len (up to max_position_embeddings) with and without each long-context technique."""
    out = {}
    for name, (offload, tiled) in TECHNIQUES.items():
        t = Settings(**{**asdict(s), "offload_activations": offload, "tiled_mlp": tiled})
        out[name] = largest(a, t, mode, gpu_mem, "seq_len", a.max_position_embeddings)
    return out


def format_table(result: dict) -> str:
    """A markdown table: categories as rows, modes as columns, plus fit answers."""
    modes = list(result["modes"])
    s = result["settings"]
    long = (", offloaded" if s.get("offload_activations") else "") + (
        f", tiled MLP {s['tiled_mlp']}" if s.get("tiled_mlp") else "")
    lines = [f"{result['model']}: seq {s['seq_len']}, batch {s['batch_size']}, "
             f"{'DoRA' if s.get('dora') else 'LoRA'} r={s['lora_r']} all-linear ({s.get('lora_dtype', 'bfloat16')}), "
             f"{s['optimizer']}, loss chunk {s['loss_chunk_size']}, gradient checkpointing{long}"
             + (f"; per GPU of {s['gpus']} ({s['strategy']})" if s.get("gpus", 1) > 1 else "")
             + "; device bytes (host bytes on the last row)", "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for c in CATEGORIES:
        lines.append(f"| {LABELS[c]} | " + " | ".join(gib(result["modes"][m]["bytes"][c]) for m in modes) + " |")
    lines.append("| **predicted peak** | " + " | ".join(f"**{gib(result['modes'][m]['total'])}**" for m in modes) + " |")
    if result["gpu_mem"]:
        g = gib(result["gpu_mem"])
        lines.append(f"| fits in {g} | " + " | ".join("yes" if result["modes"][m]["fits"] else "NO" for m in modes) + " |")
        lines.append(f"| largest seq len (batch {s['batch_size']}, max {result['arch']['max_position_embeddings']}) | "
                     + " | ".join(str(result["modes"][m]["max_seq_len"]) for m in modes) + " |")
        lines.append(f"| largest batch (seq {s['seq_len']}) | "
                     + " | ".join(str(result["modes"][m]["max_batch_size"]) for m in modes) + " |")
        for t in TECHNIQUES:
            lines.append(f"| largest seq len, {t} | "
                         + " | ".join(str(result["modes"][m]["max_seq_len_by_technique"][t]) for m in modes) + " |")
    if s.get("offload_activations"):
        lines.append("| host RAM for offloaded checkpoints | " + " | ".join(gib(result["modes"][m]["host"]) for m in modes)
                     + " |")
    return "\n".join(lines)
