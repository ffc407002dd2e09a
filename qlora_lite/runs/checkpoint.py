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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QloraError
from ..lora.files import load_adapter, save_adapter
from ..recipe import LoraConfig
from ..utils.atomic import NoSpaceError, atomic_dir, atomic_write_bytes, atomic_write_text
from ..utils.readers import read_json, torch_load

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

    Safe because the run folder's lock (runs/lock.py) says no other process is writing here.
    """
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*"):  # .tmp being written, .old being replaced
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read from its files and checked.

    Args:
        path (Path): the step-N folder.
        optimizer (dict): optimizer.pt: a state_dict; keyed by parameter name when an FSDP run
            wrote it (gathered to full tensors).
        scheduler (dict): scheduler.pt.
        scaler (dict | None): scaler.pt, fp16 runs only.
        rng (dict): rng.pt: "torch", optionally "cuda" and "ranks" (each data-parallel rank's).
        state (dict): trainer_state.json without its python_rng.
        python_rng (tuple): random.getstate() at the save.
    """

    path: Path
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    state: dict
    python_rng: tuple

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def fix(self) -> str:
        """What to do when one of its files is damaged."""
        return checkpoint_fix(self.path)

    @property
    def sharded_optimizer(self) -> bool:
        """Whether an FSDP run wrote the optimizer state (keyed by parameter name)."""
        return any(isinstance(k, str) for k in self.optimizer.get("state", {}))


def checkpoint_fix(path: Path) -> str:
    return f"delete {str(path)!r} to resume from the checkpoint before it, or start over with --overwrite"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read every file of a checkpoint except the adapter (lora.files reads that format) onto the CPU.

    A file written on a GPU loads on a CPU-only machine and the reverse: optimizers move their
    state to the parameters' device themselves. A damaged file (truncated copy, disk error, a
    file from elsewhere) raises QloraError naming it and saying how to resume from the
    checkpoint before. torch files are read with weights_only: a checkpoint folder is data,
    never code.
    """
    path = Path(path)
    fix = checkpoint_fix(path)
    optim, sched, rng = (torch_load(path / name, fix, map_location="cpu")
                         for name in ("optimizer.pt", "scheduler.pt", "rng.pt"))
    scaler = torch_load(path / "scaler.pt", fix, map_location="cpu") if (path / "scaler.pt").is_file() else None
    if not (isinstance(rng, dict) and torch.is_tensor(rng.get("torch"))):
        raise QloraError(f"{str(path / 'rng.pt')!r} does not hold RNG states; {fix}")
    state = read_trainer_state(path)
    try:
        python_rng = _py_rng_from_json(state.pop("python_rng"))
        random.Random().setstate(python_rng)  # checks it is one
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise QloraError(f"{str(path / 'trainer_state.json')!r} is not a trainer state (missing or bad "
                         f"{e!r}); {fix}") from None
    return Checkpoint(path, optim, sched, scaler, rng, state, python_rng)


def read_trainer_state(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint: step, data position, world size, python RNG, totals."""
    path = Path(path)
    state = read_json(path / "trainer_state.json", checkpoint_fix(path))
    missing = [k for k in ("step", "epoch", "batch_in_epoch", "python_rng") if k not in state]
    if missing:
        raise QloraError(f"{str(path / 'trainer_state.json')!r} is not a trainer state (missing "
                         f"{missing[0]!r}); {checkpoint_fix(path)}")
    return state


