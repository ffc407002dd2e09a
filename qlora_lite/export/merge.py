"""Export: merge a LoRA adapter into its base and write a plain Hugging Face model folder.

The merged weight is W + scale * B @ A computed in fp32 and cast once to the export dtype;
it is never quantized again (the quality loss of `merge_and_unload` on a 4-bit model).
W is either the NF4 weight dequantized by bitsandbytes (`base="dequantized"`, exactly what
training saw) or the original checkpoint tensor (`base="original"`, read lazily from its
safetensors). Tensors are produced and written one shard at a time, so peak memory is the
NF4 model plus about two shards, and everything goes into a temporary folder that is renamed
only when complete.
"""

from __future__ import annotations

import datetime
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from ..errors import QloraError
from ..lora.dora import dora_merged_weight
from ..lora.files import check_adapter_fits, read_adapter_config, read_adapter_weights
from ..lora.layer import merged_weight
from ..model.loader import load_model, pick_device, resolve_model_path
from ..model.quant import dequantized, is_4bit, logical_shape
from ..recipe import LoraConfig, ModelConfig
from ..runs.card import export_card_for, write_card
from ..runs.folder import RunSource, resolve_source
from ..runs.lock import owning_run, run_lock
from ..utils.atomic import atomic_dir, atomic_write_json, atomic_write_text, require_space, write_safetensors
from ..utils.dtypes import SHORT_NAMES, torch_dtype
from ..utils.units import parse_size
from . import gguf as gguf_export
from .verify import verify_export, verify_report

EXPORT_DTYPES = tuple(SHORT_NAMES)  # "bf16", "fp16", "fp32"
BASES = ("dequantized", "original")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group keys in order into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def shard_names(n: int) -> list[str]:
    """Hugging Face file names: model.safetensors, or model-0000i-of-0000N.safetensors."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file (a module-level function so tests can make it fail)."""
    write_safetensors(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------- base tensors


def state_keys(model) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) of parameters and persistent buffers, in module order.

    Tied tensors appear once (under their first name), as Hugging Face saves them.
    """
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in mod.named_parameters(recurse=False):
            if id(t) not in seen:
                seen.add(id(t))
                out.append((prefix + name, t))
        for name, t in mod.named_buffers(recurse=False):
            if t is not None and name not in mod._non_persistent_buffers_set and id(t) not in seen:
                seen.add(id(t))
                out.append((prefix + name, t))
    return out


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (single or sharded)."""

    def __init__(self, folder: Path, stack: ExitStack):
        from ..utils.readers import open_safetensors, read_json

        fix = "download the base model again, or export with --base dequantized"
        index = folder / INDEX_NAME
        if index.is_file():
            files = read_json(index, fix).get("weight_map")
            if not isinstance(files, dict):
                raise QloraError(f"{str(index)!r} has no weight_map; {fix}")
        elif (folder / SINGLE_NAME).is_file():
            with open_safetensors(folder / SINGLE_NAME, fix) as f:
                files = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise QloraError(f"--base original needs the base's safetensors files, none in {str(folder)!r}; "
                             "use --base dequantized.")
        self.folder, self.files, self.fix = folder, files, fix
        self.handles = {name: stack.enter_context(open_safetensors(folder / name, fix))
                        for name in sorted(set(files.values()))}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        from ..utils.readers import damaged

        name = self.files[key]
        try:
            return self.handles[name].get_tensor(key)
        except SafetensorError as e:
            raise damaged(self.folder / name, f"reading {key!r}: {e}", self.fix) from None


def local_model_dir(cfg: ModelConfig, weights: bool) -> Path:
    """The base model's local folder (Hub models from the local cache / download)."""
    path = Path(resolve_model_path(cfg.name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.tiktoken"] + (["*.safetensors"] if weights else [])
    return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision, allow_patterns=patterns))


def quantize_device(src: RunSource, device: str = "auto") -> str:
    """Where the base is quantized for a `dequantized` export: on the kind of device the run
    trained on when one is present. The CUDA and CPU NF4 kernels round a few weights to the
    neighbouring code, so this reproduces the NF4 weights training saw exactly.

    Args:
        src (RunSource): the source; its `trained_on`.
        device (str): "auto", "cpu" or "cuda". Default "auto".
    """
    if device != "auto":
        return pick_device(device)
    return "cuda" if src.trained_on == "cuda" and torch.cuda.is_available() else "cpu"


