"""Per-rank memory of a data-parallel QLoRA step, measured with the MemoryTracker on each rank.

    torchrun --nproc-per-node 2 bench/parallel_memory.py RECIPE --strategy fsdp --out DIR

Each rank loads the recipe's model, attaches adapters, shards it (FSDP) or not (DDP), and
trains a few steps on random tokens through step.train_step under a tracker. The tracker
sees FSDP's shards (their local tensors), the layer weights it all-gathers (temporaries),
activations, sharded gradients and optimizer state, so the same categories as `profile`
come out per rank, to set against estimate.estimate_mode(..., gpus=N, strategy=...).
"""

from __future__ import annotations

import torch

from ..lora.layer import lora_parameters
from ..parallel.distributed import World, step_sync
from ..recipe import Recipe
from ..train.step import train_step
from .measure import random_steps
from .tracker import MemoryTracker


def rank_tensors(model) -> dict[str, list[torch.Tensor]]:
    """base_weights / lora_params of this rank: a shard's local tensor, the 4-bit quant
    constants (kept on the module under FSDP, on the weight otherwise), buffers."""
    from .tracker import quant_state_tensors

    lora_ids = {id(p) for p in lora_parameters(model)}
    out = {"base_weights": [], "lora_params": []}
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out["lora_params" if id(p) in lora_ids else "base_weights"].append(local)
        out["base_weights"] += quant_state_tensors(p)
    for m in model.modules():
        holder = getattr(m, "sharded_quant_state", None)
        if holder is not None:
            out["base_weights"] += quant_state_tensors(type("Q", (), {"quant_state": holder})())
    out["base_weights"] += list(model.buffers())
    return out


def measure_rank(recipe: Recipe, world: World, steps: int = 2, seq_len: int = 64, seed: int = 0) -> dict:
    """Train `steps` steps on random tokens on this rank; return its peak breakdown.

    Args:
        recipe (Recipe): model, lora, train.optimizer/loss_chunk_size/grad_accum.
        world (World): this rank (World() for the single-process reference).
        steps (int): optimizer steps; the last accumulates 2 micro-batches when grad_accum > 1.
        seq_len (int): tokens per sample.
        seed (int): random tokens (the same on every rank: memory does not depend on them).
    """
    from ..train.optim import build_optimizer, optimizer_params
    from ..train.setup import build_model

    t = recipe.train
    model, params = build_model(recipe, "cpu", world)
    opt = build_optimizer(t.optimizer, params, t.lr, t.weight_decay)
    params = optimizer_params(opt)
    model.train()
    plan = random_steps(model.get_input_embeddings().weight.shape[0], steps, 2 if t.grad_accum > 1 else 1,
                        t.micro_batch_size, seq_len, seed)
    tracker = MemoryTracker(rank_tensors(model))
    tracker.watch_optimizer(opt)
    sync = step_sync(world, params, reduce_grads=world.strategy == "ddp")
    with tracker:
        for step, batches in enumerate(plan):
            trained = {"tokens": sum(int(b["labels"][:, 1:].numel()) for b in batches) * world.size}
            train_step(model, batches, params, opt, device="cpu", max_grad_norm=t.max_grad_norm,
                       loss_chunk_size=t.loss_chunk_size, normalizer=trained if world.parallel else None,
                       sync=sync, phase=lambda name, s=step: tracker.set_phase(name, s))
    return {"rank": world.rank, "world_size": world.size, "strategy": world.strategy,
            "peak": tracker.breakdown().to_dict()}
