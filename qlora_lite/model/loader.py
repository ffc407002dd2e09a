"""Load the base model: NF4 through transformers' bitsandbytes integration, frozen.

Every linear layer except `lm_head` is quantized; embeddings and norms stay in the
compute dtype. Weights are read from safetensors only, and modelling code shipped
with a checkpoint runs only when the recipe sets `trust_remote_code: true`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import QloraError
from ..ops.rms_norm import use_rms_norm_function
from ..recipe import ModelConfig, QuantizationConfig
from ..utils import env
from ..utils.atomic import atomic_dir
from ..utils.dtypes import torch_dtype
from ..utils.host_memory import copy_mapped_weights
from ..utils.libraries import quiet_progress_bars
from . import tiny

TINY_PREFIX = "qlora-lite:"


def cache_root() -> Path:
    """Where locally built models live: $QLORA_LITE_CACHE or ~/.cache/qlora-lite."""
    return Path(os.environ.get("QLORA_LITE_CACHE", Path.home() / ".cache" / "qlora-lite"))


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, a Hub id (returned as is), or `qlora-lite:<name>` built locally."""
    if name_or_path.startswith(TINY_PREFIX):
        return str(builtin_model(name_or_path[len(TINY_PREFIX):]))
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise QloraError(f"Model folder {str(p)!r} has no config.json; point model.name_or_path "
                             "at a Hugging Face model folder (config.json + *.safetensors).")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise QloraError(f"Model folder {name_or_path!r} does not exist; check model.name_or_path.")
    return name_or_path


def builtin_model(name: str) -> Path:
    """Build (once) and return the folder of a model qlora-lite makes locally.

    The folder name carries a hash of the builder's source and of what its tokenizer is trained
    on (the demo rows in their template), so a changed builder never serves a stale cached model.
    """
    import hashlib
    import inspect

    from ..data import demo_rows, templates

    if name != "tiny-llama":
        raise QloraError(f"Unknown built-in model {TINY_PREFIX}{name}; the built-in model is {TINY_PREFIX}tiny-llama.")
    source = "".join(inspect.getsource(m) for m in (tiny, demo_rows, templates))
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = cache_root() / "models" / f"{name}-{digest}"
    if not (path / "config.json").is_file():
        with atomic_dir(path, overwrite=True) as tmp:
            tiny.build_tiny_llama(tmp)
    return path


def bnb_config(q: QuantizationConfig):
    """The transformers BitsAndBytesConfig for a recipe's quantization section (None for 16-bit)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 16:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QloraError("Device 'cuda' was asked for (train.device or --device) but no CUDA GPU is visible; "
                         "use auto or cpu.")
    return device


def load_model(cfg: ModelConfig, device: str = "cpu"):
    """Load the base causal LM, quantized per `cfg.quantization`, every parameter frozen.

    Args:
        cfg (ModelConfig): model section of the recipe.
        device (str): "cpu" or "cuda". Default "cpu".
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name_or_path)
    q = cfg.quantization
    quiet_progress_bars()  # no "Loading weights" bar inside our own log
    quant = bnb_config(q)  # blocksize 64, the only one recipe.BLOCKSIZES accepts
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            quantization_config=quant,
            dtype=torch_dtype(q.compute_dtype),
            device_map={"": 0 if device == "cuda" else device},
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            low_cpu_mem_usage=True,
            # No layer kernels from the Hub (the `kernels` package, on by default where it is
            # installed): that is code downloaded at run time, and `model.train()` would re-kernelize
            # and put back the forwards that use_rms_norm_function and tiled_mlp replace.
            use_kernels=False,
        )
    except OSError as e:
        raise QloraError(f"Could not load model {cfg.name_or_path!r}: {e}") from None
    copy_mapped_weights(model)  # lets the weights file's mapping go (utils/host_memory.py)
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_weight_packing(model)
    if env.enabled(env.FUSED):
        use_rms_norm_function(model)  # before tiled_mlp, which wraps the norms' forward
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    apply_long_context(model, cfg)
    return model


def apply_long_context(model, cfg: ModelConfig) -> None:
    """Offloaded checkpoints and the tiled MLP, as the recipe asks (see model/offload.py, model/tiled_mlp.py)."""
    if cfg.offload_activations:
        from .offload import offload_checkpoints

        offload_checkpoints(model)
    if cfg.tiled_mlp:
        from .tiled_mlp import tile_mlps

        tile_mlps(model, cfg.tiled_mlp)


def disable_cpu_weight_packing(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights on the first eval forward on CPU.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad converts its
    weight in place to a packed layout with bf16-rounded absmax: later forwards no longer
    compute what training computed, `dequantize_4bit` returns wrong values, and backward
    through the packed kernel gives zero input gradients (silently). We evaluate and
    generate mid-training, so the weights must stay as trained.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing: gradients reach the adapters even though the
    inputs of each block (embeddings of a frozen model) do not require grad, so no
    `enable_input_require_grads` hook and no "none of the inputs have requires_grad" warning."""
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed the method; the old name still works but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise QloraError(f"Could not load the tokenizer of {cfg.name_or_path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