def load_checkpoint(path: str | Path, model, optimizer, scheduler, scaler=None, rank: int = 0,
                    world_size: int = 1) -> dict:
    """Restore adapter, optimizer, scheduler, GradScaler and RNG states of a model that holds
    whole tensors; return the trainer state. (An FSDP model takes its shards with
    parallel.fsdp.load_sharded and then `restore_schedule_and_rng`.)

    Args:
        path (str | Path): the step-N folder.
        model: the LoRA-wrapped model.
        optimizer, scheduler: torch optimizer and LR scheduler.
        scaler (torch.amp.GradScaler | None): fp16 runs. Default None.
        rank (int): this data-parallel rank, whose own RNG stream comes back. Default 0.
        world_size (int): processes now; a rank's stream comes back only when the checkpoint
            was written by as many. Default 1.
    """
    ckpt = read_checkpoint(path)
    load_adapter(model, ckpt.adapter_dir, fix=ckpt.fix)
    state = by_position(model, optimizer, ckpt.optimizer) if ckpt.sharded_optimizer else ckpt.optimizer
    _apply_state(ckpt.path / "optimizer.pt", state, optimizer, ckpt.fix)
    restore_paged_state(optimizer)
    return restore_schedule_and_rng(ckpt, scheduler, scaler, rank, world_size)


def by_position(model, optimizer, state: dict) -> dict:
    """An optimizer state keyed by parameter name (what an FSDP run writes: tensors whole) in the
    per-position layout of `optimizer`, whose parameters are the model's (in the order it was
    given them: a flat optimizer's `order`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = getattr(optimizer, "order", None) or [p for g in optimizer.param_groups for p in g["params"]]
    order = [names[id(p)] for p in params]
    return {"state": {i: state["state"][n] for i, n in enumerate(order) if n in state["state"]},
            "param_groups": [dict(state["param_groups"][0], params=list(range(len(order))))]}


def restore_schedule_and_rng(ckpt: Checkpoint, scheduler, scaler=None, rank: int = 0, world_size: int = 1) -> dict:
    """Restore the LR schedule, the GradScaler and every RNG; return the trainer state.

    Args: as load_checkpoint's.
    """
    _apply_state(ckpt.path / "scheduler.pt", ckpt.scheduler, scheduler, ckpt.fix)
    if scaler is not None and ckpt.scaler is not None:
        _apply_state(ckpt.path / "scaler.pt", ckpt.scaler, scaler, ckpt.fix)
    ranks = ckpt.rng.get("ranks", [])
    try:
        # Each rank's own dropout stream when the world size is the one that saved it.
        torch.set_rng_state(ranks[rank] if len(ranks) == world_size > 1 else ckpt.rng["torch"])
        if "cuda" in ckpt.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt.rng["cuda"])
    except (TypeError, RuntimeError) as e:
        raise QloraError(f"{str(ckpt.path / 'rng.pt')!r} does not hold RNG states ({e!r}); {ckpt.fix}") from None
    random.setstate(ckpt.python_rng)
    return dict(ckpt.state)


def restore_paged_state(optimizer) -> None:
    """Put a loaded bitsandbytes paged optimizer's state back into paged (unified) memory.

    `load_state_dict` gives ordinary tensors, which bitsandbytes then moves onto the GPU as
    they are: a resumed run would hold its optimizer state in device memory after all. On CUDA
    each state buffer that bitsandbytes would page (>= 1e5 elements) is copied into a paged
    buffer; elsewhere (CPU, small tensors, non-paged optimizers) nothing changes.
    """
    if not getattr(optimizer, "is_paged", False):
        return
    import bitsandbytes.functional as F

    for p, state in optimizer.state.items():
        if p.device.type != "cuda" or p.numel() < PAGED_MIN_NUMEL:
            continue
        for key in ("state1", "state2"):
            v = state.get(key)
            if torch.is_tensor(v) and not getattr(v, "is_paged", False):
                buf = F.get_paged(*v.shape, dtype=v.dtype, device=p.device)
                buf.copy_(v.to(p.device))
                optimizer.page_mng.paged_tensors.append(buf)
                state[key] = buf


# bitsandbytes pages the state of parameters with at least this many elements (get_state_buffer).
PAGED_MIN_NUMEL = 100_000


def _apply_state(file: Path, sd, target, fix: str) -> None:
    """load_state_dict; a file of another kind is named, not a KeyError."""
    try:
        target.load_state_dict(sd)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise QloraError(f"{str(file)!r} does not hold this run's {type(target).__name__} state ({e!r}); "
                         f"{fix}") from None


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