def load_base(cfg: ModelConfig, base: str, device: str = "cpu"):
    """The model whose state is exported: NF4 as in training, or an empty (meta) one for `original`."""
    if base == "dequantized":
        return load_model(cfg, device)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(local_model_dir(cfg, False), trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


# ---------------------------------------------------------------- export


def export_model(source: str | Path, out: str | Path, dtype: str = "bf16", base: str = "dequantized",
                 max_shard_size: str | int = "2GB", model: str | None = None, verify: bool = False,
                 overwrite: bool = False, log=print, device: str = "auto", gguf: str | None = None,
                 gguf_quantizer: str = "qlora-lite") -> dict:
    """Merge the adapter of a run (or a bare adapter) into its base; write a Hugging Face folder.

    Args:
        source (str | Path): run folder or PEFT adapter folder.
        out (str | Path): output folder (must not exist unless `overwrite`).
        dtype (str): "bf16", "fp16" or "fp32". Default "bf16".
        base (str): "dequantized" (NF4 weights training saw) or "original" (checkpoint weights).
            Default "dequantized".
        max_shard_size (str | int): largest shard, e.g. "2GB" (2e9 bytes) or "1GiB"; see utils/units.py.
            Default "2GB".
        model (str | None): base model overriding the one the source names. Default None.
        verify (bool): compare the export's logits with the 4-bit base + adapter. Default False.
        overwrite (bool): replace an existing `out`. Default False.
        log (callable): progress printer. Default print.
        device (str): where the base is quantized and verify runs: "auto" (the kind of device
            the run trained on, when present), "cpu" or "cuda". Default "auto".
        gguf (str | None): also write a GGUF (gguf.GGUF_TYPES: "f16", "bf16", "q8_0" by llama.cpp's
            converter; "q4_0" ... "q4_K_M", "q5_K_M", "q6_K" re-quantized from it) and an Ollama
            Modelfile. Default None.
        gguf_quantizer (str): who re-quantizes: "qlora-lite" (its own writer) or "llama-quantize"
            (llama.cpp's binary, when on PATH). Default "qlora-lite".

    Returns:
        dict: what EXPORT.md records (shards, bytes, merged modules, seconds, verify numbers).
    """
    # A run folder (or a checkpoint in one) that a training process is writing is refused (runs/lock.py).
    run = owning_run(source)
    with run_lock(run, "export", create=False) if run is not None else nullcontext():
        return _export_locked(source, out, dtype, base, max_shard_size, model, verify, overwrite, log, device, gguf,
                              gguf_quantizer)


def _export_locked(source, out, dtype, base, max_shard_size, model, verify, overwrite, log, device, gguf,
                   gguf_quantizer) -> dict:
    """`export_model` with the source's run folder locked."""
    out = Path(out)
    _check_options(dtype, base, out, overwrite)
    max_bytes = parse_size(max_shard_size, "--max-shard-size")
    src = resolve_source(source, model)
    lora_cfg, _ = read_adapter_config(src.adapter_dir)
    adapter = read_adapter_weights(src.adapter_dir)
    out_dtype = torch_dtype(dtype)
    if gguf:
        gguf_export.check_convertible(local_model_dir(src.model, False), gguf, gguf_quantizer)
    t0 = time.perf_counter()

    device = quantize_device(src, device)
    base_model = load_base(src.model, base, device)
    check_adapter_fits(base_model, adapter)
    keys = state_keys(base_model)
    _check_tied_head(base_model, adapter)
    info = {"source": str(source), "kind": src.kind, "base_model": src.model.name_or_path,
            "adapter": str(src.adapter_dir), "base": base, "dtype": dtype,
            "merged_modules": len(adapter), "scale": lora_cfg.scale, "r": lora_cfg.r, "alpha": lora_cfg.alpha,
            "trained_on": src.trained_on, "quantized_on": device,
            "dora": lora_cfg.use_dora}

    with ExitStack() as stack:
        reader = _original_reader(src, keys, stack) if base == "original" else None
        # Before the merge, not after an hour of it.
        require_space(out, sum(logical_shape(t).numel() * _out_dtype(t, out_dtype).itemsize for _, t in keys))
        with atomic_dir(out, overwrite=overwrite) as tmp:
            shards, total = write_shards(tmp, keys, reader, adapter, lora_cfg, out_dtype, max_bytes, log)
            del keys, base_model  # free the 4-bit model before verify loads another
            info["prompt_format"] = write_metadata(tmp, src, out_dtype)
            info.update(shards=shards, total_bytes=total, seconds=round(time.perf_counter() - t0, 1),
                        date=datetime.datetime.now().isoformat(timespec="seconds"))
            if verify:
                info["verify"] = verify_export(tmp, src, device=device)
            if gguf:
                info["gguf"] = gguf_export.write_gguf(tmp, gguf, log, gguf_quantizer)
            atomic_write_text(tmp / "EXPORT.md", export_card(info))
            write_card(tmp, export_card_for(src, lora_cfg, info["gguf"]["file"] if gguf else None))
    return info


def _check_options(dtype: str, base: str, out: Path, overwrite: bool) -> None:
    if dtype not in EXPORT_DTYPES:
        raise QloraError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}.")
    if base not in BASES:
        raise QloraError(f"--base {base!r} is not one of {', '.join(BASES)}.")
    if out.exists() and not overwrite:
        raise QloraError(f"Output folder {str(out)!r} already exists; remove it or choose another --out.")


