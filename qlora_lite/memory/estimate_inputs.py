"""What the estimate counts from: a model's architecture, a run's settings, and the bytes that
bitsandbytes and torch store per weight and optimizer element (estimate.py, estimate_parallel.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import QloraError
from ..recipe import LORA_DTYPES, STRATEGIES, LoraConfig, ModelConfig, Recipe, TrainConfig
from ..train.flat import OPT8_BLOCK, OPT8_MIN_SIZE, buffer_numels
from ..utils.dtypes import torch_dtype
from ..utils.readers import read_json

CONFIG_DIR = Path(__file__).parent / "configs"
BF16 = 2
NF4_BLOCK = 64  # elements per absmax
NF4_BLOCK2 = 256  # absmax values per second-level (fp32) absmax
# Per quantized weight: NF4 code (16 fp32), nested absmax code (256 fp32), fp32 offset.
NF4_CONSTANTS = 16 * 4 + 256 * 4 + 4
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
    """What the estimate assumes about the run: the recipe's values, under the recipe's names
    (RECIPE_KEYS says which field is which recipe key). Defaults are the recipe's, but a 2048-token
    sample.

    Args:
        max_seq_len (int): data.max_seq_len, tokens per sample. Default 2048.
        micro_batch_size (int): train.micro_batch_size. Default 1.
        r (int): lora.r, all-linear. Default the recipe's.
        dropout (float): lora.dropout (its masks are kept). Default the recipe's.
        dtype (str): lora.dtype, "bfloat16" or "float32" (2x adapter and gradient bytes; on CPU,
            without autocast, the adapter path runs in fp32 too). Default the recipe's.
        use_dora (bool): lora.use_dora: a magnitude vector per linear and DoRA's saved tensors.
        optimizer (str): train.optimizer. Default the recipe's.
        loss_chunk_size (int): train.loss_chunk_size; 0 = full fp32 logits. Default the recipe's.
        grad_accum (int): train.grad_accum: > 1 keeps gradients alive through the next forward; 1
            frees them after each step. Default the recipe's.
        distributed (str): train.distributed: "ddp" (every GPU holds everything) or "fsdp" (base,
            adapters, gradients and optimizer state sharded; see estimate_parallel). Default "ddp".
        offload_activations (bool): model.offload_activations: layer inputs wait in host memory.
        tiled_mlp (int | str): model.tiled_mlp: 0, N tiles or "auto".
        nproc (int): data-parallel processes (`run --nproc`); the estimate is per GPU (the largest
            rank). Default 1.
        device (str): "cuda" (bool dropout masks) or "cpu" (masks in bf16). Default "cuda".
        objective (str): train.objective; "dpo" and "orpo" train micro_batch_size pairs, two
            sequences each. DPO's reference pass adds no moment: a forward under no_grad keeps one
            layer's temporaries, less than the policy's backward (measured, tests/memory). Default "sft".
    """

    max_seq_len: int = 2048
    micro_batch_size: int = TrainConfig.micro_batch_size
    r: int = LoraConfig.r
    dropout: float = LoraConfig.dropout
    dtype: str = LoraConfig.dtype
    use_dora: bool = LoraConfig.use_dora
    optimizer: str = TrainConfig.optimizer
    loss_chunk_size: int = TrainConfig.loss_chunk_size
    grad_accum: int = TrainConfig.grad_accum
    distributed: str = STRATEGIES[0]
    offload_activations: bool = ModelConfig.offload_activations
    tiled_mlp: int | str = ModelConfig.tiled_mlp
    nproc: int = 1
    device: str = "cuda"
    objective: str = TrainConfig.objective

    def __post_init__(self):
        if self.dtype not in LORA_DTYPES:
            raise QloraError(f"lora.dtype {self.dtype!r} must be one of {', '.join(LORA_DTYPES)}.")

    @property
    def lora_bytes(self) -> int:
        """Bytes per adapter element."""
        return torch_dtype(self.dtype).itemsize

    @property
    def sequences(self) -> int:
        """Sequences per micro-batch: a preference pair is its chosen and its rejected."""
        return self.micro_batch_size * (1 if self.objective == "sft" else 2)

    @property
    def fused(self) -> bool:
        """Whether the LoRA linears run fused (lora/fused.py): adapters in the bf16 compute dtype, no DoRA."""
        return self.dtype == "bfloat16" and not self.use_dora

    @property
    def flat(self) -> bool:
        """Whether the optimizer steps the adapters as flat buffers (all but FSDP's shards)."""
        return not (self.distributed == "fsdp" and self.nproc > 1)

    def recipe_values(self) -> dict:
        """The settings under their recipe keys ("lora.r": 16, ...), as the estimate's JSON shows them."""
        return {RECIPE_KEYS.get(k, k): v for k, v in asdict(self).items()}


# Settings' fields that are recipe keys; nproc and device are not in a recipe.
RECIPE_KEYS = {"max_seq_len": "data.max_seq_len", "micro_batch_size": "train.micro_batch_size", "r": "lora.r",
               "dropout": "lora.dropout", "dtype": "lora.dtype", "use_dora": "lora.use_dora",
               "optimizer": "train.optimizer", "loss_chunk_size": "train.loss_chunk_size",
               "grad_accum": "train.grad_accum", "distributed": "train.distributed",
               "offload_activations": "model.offload_activations", "tiled_mlp": "model.tiled_mlp",
               "objective": "train.objective"}


def settings_from_recipe(recipe: Recipe, max_seq_len: int | None = None, device: str = "cuda",
                         nproc: int = 1) -> Settings:
    """The Settings a recipe trains with.

    Args:
        recipe (Recipe): the recipe.
        max_seq_len (int | None): default the recipe's data.max_seq_len (2048 without data).
        device (str): "cuda" or "cpu". Default "cuda".
        nproc (int): data-parallel processes. Default 1.
    """
    values = {}
    for field, key in RECIPE_KEYS.items():
        section, name = key.split(".")
        part = getattr(recipe, section)
        if part is not None:
            values[field] = getattr(part, name)
    values["distributed"] = values.get("distributed") or STRATEGIES[0]
    if max_seq_len:
        values["max_seq_len"] = max_seq_len
    return Settings(**values, nproc=nproc, device=device)


def settings_for(model: str | None, recipe_path: str | None = None, overrides=(), nproc: int = 1,
                 device: str = "cuda") -> tuple[str, Settings]:
    """`qlora-lite estimate`'s (model, Settings): a recipe file and `--set` overrides, checked as
    `run` checks them, so a setting has its recipe name and its recipe checks everywhere.

    Args:
        model (str | None): the model to estimate; default the recipe's model.name_or_path.
        recipe_path (str | None): a recipe YAML. Default None: the recipe defaults, with
            2048-token samples (the estimate reads no data).
        overrides (iterable[str]): `section.key=value`, as `run --set`.
        nproc (int): data-parallel processes. Default 1.
        device (str): "cuda" or "cpu". Default "cuda".
    """
    from ..recipe import FSDP_OPTIMIZERS, apply_overrides, load_recipe, recipe_from_dict

    if recipe_path is not None:
        recipe = load_recipe(recipe_path, overrides)
        chose_optimizer = True
    else:
        if model is None:
            raise QloraError("estimate needs a MODEL or --recipe.")
        raw = apply_overrides({"model": {"name_or_path": model}, "data": {"path": "-", "max_seq_len": 2048}},
                              list(overrides))
        chose_optimizer = "optimizer" in (raw.get("train") or {})
        recipe = recipe_from_dict(raw)
    if recipe.train.distributed == "fsdp" and nproc > 1 and not chose_optimizer:
        recipe.train.optimizer = FSDP_OPTIMIZERS[0]  # the one FSDP runs
    return model or recipe.model.name_or_path, settings_from_recipe(recipe, device=device, nproc=nproc)


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


def adapter_inputs(a: Arch, s: Settings) -> list[int]:
    """The width of each input a layer's adapters drop out and keep: one per linear, or with the
    fused path one per set of linears that read one input (q/k/v, o, gate/up, down)."""
    q, h, i = a.num_attention_heads * a.head_dim, a.hidden_size, a.intermediate_size
    return [h, q, h, i] if s.fused else [d_in for d_in, _, _ in layer_linears(a)]


def nf4_bytes(n: int) -> int:
    """Bytes of an n-element NF4 weight with double quantization: 4 bits + uint8 absmax per
    64 + fp32 absmax per 256 blocks + constants (about 4.127 bits per parameter)."""
    blocks = math.ceil(n / NF4_BLOCK)
    return n // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_CONSTANTS


def optimizer_bytes(kind: str, numels: list[int], elem_bytes: int = BF16, fp32_state: bool = False) -> int:
    """Optimizer state for trainable tensors of `numels` elements.

    Args:
        kind (str): "paged_adamw_8bit" / "adamw_8bit" (bnb blockwise 8-bit), "paged_adamw_32bit"
            / "adamw32" (fp32 state), "adamw" (torch: state in the parameter dtype + a step scalar).
        numels (list[int]): elements per trainable tensor.
        elem_bytes (int): parameter dtype size (torch AdamW). Default 2.
        fp32_state (bool): a bnb 8-bit optimizer keeps 32-bit state for these whatever their
            size (train/flat.py's small-tensor buffer). Default False.
    """
    if kind == "adamw":
        return sum(2 * elem_bytes * n + 4 for n in numels)
    if kind.endswith("8bit") and not fp32_state:
        big = [n for n in numels if n >= OPT8_MIN_SIZE]
        small = sum(8 * n for n in numels if n < OPT8_MIN_SIZE)
        return small + sum(2 * n + 2 * 4 * math.ceil(n / OPT8_BLOCK) for n in big) + (OPT8_QMAPS if big else 0)
    return sum(8 * n for n in numels)


def flat_bytes(kind: str, numels: list[int], elem_bytes: int) -> tuple[int, int]:
    """(parameter bytes, optimizer state bytes) of adapter tensors of `numels` stepped as flat
    buffers (train/flat.py: 8-bit tensors padded to whole 256-element blocks, small ones in a
    32-bit-state buffer); the gradient buffers are as large as the parameter ones."""
    eight_bit = kind.endswith("8bit")
    buffers = buffer_numels(numels, eight_bit)
    state = sum(optimizer_bytes(kind, [n], elem_bytes, fp32_state=small) for small, n in buffers.items())
    return elem_bytes * sum(buffers.values()), state
