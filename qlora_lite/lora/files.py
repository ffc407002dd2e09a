"""Adapter files in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`, and our
own settings beside them in `qlora_lite.json`.

Keys are `base_model.model.<module path>.lora_A.weight` (and `lora_B`, and DoRA's
`lora_magnitude_vector`), as PEFT saves them, so `peft.PeftModel.from_pretrained` loads ours
and we load PEFT's. adapter_config.json holds PEFT's `LoraConfig` fields only: a field PEFT does
not know makes it warn that the adapter comes from a newer PEFT and to upgrade, which is wrong
advice. Adapters written before the sidecar carry our settings under a `qlora_lite` key in
adapter_config.json; they are still read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import QloraError
from ..recipe import LoraConfig
from ..utils.atomic import atomic_write_bytes, atomic_write_json
from ..utils.dtypes import dtype_name, torch_dtype
from ..utils.readers import read_json, read_safetensors
from .layer import LoRALinear, attach_lora, lora_modules, lora_state_dict

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SIDECAR_NAME = "qlora_lite.json"  # our settings of the adapter (its dtype), which PEFT has no field for
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight$")
# DoRA's magnitude: PEFT saves `<module>.lora_magnitude_vector` (in memory `.default.weight`).
_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_magnitude_vector)(?:\.default\.weight)?$")
# Where adapters written before SIDECAR_NAME keep our settings inside adapter_config.json.
OWN_KEY = "qlora_lite"
# safetensors dtype tags of adapters PEFT wrote without OWN_KEY (PEFT trains fp32 adapters).
_STORED_DTYPES = {"BF16": "bfloat16", "F32": "float32"}
ADAPTER_FIX = ("copy the adapter folder again from where it came from, or use the adapter of one of the "
               "run's checkpoints (checkpoints/step-N/adapter)")


def adapter_config_dict(cfg: LoraConfig, targets: list[str], base_model_name_or_path: str) -> dict:
    """The adapter_config.json fields PEFT reads for a plain LoRA adapter (PEFT's own fields only).

    Args:
        cfg (LoraConfig): the adapter hyperparameters.
        targets (list[str]): adapted module paths.
        base_model_name_or_path (str): recorded for loaders.
    """
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": suffixes,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": cfg.use_dora,
        "revision": None,
    }


def save_adapter(model, out_dir: str | Path, cfg: LoraConfig, base_model_name_or_path: str,
                 state: dict | None = None) -> int:
    """Write the adapter (atomically, file by file). Returns the weights file size in bytes.

    Args:
        model (nn.Module): a model with LoRALinear layers.
        out_dir (str | Path): folder to write into (created).
        cfg (LoraConfig): the adapter hyperparameters.
        base_model_name_or_path (str): recorded for loaders.
        state (dict | None): the adapter tensors, gathered when the model holds shards (FSDP).
            Default None: lora_state_dict(model).
    """
    out = Path(out_dir)
    state = lora_state_dict(model) if state is None else state
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in state.items()}
    if not tensors:
        raise QloraError("The model has no LoRA layers to save.")
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    dtype = dtype_name(next(iter(tensors.values())).dtype)
    atomic_write_json(out / CONFIG_NAME, adapter_config_dict(cfg, list(lora_modules(model)), base_model_name_or_path))
    atomic_write_json(out / SIDECAR_NAME, {"lora_dtype": dtype})
    return len(blob)


def read_own_settings(adapter_dir: Path, raw: dict, fix: str = ADAPTER_FIX) -> dict:
    """Our settings of an adapter: qlora_lite.json, else the `qlora_lite` key of older adapter configs, else {}."""
    path = adapter_dir / SIDECAR_NAME
    return read_json(path, fix) if path.is_file() else raw.get(OWN_KEY) or {}


def read_adapter_config(adapter_dir: str | Path, fix: str = ADAPTER_FIX) -> tuple[LoraConfig, dict]:
    """(LoraConfig, raw adapter_config.json) of a PEFT-format adapter folder.

    Args:
        adapter_dir (str | Path): the folder.
        fix (str): what to tell the user when the file is damaged. Default ADAPTER_FIX.
    """
    d = Path(adapter_dir)
    path = d / CONFIG_NAME
    if not path.is_file():
        raise QloraError(f"{str(path)!r} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    raw = read_json(path, fix)
    if raw.get("peft_type", "LORA") != "LORA":
        raise QloraError(f"{str(path)!r}: peft_type {raw['peft_type']!r} is not supported, only LORA.")
    for key, ok in (("bias", "none"),):
        if raw.get(key, ok) != ok:
            raise QloraError(f"{str(path)!r}: {key}={raw[key]!r} is not supported (needs {ok!r}).")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise QloraError(f"{str(path)!r}: per-module rank_pattern/alpha_pattern are not supported.")
    tm = raw.get("target_modules") or "all-linear"
    dtype = read_own_settings(d, raw, fix).get("lora_dtype") or _stored_dtype(d)
    try:
        cfg = LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                         dropout=float(raw.get("lora_dropout") or 0.0),
                         target_modules=sorted(tm) if isinstance(tm, (list, set)) else tm,
                         rslora=bool(raw.get("use_rslora", False)), dtype=dtype,
                         use_dora=bool(raw.get("use_dora", False)))
    except KeyError as e:
        raise QloraError(f"{str(path)!r} has no {e.args[0]!r}, which every LoRA adapter config has; {fix}") from None
    except (TypeError, ValueError) as e:
        raise QloraError(f"{str(path)!r}: {e}; {fix}") from None
    return cfg, raw


def _stored_dtype(adapter_dir: Path) -> str:
    """The adapter dtype of a folder without our record: its tensors' (bf16 or fp32), else bfloat16."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        return "bfloat16"
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            tag = f.get_slice(keys[0]).get_dtype() if keys else ""
    except Exception:  # a damaged file is named by read_adapter_weights, which reads it next
        return "bfloat16"
    return _STORED_DTYPES.get(tag, "bfloat16")


def read_adapter_weights(adapter_dir: str | Path, fix: str = ADAPTER_FIX) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B}} from the adapter's safetensors file.

    Args:
        adapter_dir (str | Path): the folder.
        fix (str): what to tell the user when the file is damaged. Default ADAPTER_FIX.
    """
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise QloraError(f"{str(path)!r} not found; only safetensors adapters are read (no pickle).")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_safetensors(path, fix).items():
        m = _KEY.match(key) or _MAGNITUDE_KEY.match(key)
        if m is None:
            raise QloraError(f"{str(path)!r}: unexpected tensor {key!r}; only LoRA A/B weights "
                             "(and DoRA magnitudes) are supported.")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in modules.items():
        if not {"lora_A", "lora_B"} <= set(ab):
            raise QloraError(f"{str(path)!r}: module {name!r} has {sorted(ab)} but needs lora_A and lora_B.")
    return modules


def check_adapter_fits(model, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Raise QloraError naming the first module whose name or shapes do not match the base."""
    names = dict(model.named_modules())
    for name, ab in weights.items():
        m = names.get(name)
        if m is None:
            raise QloraError(f"Adapter module {name!r} does not exist in the base model; "
                             "was the adapter trained on another model?")
        base = m.base if isinstance(m, LoRALinear) else m
        d_in, d_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
        r = ab["lora_A"].shape[0]
        want_a, want_b = (r, d_in), (d_out, r)
        if tuple(ab["lora_A"].shape) != want_a or tuple(ab["lora_B"].shape) != want_b:
            raise QloraError(
                f"Adapter does not fit module {name!r}: adapter lora_A {tuple(ab['lora_A'].shape)} / "
                f"lora_B {tuple(ab['lora_B'].shape)}, base needs {want_a} / {want_b} "
                f"(base linear is {d_in} -> {d_out}); was the adapter trained on another model?")
        mag = ab.get("lora_magnitude_vector")
        if mag is not None and tuple(mag.shape) != (d_out,):
            raise QloraError(f"Adapter does not fit module {name!r}: DoRA magnitude {tuple(mag.shape)}, "
                             f"base needs ({d_out},); was the adapter trained on another model?")


