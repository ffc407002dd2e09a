"""Checkpoints: written to a temporary folder and renamed, so a crash leaves only complete ones.

    <run>/checkpoints/step-N/
        adapter/                PEFT-format adapter (loadable on its own)
        optimizer.pt            optimizer state_dict
        scheduler.pt            LR scheduler state_dict
        rng.pt                  torch (and CUDA) RNG states
        scaler.pt               GradScaler state (fp16 compute only)
        trainer_state.json      step, data position, python RNG state, running totals
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path

import torch

from .adapter import load_adapter, save_adapter
from .atomic import NoSpaceError, atomic_dir, atomic_write_bytes, atomic_write_text
from .errors import QloraError
from .optim import restore_paged_state
from .readers import read_json, torch_load
from .recipe import LoraConfig

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders start with '.')."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, model, lora_cfg: LoraConfig, base_name: str, optimizer, scheduler,
                    state: dict, keep_last: int, scaler=None, adapter_state: dict | None = None,
                    optimizer_state: dict | None = None, rank_rng: list | None = None) -> Path:
    """Write checkpoints/step-<state['step']> atomically, then drop all but the newest `keep_last`.

    Args:
        run_dir (str | Path): the run folder.
        model: the LoRA-wrapped model.
        lora_cfg (LoraConfig): for the adapter's config file.
        base_name (str): base model name recorded in the adapter config.
        optimizer, scheduler: torch optimizer and LR scheduler.
        state (dict): JSON-able trainer state; must hold "step".
        keep_last (int): checkpoints to keep.
        scaler (torch.amp.GradScaler | None): saved when training in fp16. Default None.
        adapter_state (dict | None): full adapter tensors when the model holds shards (FSDP).
            Default None: the model's own.
        optimizer_state (dict | None): the state to save (FSDP's gathered one). Default None:
            optimizer.state_dict().
        rank_rng (list | None): every data-parallel rank's torch RNG state. Default None.
    """
    final = Path(run_dir) / "checkpoints" / f"step-{state['step']}"
    remove_partial_checkpoints(run_dir)
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            save_adapter(model, tmp / "adapter", lora_cfg, base_name, state=adapter_state)
            rng = {"torch": torch.get_rng_state(), **({"ranks": rank_rng} if rank_rng is not None else {})}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            # Every file fsynced before the rename, so a power cut cannot leave an empty newest
            # checkpoint after the older ones were pruned.
            optim = optimizer_state if optimizer_state is not None else optimizer.state_dict()
            files = [("optimizer.pt", optim), ("scheduler.pt", scheduler.state_dict()),
                     ("rng.pt", rng)] + ([("scaler.pt", scaler.state_dict())] if scaler is not None else [])
            for name, obj in files:
                buf = io.BytesIO()
                torch.save(obj, buf)
                atomic_write_bytes(tmp / name, buf.getvalue())
            full = dict(state, python_rng=_py_rng_to_json(random.getstate()))
            atomic_write_text(tmp / "trainer_state.json", json.dumps(full, indent=2))
    except NoSpaceError as e:
        # Older checkpoints are pruned only after a new one is complete, so the last one is intact.
        prev = latest_checkpoint(run_dir)
        note = (f" Checkpoint {str(prev)!r} is complete: continue from it with --resume."
                if prev is not None else " No earlier checkpoint exists.")
        raise NoSpaceError(e.path, e.nbytes, e.reason, note) from None
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete temporary checkpoint folders a killed process left (kill -9 mid-save).

    Safe because the run folder's lock (runlock.py) says no other process is writing here.
    """
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*"):  # .tmp being written, .old being replaced
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore adapter, optimizer, scheduler, GradScaler and RNG states; return the trainer state.

    Files are read onto the CPU, so a checkpoint written on a GPU resumes on a CPU-only machine
    and the reverse: optimizers move their state to the parameters' device themselves. A
    damaged file (truncated copy, disk error, a file from elsewhere) raises QloraError naming it
    and saying how to resume from the checkpoint before.
    """
    path = Path(path)
    fix = (f"delete {str(path)!r} to resume from the checkpoint before it, or start over with --overwrite")
    load_adapter(model, path / "adapter", fix=fix)
    # torch_load uses weights_only: a checkpoint folder is data, never code.
    optim = torch_load(path / "optimizer.pt", fix, map_location="cpu")
    if isinstance(optim, dict) and any(isinstance(k, str) for k in optim.get("state", {})):
        # Written by an FSDP run: keyed by parameter name, tensors whole (fsdp.full_optimizer_state).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    else:
        _apply_state(path / "optimizer.pt", optim, optimizer, fix)
    targets = [("scheduler.pt", scheduler)]
    if scaler is not None and (path / "scaler.pt").is_file():
        targets.append(("scaler.pt", scaler))
    for name, target in targets:
        _load_state(path / name, target, fix)
    restore_paged_state(optimizer)
    rng = torch_load(path / "rng.pt", fix, map_location="cpu")
    state = read_json(path / "trainer_state.json", fix)
    try:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise QloraError(f"{str(path / 'rng.pt')!r} does not hold RNG states ({e!r}); {fix}") from None
    missing = [k for k in ("step", "epoch", "batch_in_epoch", "python_rng") if k not in state]
    try:
        if missing:
            raise KeyError(missing[0])
        random.setstate(_py_rng_from_json(state.pop("python_rng")))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise QloraError(f"{str(path / 'trainer_state.json')!r} is not a trainer state (missing or bad "
                         f"{e!r}); {fix}") from None
    return state


def load_file(path: Path, fix: str = "delete this checkpoint to resume from the one before it"):
    """A checkpoint file onto the CPU (written on a GPU, it loads anywhere), errors named by file."""
    return torch_load(path, fix, map_location="cpu")


def _load_state(file: Path, target, fix: str) -> None:
    """load_state_dict from a torch file; a file of another kind is named, not a KeyError."""
    _apply_state(file, torch_load(file, fix, map_location="cpu"), target, fix)


def _apply_state(file: Path, sd, target, fix: str) -> None:
    try:
        target.load_state_dict(sd)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise QloraError(f"{str(file)!r} does not hold this run's {type(target).__name__} state ({e!r}); "
                         f"{fix}") from None


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
