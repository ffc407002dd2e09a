"""Recipes: YAML files loaded into typed dataclasses, validated before any model loads.

Every field is documented here and in docs/recipes.md. Unknown keys, wrong types and
out-of-range values fail with a `RecipeError` naming the section, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import QloraError
from .utils.atomic import atomic_write_text
from .utils.dtypes import COMPUTE_DTYPES, LORA_DTYPES
from .utils.units import parse_duration


class RecipeError(QloraError):
    """A recipe that cannot run: the message names the field and the fix."""


# transformers' BitsAndBytesConfig has no blocksize: the loader quantizes with 64.
BLOCKSIZES = (64,)


@dataclass
class QuantizationConfig:
    """How the frozen base is stored.

    Args:
        bits (int): 4 for NF4/FP4 through bitsandbytes, 16 for an unquantized bf16 base
            (plain LoRA). Default 4.
        quant_type (str): "nf4" (QLoRA) or "fp4". Default "nf4".
        double_quant (bool): also quantize the per-block absmax constants (saves ~0.37
            bits/param). Default True.
        compute_dtype (str): dtype of the matmuls, "bfloat16", "float16" (GPUs without
            bf16, e.g. T4/V100) or "float32" (exact comparisons on CPU; slow). Default "bfloat16".
        blocksize (int): elements per quantization block; only 64, which transformers'
            bitsandbytes integration fixes. Default 64.
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64

    def __post_init__(self):
        _check_choice("model.quantization.bits", self.bits, (4, 16))
        _check_choice("model.quantization.quant_type", self.quant_type, ("nf4", "fp4"))
        _check_choice("model.quantization.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("model.quantization.blocksize", self.blocksize, BLOCKSIZES)


@dataclass
class ModelConfig:
    """The base model.

    Args:
        name_or_path (str): a local Hugging Face model folder, a Hub id, or
            "qlora-lite:tiny-llama" (a tiny Llama built locally for the CPU demo and tests).
        revision (str | None): Hub revision (branch, tag or commit). Default None.
        trust_remote_code (bool): run modelling code shipped with the checkpoint. Default False.
        gradient_checkpointing (bool): recompute activations in backward. Default True.
        offload_activations (bool): keep each decoder layer's checkpointed input in (pinned)
            host memory between forward and backward, prefetched back for its recompute; needs
            gradient_checkpointing. Frees layers x tokens x hidden x 2 bytes of device memory
            for as much host RAM (see `qlora-lite estimate --set model.offload_activations=true`). Default False.
        tiled_mlp (int | str): run each MLP (and the RMSNorms) over this many tiles of tokens
            (forward, recompute and backward), or "auto" for tiles of hidden_size tokens (at
            least 1024); 0 is off. Bounds the MLP intermediates at long context. Default 0.
        quantization (QuantizationConfig): the `model.quantization` section below.
    """

    name_or_path: str = ""
    revision: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    tiled_mlp: int | str = 0
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def __post_init__(self):
        if not self.name_or_path:
            raise RecipeError("model.name_or_path is required: a local model folder or a Hub id.")
        if self.offload_activations and not self.gradient_checkpointing:
            raise RecipeError("model.offload_activations offloads the checkpointed layer inputs, so it needs "
                              "model.gradient_checkpointing: true.")
        if self.tiled_mlp != "auto" and not (isinstance(self.tiled_mlp, int) and self.tiled_mlp >= 0):
            raise RecipeError(f"model.tiled_mlp must be 0 (off), a number of tiles >= 1, or 'auto'; "
                              f"got {self.tiled_mlp!r}.")


@dataclass
class LoraConfig:
    """The adapters: W = W0 + scale * B @ A with scale = alpha / r (or alpha / sqrt(r)).

    Args:
        r (int): rank. Default 16.
        alpha (float): scaling numerator; usually 2*r. Default 32.
        dropout (float): dropout on the adapter input, in [0, 1). Default 0.05.
        target_modules (str | list[str]): "all-linear" (every linear but lm_head) or a list
            of module-name suffixes such as ["q_proj", "v_proj"]. Default "all-linear".
        rslora (bool): rank-stabilised scale alpha / sqrt(r). Default False.
        dtype (str): adapter parameter dtype, "bfloat16" or "float32" (PEFT's default: keeps
            tiny late-schedule updates that bf16 rounds away, at 2x the adapter memory).
            Recorded in the adapter's qlora_lite.json, so generate and export --verify load the adapter
            in it; `estimate --set lora.dtype=float32` counts it. Default "bfloat16".
        use_dora (bool): DoRA: a trainable magnitude per output row on top of the LoRA
            direction (QDoRA on a 4-bit base; lora/dora.py). Default False.
        init_from (str | None): start from an existing adapter: a run folder (its adapter/) or an
            adapter folder, made with the same r, alpha, targets and DoRA setting. Under DPO it
            is also the reference, frozen, while a trainable copy of it learns. Default None
            (fresh adapters; DPO's reference is the base with the adapters disabled).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    rslora: bool = False
    dtype: str = "bfloat16"
    use_dora: bool = False
    init_from: str | None = None

    def __post_init__(self):
        _check_positive("lora.r", self.r)
        _check_choice("lora.dtype", self.dtype, LORA_DTYPES)
        _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                self.target_modules = [tm]
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
            raise RecipeError(
                f"lora.target_modules must be 'all-linear' or a non-empty list of module names, got {tm!r}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


@dataclass
class DataConfig:
    """Training data.

    Args:
        path (str): a local .json/.jsonl/.parquet/.csv file or a Hub data set id.
        split (str): split to read from a Hub data set. Default "train".
        format (str): "auto", "alpaca", "sharegpt", "messages" or "completion" (SFT), or
            "preference" or "hh" (pairs for train.objective dpo/orpo; data/preference.py).
            Default "auto".
        text_field (str): the text column for "completion" data. Default "text".
        chat_template (str | None): None uses the tokenizer's chat template when it has one and
            the Alpaca template otherwise; "alpaca" forces the Alpaca template; any other
            string is a Jinja chat template. Default None.
        train_on (str): "responses" (loss on assistant turns only) or "all". Default "responses".
        max_seq_len (int): tokens per sample; longer samples are truncated and counted.
            Default 512.
        eval_split (float): fraction of rows held out for eval when eval_path is unset.
            Default 0.05.
        eval_path (str | None): a separate eval file. Default None.
        max_samples (int | None): use only the first N rows (smoke tests). Default None.
        packing (bool): pack several samples per row, attention kept within each sample.
            Default False.
        group_by_length (bool): batch samples of similar length (non-packed). Default True.
    """

    path: str = ""
    split: str = "train"
    format: str = "auto"
    text_field: str = "text"
    chat_template: str | None = None
    train_on: str = "responses"
    max_seq_len: int = 512
    eval_split: float = 0.05
    eval_path: str | None = None
    max_samples: int | None = None
    packing: bool = False
    group_by_length: bool = True

    def __post_init__(self):
        if not self.path:
            raise RecipeError("data.path is required: a local data file or a Hub data set id.")
        _check_choice("data.format", self.format,
                      ("auto", "alpaca", "sharegpt", "messages", "completion", "preference", "hh"))
        _check_choice("data.train_on", self.train_on, ("responses", "all"))
        _check_positive("data.max_seq_len", self.max_seq_len)
        if not 0 <= self.eval_split < 1:
            raise RecipeError(f"data.eval_split must be in [0, 1), got {self.eval_split!r}.")
        if self.max_samples is not None:
            _check_positive("data.max_samples", self.max_samples)


@dataclass
class TrainConfig:
    """The optimisation loop.

    Args:
        seed (int): seeds Python, torch and data order. Default 42.
        epochs (int): passes over the data when max_steps is unset. Default 1.
        max_steps (int | None): optimizer steps; overrides epochs. Default None.
        max_time (str | float | None): wall-clock budget of one process, e.g. "3h50m", "90m",
            "45s" or seconds: the run stops with a checkpoint before it would run past it, and
            `--resume auto` goes on (docs/runs.md, "A time budget"). Default None (no limit).
        micro_batch_size (int): samples per forward. Default 1.
        grad_accum (int): micro-batches per optimizer step. Default 16.
        lr (float): peak learning rate. Default 2e-4.
        weight_decay (float): AdamW weight decay. Default 0.0.
        lr_scheduler (str): "cosine", "linear" or "constant". Default "cosine".
        warmup_steps (int): linear warmup steps. Default 10.
        max_grad_norm (float): clip threshold; 0 disables clipping. Default 1.0.
        optimizer (str): "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit" or "adamw".
            Default "paged_adamw_8bit".
        log_every (int): steps between log records. Default 10.
        eval_every (int): steps between evals; 0 evaluates only at the end. Default 100.
        eval_max_batches (int | None): cap on eval batches per eval. Default None.
        save_every (int): steps between checkpoints; 0 disables. Default 100.
        keep_last (int): checkpoints kept. Default 2.
        loss_chunk_size (int): tokens per chunk of the chunked cross-entropy; 0 computes
            the plain loss over full fp32 logits. Default 1024.
        device (str): "auto" (CUDA when available), "cuda" or "cpu". Default "auto".
        report_to (list[str]): experiment trackers that also get the metrics, each an extra:
            "tensorboard", "wandb", "mlflow" (train/tracking.py). Default [] (metrics.jsonl only).
        distributed (str | None): with several processes (torchrun): "ddp" (every rank holds
            the 4-bit base, adapter gradients summed) or "fsdp" (base and adapters sharded).
            Default None (ddp when there is more than one process; ignored with one).
        objective (str): "sft" (next-token cross-entropy), "dpo" or "orpo" (preference pairs:
            data with chosen and rejected; train/objectives.py). Default "sft".
        beta (float): DPO's and ORPO's beta: how far DPO may move from the reference, the
            weight of ORPO's odds-ratio term. Default 0.1.
        label_smoothing (float): conservative DPO: the share of pairs assumed mislabelled, in
            [0, 0.5) (sigmoid loss only). Default 0.0.
        loss_type (str): DPO's loss, "sigmoid" (DPO) or "ipo" (IPO, length-normalised as TRL's).
            Default "sigmoid".
        precompute_reference (bool): DPO: compute the reference log-probs of every pair once
            before training (kept in the run folder), so a step runs the policy only. Default False.
        sample_prompts (list[str] | int): prompts answered with the adapter on before training
            and at every eval (train/samples.py): a list of prompts, or N for the first N eval
            rows' prompts. Default [] (none).
        sample_max_new_tokens (int): most tokens per sample answer, which bounds the time
            sampling adds to an eval. Default 64.
        sample_temperature (float): 0 answers greedily; > 0 samples (seeded by train.seed).
            Default 0.0.
    """

    seed: int = 42
    epochs: int = 1
    max_steps: int | None = None
    max_time: str | float | None = None
    micro_batch_size: int = 1
    grad_accum: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    optimizer: str = "paged_adamw_8bit"
    log_every: int = 10
    eval_every: int = 100
    eval_max_batches: int | None = None
    save_every: int = 100
    keep_last: int = 2
    loss_chunk_size: int = 1024
    device: str = "auto"
    report_to: Any = field(default_factory=list)
    distributed: str | None = None
    objective: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    precompute_reference: bool = False
    sample_prompts: Any = field(default_factory=list)
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.0

    @property
    def max_time_s(self) -> float | None:
        """train.max_time in seconds, None when unset."""
        if self.max_time is None:
            return None
        try:
            return parse_duration(self.max_time, "train.max_time")
        except QloraError as e:
            raise RecipeError(str(e)) from None

    def __post_init__(self):
        _check_positive("train.epochs", self.epochs)
        if self.max_steps is not None:
            _check_positive("train.max_steps", self.max_steps)
        if self.max_time is not None:
            self.max_time_s  # checks it reads as a duration
        _check_positive("train.micro_batch_size", self.micro_batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.lr", self.lr)
        _check_nonnegative("train.weight_decay", self.weight_decay)
        _check_choice("train.lr_scheduler", self.lr_scheduler, SCHEDULES)
        _check_nonnegative("train.warmup_steps", self.warmup_steps)
        _check_nonnegative("train.max_grad_norm", self.max_grad_norm)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_positive("train.log_every", self.log_every)
        _check_nonnegative("train.eval_every", self.eval_every)
        if self.eval_max_batches is not None:
            _check_positive("train.eval_max_batches", self.eval_max_batches)
        _check_nonnegative("train.save_every", self.save_every)
        _check_positive("train.keep_last", self.keep_last)
        _check_nonnegative("train.loss_chunk_size", self.loss_chunk_size)
        _check_choice("train.device", self.device, ("auto", "cuda", "cpu"))
        if self.report_to in (None, "none"):
            self.report_to = []
        elif isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if not isinstance(self.report_to, list):
            raise RecipeError(f"train.report_to must be a list of {', '.join(TRACKERS)}, got {self.report_to!r}.")
        for name in self.report_to:
            _check_choice("train.report_to entry", name, TRACKERS)
        if self.distributed is not None:
            _check_choice("train.distributed", self.distributed, STRATEGIES)
        _check_choice("train.objective", self.objective, OBJECTIVES)
        _check_positive("train.beta", self.beta)
        _check_choice("train.loss_type", self.loss_type, DPO_LOSSES)
        if not 0 <= self.label_smoothing < 0.5:
            raise RecipeError(f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}.")
        if self.objective != "dpo":
            for name, default in (("label_smoothing", 0.0), ("loss_type", "sigmoid"), ("precompute_reference", False)):
                if getattr(self, name) != default:
                    raise RecipeError(f"train.{name} is a DPO setting; set train.objective: dpo or remove it.")
        elif self.loss_type == "ipo" and self.label_smoothing:
            raise RecipeError("train.label_smoothing applies to the sigmoid loss; remove it for train.loss_type: ipo.")
        self._check_samples()

    def _check_samples(self):
        p = self.sample_prompts
        if p is None:
            self.sample_prompts = []
        elif isinstance(p, bool) or not (isinstance(p, int) and p >= 0 or
                                         isinstance(p, list) and all(isinstance(x, str) and x.strip() for x in p)):
            raise RecipeError(f"train.sample_prompts must be a list of non-empty prompts or a number of eval rows "
                              f"(e.g. 3), got {p!r}.")
        _check_positive("train.sample_max_new_tokens", self.sample_max_new_tokens)
        _check_nonnegative("train.sample_temperature", self.sample_temperature)


# The allowed values of train.optimizer (train/optim.py builds each), train.report_to
# (train/tracking.py) and train.distributed (parallel/); the CLI's choices come from here.
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
TRACKERS = ("tensorboard", "wandb", "mlflow")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")
# bitsandbytes' optimizers take plain tensors, not FSDP's DTensors.
FSDP_OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant")


def check_fsdp_optimizer(name: str) -> None:
    """Refuse an optimizer that cannot step FSDP-sharded adapters (checked where the world size is known)."""
    if name not in FSDP_OPTIMIZERS:
        raise RecipeError(f"train.optimizer: {name} does not run on FSDP-sharded adapters (bitsandbytes' "
                          f"optimizers take plain tensors, not DTensors); set train.optimizer: {FSDP_OPTIMIZERS[0]}: "
                          "under FSDP its state is sharded across the ranks anyway.")


@dataclass
class OutputConfig:
    """Where the run goes.

    Args:
        dir (str): the run folder (metrics, checkpoints, adapter, summary). Relative paths
            are taken from the current directory.
    """

    dir: str = "runs/default"


@dataclass
class Recipe:
    """A whole run: model, lora, data, train, output."""

    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig, "output": OutputConfig}
NESTED = {(ModelConfig, "quantization"): QuantizationConfig}


# ---------------------------------------------------------------- checks


def _check_positive(name: str, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{name} must be a number > 0, got {value!r}.")


def _check_nonnegative(name: str, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise RecipeError(f"{name} must be a number >= 0, got {value!r}.")


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise RecipeError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _unknown_key(section: str, key: str, valid) -> RecipeError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else f" Valid keys: {', '.join(sorted(valid))}."
    where = f"section `{section}`" if section else "the top level"
    return RecipeError(f"Unknown key `{key}` in {where}.{hint}")


def _coerce(name: str, value, annotation):
    """Check `value` against a field's type; ints are accepted where floats are expected.

    YAML reads `1e-4` as a string (PyYAML follows YAML 1.1), so numeric strings are
    converted for float fields: that is the typo people make most and it is unambiguous.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(name, value, a)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{name} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{name} must be an integer, got {value!r}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{name} must be a number, got {value!r}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{name} must be a string, got {value!r}.")
    return value


