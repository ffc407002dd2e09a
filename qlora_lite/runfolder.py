"""What a run folder and an adapter folder are, for the commands that read them.

A run folder holds the resolved `recipe.yaml` and, once the run finished, `adapter/`; an
adapter folder holds PEFT's `adapter_config.json` + `adapter_model.safetensors`. Export,
verify and generate all start from `resolve_source`, so they agree on what a folder means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .adapter import CONFIG_NAME, read_adapter_config
from .errors import QloraError
from .recipe import ModelConfig, load_recipe

RECIPE_NAME = "recipe.yaml"
ADAPTER_DIR = "adapter"


@dataclass
class RunSource:
    """A base model and the adapter trained on it.

    Args:
        model (ModelConfig): base model, revision and quantization used in training.
        adapter_dir (Path): PEFT-format adapter folder.
        kind (str): "run" (a run folder with recipe.yaml) or "adapter" (a bare adapter).
        chat_template (str | None): the recipe's data.chat_template, None when unknown.
        trained_on (str | None): "cuda" or "cpu", the device the run trained on (its summary.json),
            None when unknown.
    """

    model: ModelConfig
    adapter_dir: Path
    kind: str
    chat_template: str | None = None
    trained_on: str | None = None


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` holds a run's recipe.yaml."""
    return (Path(path) / RECIPE_NAME).is_file()


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter_config.json."""
    return (Path(path) / CONFIG_NAME).is_file()


def trained_on(run_dir: Path) -> str | None:
    """The device kind a run trained on, from its summary.json (None before the run finished)."""
    import json

    try:
        device = json.loads((run_dir / "summary.json").read_text()).get("device")
    except (OSError, ValueError):
        return None
    return device.split(":")[0] if isinstance(device, str) else None


def resolve_source(path: str | Path, model: str | None = None) -> RunSource:
    """Read a run folder (recipe.yaml + adapter/) or a bare PEFT adapter folder.

    Args:
        path (str | Path): the run or adapter folder.
        model (str | None): base model overriding the recipe / adapter_config.json. Default None.
    """
    p = Path(path)
    if is_run_folder(p):
        recipe = load_recipe(p / RECIPE_NAME)
        adapter_dir = p / ADAPTER_DIR
        if not is_adapter_folder(adapter_dir):
            raise QloraError(f"Run folder {str(p)!r} has no {ADAPTER_DIR}/{CONFIG_NAME}: the run has not finished; "
                             f"use a checkpoint instead, e.g. {str(p / 'checkpoints' / 'step-N' / ADAPTER_DIR)!r} "
                             "with --model.")
        cfg = replace(recipe.model, gradient_checkpointing=False)
        if model:
            cfg = replace(cfg, name_or_path=model)
        template = recipe.data.chat_template if recipe.data is not None else None
        return RunSource(cfg, adapter_dir, "run", template, trained_on(p))
    if is_adapter_folder(p):
        _, raw = read_adapter_config(p)
        name = model or raw.get("base_model_name_or_path")
        if not name:
            raise QloraError(f"{str(p / CONFIG_NAME)!r} names no base_model_name_or_path; pass --model BASE.")
        # A bare adapter does not say how its base was quantized: assume the QLoRA defaults.
        return RunSource(ModelConfig(name_or_path=name, gradient_checkpointing=False), p, "adapter")
    raise QloraError(f"{str(p)!r} is neither a run folder ({RECIPE_NAME} + {ADAPTER_DIR}/) nor an adapter folder "
                     f"({CONFIG_NAME} + adapter_model.safetensors).")
