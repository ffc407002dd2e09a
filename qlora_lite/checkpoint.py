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
from .atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from .optim import restore_paged_state
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
                    state: dict, keep_last: int, scaler=None) -> Path:
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
    """
    final = Path(run_dir) / "checkpoints" / f"step-{state['step']}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", lora_cfg, base_name)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # Every file fsynced before the rename, so a power cut cannot leave an empty newest
        # checkpoint after the older ones were pruned.
        files = [("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict()), ("rng.pt", rng)]
        if scaler is not None:
            files.append(("scaler.pt", scaler.state_dict()))
        for name, obj in files:
            buf = io.BytesIO()
            torch.save(obj, buf)
            atomic_write_bytes(tmp / name, buf.getvalue())
        full = dict(state, python_rng=_py_rng_to_json(random.getstate()))
        atomic_write_text(tmp / "trainer_state.json", json.dumps(full, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore adapter, optimizer, scheduler, GradScaler and RNG states; return the trainer state.

    Files are read onto the CPU, so a checkpoint written on a GPU resumes on a CPU-only machine
    and the reverse: optimizers move their state to the parameters' device themselves.
    """
    path = Path(path)
    load_adapter(model, path / "adapter")
    optimizer.load_state_dict(_load(path / "optimizer.pt"))
    restore_paged_state(optimizer)
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(_load(path / "scaler.pt"))
    rng = _load(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "trainer_state.json").read_text())
    random.setstate(_py_rng_from_json(state.pop("python_rng")))
    return state


def _load(path: Path):
    # weights_only: a checkpoint folder is data, never code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