def load_adapter(model, adapter_dir: str | Path, dtype: torch.dtype | None = None,
                 fix: str = ADAPTER_FIX) -> LoraConfig:
    """Attach (if needed) and fill LoRA layers from a PEFT-format adapter folder.

    Args:
        model (nn.Module): the base model, with or without LoRA layers already attached.
        adapter_dir (str | Path): folder with adapter_config.json + adapter_model.safetensors.
        dtype (torch.dtype | None): adapter dtype in memory; default the one the adapter was
            trained in (adapter_config.json's record, else its tensors' dtype).
        fix (str): what to tell the user when a file is damaged. Default ADAPTER_FIX.
    """
    cfg, _ = read_adapter_config(adapter_dir, fix)
    weights = read_adapter_weights(adapter_dir, fix)
    check_adapter_fits(model, weights)
    existing = lora_modules(model)
    if not existing:
        attach_lora(model, cfg, targets=[n for n, _ in model.named_modules() if n in weights],
                    dtype=dtype or torch_dtype(cfg.dtype))
        existing = lora_modules(model)
    elif set(existing) != set(weights):
        missing = sorted(set(existing) - set(weights)) or sorted(set(weights) - set(existing))
        raise QloraError(f"Adapter and model disagree on adapted modules, first: {missing[0]!r}.")
    with torch.no_grad():
        for name, m in existing.items():
            m.lora_A.weight.copy_(weights[name]["lora_A"])
            m.lora_B.weight.copy_(weights[name]["lora_B"])
            m.scale = cfg.scale
            if (m.lora_magnitude_vector is None) != ("lora_magnitude_vector" not in weights[name]):
                raise QloraError(f"Adapter and model disagree on DoRA for module {name!r} (use_dora).")
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.copy_(weights[name]["lora_magnitude_vector"])
    return cfg