def _original_reader(src: RunSource, keys: list, stack: ExitStack) -> CheckpointReader:
    """The base checkpoint's tensors, refusing one that lacks any tensor of the model."""
    reader = CheckpointReader(local_model_dir(src.model, True), stack)
    missing = [k for k, _ in keys if k not in reader]
    if missing:
        raise QloraError(f"Tensor {missing[0]!r} is not in the base checkpoint "
                         f"({len(missing)} missing); use --base dequantized.")
    return reader


def write_shards(folder: Path, keys: list, reader, adapter: dict, lora_cfg: LoraConfig, out_dtype: torch.dtype,
                 max_bytes: int, log=print) -> tuple[int, int]:
    """Write the merged tensors shard by shard (plus the index when sharded); (shards, total bytes).

    Args:
        folder (Path): where the shards go.
        keys (list[tuple[str, Tensor]]): `state_keys` of the base model.
        reader (CheckpointReader | None): original weights; None dequantizes the model's own.
        adapter (dict): `read_adapter_weights` of the adapter.
        lora_cfg (LoraConfig): its scale.
        out_dtype (torch.dtype): the export dtype of floating tensors.
        max_bytes (int): largest shard.
        log (callable): progress printer. Default print.
    """
    sizes = [(k, logical_shape(t).numel() * _out_dtype(t, out_dtype).itemsize) for k, t in keys]
    names = shard_names(len(plan := plan_shards(sizes, max_bytes)))
    tensors = dict(keys)
    weight_map = {}
    for shard_keys, fname in zip(plan, names):
        shard = {}
        for key in shard_keys:
            t = tensors[key]
            w = reader.get(key) if reader is not None else dequantized(t)
            # Merged where the base lives (the GPU when quantized there), written from host memory.
            shard[key] = merge_tensor(key, w, adapter, lora_cfg, _out_dtype(t, out_dtype)).cpu()
            del w
        write_shard(shard, folder / fname)
        weight_map.update({k: fname for k in shard_keys})
        log(f"wrote {fname} ({len(shard_keys)} tensors)")
        del shard
    total = sum(n for _, n in sizes)
    if len(names) > 1:
        atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return len(names), total