def _build(cls, section: str, raw):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"Section `{section}` must be a mapping of keys to values, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(section, key, fields)
        nested = NESTED.get((cls, key))
        if nested is not None:
            kwargs[key] = _build(nested, f"{section}.{key}", value)
        else:
            kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def recipe_from_dict(raw: dict) -> Recipe:
    """Build and validate a Recipe from a plain dict (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise RecipeError("A recipe must be a YAML mapping with sections model, lora, data, train, output.")
    for key in raw:
        if key not in SECTIONS:
            raise _unknown_key("", key, SECTIONS)
    if "model" not in raw:
        raise RecipeError("The recipe has no `model` section; add `model: {name_or_path: ...}`.")
    parts = {name: _build(cls, name, raw.get(name)) for name, cls in SECTIONS.items() if name in raw}
    return Recipe(**parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` (value read as YAML) into (path, value)."""
    if "=" not in text:
        raise RecipeError(f"--set expects section.key=value, got {text!r} (e.g. --set train.lr=1e-4).")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise RecipeError(f"--set expects section.key=value, got {text!r} (e.g. --set train.lr=1e-4).")
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote it, "
                          "e.g. --set 'data.chat_template=\"...\"'.") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=c` overrides to the parsed YAML, before validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text}: `{part}` is not a section.")
        node[path[-1]] = value
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, validate.

    Args:
        path (str | PathLike): the YAML file.
        overrides (list[str]): `section.key=value` strings. Default ().
    """
    from .utils.readers import read_yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"Recipe file {str(p)!r} not found; pass a path such as recipes/tiny-cpu-sft.yaml.")
    try:
        raw = read_yaml(p, RECIPE_FIX, kind=None) or {}  # BOM and CRLF are fine; recipe_from_dict checks the kind
        return recipe_from_dict(apply_overrides(raw, list(overrides)))
    except QloraError as e:
        # Named by file: a run folder's own recipe.yaml may be the one that is damaged.
        raise RecipeError(str(e) if str(p) in str(e) else f"{p}: {e}") from None


RECIPE_FIX = "fix it, or for a run folder's own recipe.yaml copy the recipe the run was started with over it"


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML (atomically), so a run folder describes itself."""
    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
