"""What a data-parallel run does differently around training: prepare the model on each rank,
save a checkpoint that every rank can resume from, and restore it.

DDP ranks hold identical adapters and optimizer states, so rank 0's are the run's. FSDP ranks
hold shards: the adapter and the optimizer state are gathered into full (unsharded) tensors for
the file, so a checkpoint does not depend on the world size that wrote it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..lora.files import read_adapter_weights
from ..lora.layer import lora_parameters, lora_state_dict
from ..parallel.distributed import World
from ..recipe import check_fsdp_optimizer
from ..runs.checkpoint import (
    load_checkpoint,
    read_checkpoint,
    read_trainer_state,
    restore_schedule_and_rng,
    save_checkpoint,
)


def prepare_parallel(model, world: World, seed: int, optimizer: str) -> None:
    """Make every rank start from rank 0's adapters, give each rank its own dropout stream,
    and shard the model under FSDP."""
    if world.strategy == "fsdp":
        check_fsdp_optimizer(optimizer)
    for p in lora_parameters(model):
        dist.broadcast(p.data, src=0)  # what DDP does at construction; the inits already agree
    torch.manual_seed(seed + world.rank)
    if world.strategy == "fsdp":
        from ..parallel.fsdp import shard_model

        shard_model(model, world)


def adapter_state(model, world: World) -> dict | None:
    """Full adapter tensors on every rank (FSDP gathers shards: a collective); None otherwise,
    where the model's own tensors are full already."""
    if world.strategy != "fsdp":
        return None
    from ..parallel.fsdp import full_tensor

    return {k: full_tensor(v) for k, v in lora_state_dict(model).items()}


def optimizer_state(run) -> dict:
    """The optimizer state to save: DDP rank 0's own; FSDP's gathered to full tensors, keyed
    by parameter name (a collective)."""
    if run.world.strategy != "fsdp":
        return run.optimizer.state_dict()
    from ..parallel.fsdp import full_optimizer_state

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


def load_parallel(run, path: Path) -> dict:
    """Restore a checkpoint on every rank; return the trainer state. Each rank gets back its
    own RNG stream when the world size is the one that saved it."""
    world = run.world
    if world.strategy != "fsdp":
        return load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.scaler, world.rank, world.size)
    from ..parallel.fsdp import load_sharded

    ckpt = read_checkpoint(path)
    load_sharded(run.model, run.optimizer, read_adapter_weights(ckpt.adapter_dir, ckpt.fix), ckpt.optimizer)
    return restore_schedule_and_rng(ckpt, run.scheduler, run.scaler, world.rank, world.size)


def saved_world_size(checkpoint: Path | None) -> int:
    """Processes that trained up to `checkpoint` (1 for checkpoints from before data parallelism)."""
    return 1 if checkpoint is None else read_trainer_state(checkpoint).get("world_size", 1)
