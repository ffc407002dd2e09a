"""What a run folder and an adapter folder are: made and checked by `run`, read by the others.

A run folder holds the resolved `recipe.yaml`, `metrics.jsonl`, `checkpoints/` and, once the
run finished, `adapter/`; an adapter folder holds PEFT's `adapter_config.json` +
`adapter_model.safetensors`. `run` makes or checks its folder with `prepare_run_dir` and
`check_resumable`; export, verify and generate start from `resolve_source`, so they all agree
on what a folder means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import QloraError
from ..lora.files import CONFIG_NAME, read_adapter_config
from ..recipe import ModelConfig, Recipe, load_recipe
from ..utils.readers import read_json
from .checkpoint import latest_checkpoint
from .lock import clear_run_folder, has_content

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
    try:
        device = read_json(run_dir / "summary.json", "").get("device")
    except QloraError:  # not written yet, or damaged: unknown
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


# ---------------------------------------------------------------- making and checking it (run)


RUN_MARKERS = (RECIPE_NAME, "metrics.jsonl", "checkpoints", "events.jsonl")
# What may change between a run and its resume: how long and how often, never what is trained.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
                     "train.eval_max_batches", "train.save_every", "train.keep_last", "train.device",
                     "output.dir",  # a run folder may be moved
                     # Data may move (another machine, another mount): its content is checked
                     # instead, by hash (runs/fingerprint.py).
                     "data.path", "data.eval_path",
                     "train.max_time",  # each job of a requeued run has its own allocation
                     "train.report_to",  # trackers: one added on resume starts its own run there
                     "train.sample_prompts", "train.sample_max_new_tokens", "train.sample_temperature",
                     # Another world size: grad_accum may change with it as long as the global
                     # batch stays (distributed.check_global_batch).
                     "train.grad_accum"}


def is_foreign_folder(run_dir: Path) -> bool:
    """Whether `run_dir` holds files that are not a qlora-lite run's (output.dir=. on a project):
    the one rule for what `run` may delete or start over."""
    return run_dir.is_dir() and has_content(run_dir) and not any((run_dir / n).exists() for n in RUN_MARKERS)


def is_finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` wrote its final adapter or summary."""
    return (run_dir / "summary.json").is_file() or (run_dir / ADAPTER_DIR).exists()


def resolve_resume(run_dir: Path, resume: bool | str) -> bool:
    """Whether to resume: `--resume` (True) always; `--resume auto` when the folder holds a complete
    checkpoint of an unfinished run, starting fresh when it holds none. `auto` refuses a finished
    run and a folder of someone else's files, so a requeued job never redoes or clobbers work."""
    if resume != "auto":
        return bool(resume)
    if is_finished(run_dir):
        raise QloraError(f"--resume auto: {str(run_dir)!r} holds a finished run (summary.json, adapter/); there "
                         "is nothing to resume and it is not started over. Use the adapter, or start another "
                         "run with --set output.dir=runs/NEW (or --overwrite to replace this one).")
    if is_foreign_folder(run_dir):
        raise QloraError(f"--resume auto: {str(run_dir)!r} holds files that are not a qlora-lite run (no "
                         f"{', '.join(RUN_MARKERS)}); refusing to start a run over them. Choose another output.dir.")
    return latest_checkpoint(run_dir) is not None


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool = False) -> None:
    """Make the folder for a new run, or check there is a checkpoint to resume; never start over
    another run unless told to (--overwrite), and never delete a folder that is not a run's."""
    if overwrite and run_dir.exists():
        # Only ever delete a run folder (or an empty one): output.dir=. must not wipe a project.
        if is_foreign_folder(run_dir):
            raise QloraError(f"--overwrite: {str(run_dir)!r} is not a qlora-lite run folder (no "
                             f"{', '.join(RUN_MARKERS)}); refusing to delete it. Choose another output.dir.")
        clear_run_folder(run_dir)  # keeps the lock this process holds
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise QloraError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}; "
                             "run without --resume to start fresh.")
        return
    # A folder whose run saved no complete checkpoint (stopped before its first) holds nothing to lose.
    if latest_checkpoint(run_dir) is not None or (run_dir / ADAPTER_DIR).exists():
        raise QloraError(f"Output folder {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                         "--overwrite to replace it, or --set output.dir=runs/new to start another.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "samples.jsonl").unlink(missing_ok=True)


def check_resumable(cfg: Recipe, saved_path: Path) -> Recipe | None:
    """Refuse to resume with settings that change the model, the data plan or the optimizer;
    return the run's saved recipe (None when it has none)."""
    if not saved_path.is_file():
        return None
    recipe = load_recipe(saved_path)
    saved = _flatten(recipe.to_dict())
    now = _flatten(cfg.to_dict())
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key) and key not in RESUMABLE_CHANGES:
            raise QloraError(f"--resume: {key} is {now.get(key)!r} but the run was started with "
                             f"{saved.get(key)!r}; resume with the run's own settings "
                             f"(e.g. qlora-lite run {saved_path} --resume).")
    return recipe


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
