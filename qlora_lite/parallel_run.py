"""What a data-parallel run does differently around training: prepare the model on each rank,
save a checkpoint that every rank can resume from, and restore it.

DDP ranks hold identical adapters and optimizer states, so rank 0's are the run's. FSDP ranks
hold shards: the adapter and the optimizer state are gathered into full (unsharded) tensors for
the file, so a checkpoint does not depend on the world size that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import World
from .lora import lora_parameters, lora_state_dict


def prepare_parallel(model, world: World, seed: int, optimizer: str) -> None:
    """Make every rank start from rank 0's adapters, give each rank its own dropout stream,
    and shard the model under FSDP."""
    if world.strategy == "fsdp":
        from .fsdp import check_fsdp_optimizer

        check_fsdp_optimizer(optimizer)
    for p in lora_parameters(model):
        dist.broadcast(p.data, src=0)  # what DDP does at construction; the inits already agree
    torch.manual_seed(seed + world.rank)
    if world.strategy == "fsdp":
        from .fsdp import shard_model

        shard_model(model, world)


def adapter_state(model, world: World) -> dict | None:
    """Full adapter tensors on every rank (FSDP gathers shards: a collective); None otherwise,
    where the model's own tensors are full already."""
    if world.strategy != "fsdp":
        return None
    from .fsdp import full_tensor

    return {k: full_tensor(v) for k, v in lora_state_dict(model).items()}


def optimizer_state(run) -> dict:
    """The optimizer state to save: DDP rank 0's own; FSDP's gathered to full tensors, keyed
    by parameter name (a collective)."""
    if run.world.strategy != "fsdp":
        return run.optimizer.state_dict()
    from .fsdp import full_optimizer_state

    return full_optimizer_state(run.model, run.optimizer)


def save_parallel(run) -> None:
    """Checkpoint a data-parallel run: every rank contributes, rank 0 writes, all wait for it."""
    world, cfg = run.world, run.recipe
    rank_rng = world.gather_objects(torch.get_rng_state())  # each rank's dropout stream
    adapter, optim = adapter_state(run.model, world), optimizer_state(run)
    if world.main:
        save_checkpoint(run.run_dir, run.model, cfg.lora, cfg.model.name_or_path, run.optimizer, run.scheduler,
                        dict(asdict(run.state), window=asdict(run.window)), cfg.train.keep_last,
                        scaler=run.scaler, adapter_state=adapter, optimizer_state=optim, rank_rng=rank_rng)
    world.barrier()


def load_parallel(run, ckpt: Path) -> dict:
    """Restore a checkpoint on every rank; return the trainer state. Each rank gets back its
    own RNG stream when the world size is the one that saved it."""
    world = run.world
    if world.strategy == "fsdp":
        from .fsdp import load_sharded

        state = load_sharded(ckpt, run.model, run.optimizer, run.scheduler, run.scaler)
    else:
        state = load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, scaler=run.scaler)
    rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    if len(rng.get("ranks", [])) == world.size:
        torch.set_rng_state(rng["ranks"][world.rank])
    return state


def saved_world_size(checkpoint: Path | None) -> int:
    """Processes that trained up to `checkpoint` (1 for checkpoints from before data parallelism)."""
    if checkpoint is None:
        return 1
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("world_size", 1)