def _out_dtype(t: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if is_4bit(t) or t.is_floating_point() else t.dtype


def _check_tied_head(model, adapter: dict) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        for name in adapter:
            if model.get_submodule(name) is head:
                raise QloraError(f"Adapter module {name!r} is the output head, which is tied to the input "
                                 "embeddings; merging it would untie them. Retrain without it in target_modules.")


def merge_tensor(key: str, w: torch.Tensor, adapter: dict, lora_cfg: LoraConfig, dtype: torch.dtype) -> torch.Tensor:
    """The export tensor for `key`: merged in fp32 when an adapter targets it, then cast once."""
    module = key[: -len(".weight")] if key.endswith(".weight") else None
    ab = adapter.get(module)
    if ab is None:
        return w.to(dtype).contiguous()
    ab = {k: v.to(w.device) for k, v in ab.items()}  # w is on the GPU when quantized there
    if "lora_magnitude_vector" in ab:
        return dora_merged_weight(w, ab["lora_A"], ab["lora_B"], ab["lora_magnitude_vector"], lora_cfg.scale) \
            .to(dtype).contiguous()
    return merged_weight(w, ab["lora_A"], ab["lora_B"], lora_cfg.scale).to(dtype).contiguous()


def write_metadata(folder: Path, src: RunSource, dtype: torch.dtype) -> str:
    """config.json (no quantization_config, the export dtype), generation_config.json, tokenizer.

    Returns the prompt format the exported tokenizer implies, for EXPORT.md.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    cfg = src.model
    local = local_model_dir(cfg, False)
    config = AutoConfig.from_pretrained(local, trust_remote_code=cfg.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a pre-quantized base names one; the export is not quantized
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(folder)
    try:
        gen = GenerationConfig.from_pretrained(local)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(folder)
    try:
        tok = AutoTokenizer.from_pretrained(local, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError):
        return "no tokenizer in the base folder"  # tests' bare models: nothing to copy
    # The prompt format training used travels with the model: a recipe's own Jinja template,
    # or none at all when the recipe forced Alpaca (the base's template would format differently).
    if src.chat_template == "alpaca":
        tok.chat_template = None
    elif src.chat_template:
        tok.chat_template = src.chat_template
    tok.save_pretrained(folder)
    return "the tokenizer's chat template" if tok.chat_template else "Alpaca (qlora_lite.data.templates.alpaca_prompt)"


def export_card(info: dict) -> str:
    """EXPORT.md: where the weights came from and how they were made."""
    mode = ("NF4 weights dequantized by bitsandbytes (exactly what training saw)" if info["base"] == "dequantized"
            else "original checkpoint weights (the adapter was trained against their NF4 rounding)")
    lines = [
        "# Merged export (qlora-lite)", "",
        f"- base model: `{info['base_model']}`",
        f"- adapter: `{info['adapter']}` ({info['kind']}; r={info['r']}, alpha={info['alpha']:g}, "
        f"scale={info['scale']:g}, {info['merged_modules']} modules merged)",
        f"- base weights: {info['base']} - {mode}",
        f"- NF4 quantized on: {info['quantized_on']} (trained on: {info['trained_on'] or 'unknown'})"
        + (" - not the training device: the CPU and CUDA kernels round a few weights to the neighbouring "
           "NF4 code" if info["trained_on"] and info["trained_on"] != info["quantized_on"].split(":")[0] else ""),
        f"- merge: {'DoRA, m / ||W + scale * B @ A|| * (W + scale * B @ A)' if info.get('dora') else 'W + scale * B @ A'}"
        f" in fp32, cast once to {info['dtype']}; never re-quantized",
        f"- prompt format: {info['prompt_format']}",
        f"- shards: {info['shards']}, {info['total_bytes'] / 1e9:.3f} GB",
        f"- date: {info['date']} ({info['seconds']} s)",
    ]
    v = info.get("verify")
    if v:
        lines += ["", "## Verify (export vs 4-bit base + adapter)", "", verify_report(v)]
    g = info.get("gguf")
    if g:
        types = (f"; tensor types {', '.join(f'{k} {n}' for k, n in g['tensor_types'].items())}, "
                 f"{g['fallbacks']} fell back (rows not a multiple of 256)" if "tensor_types" in g else "")
        lines += ["", f"GGUF ({g['type']}, {g['quantizer']}): `{g['file']}`, {g['bytes'] / 1e6:.1f} MB{types}; "
                  f"Ollama: `ollama create NAME -f Modelfile` (stop: {', '.join(g['stop'])})."]
    lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(<this folder>)`; no bitsandbytes needed.", ""]
    return "\n".join(lines)
