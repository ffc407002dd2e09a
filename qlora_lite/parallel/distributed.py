"""Data-parallel training through torch.distributed: who this process is, which micro-batches
it trains, and the collectives that make N processes train as one.

torchrun (or `accelerate launch`, or `qlora-lite run --nproc N`) starts one process per device
and sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and nothing
here does anything. Semantics (docs/multi-gpu.md):

- A global step is grad_accum x world micro-batches taken in order from the same (seed, epoch)
  plan a single process uses; rank r trains the r-th block of grad_accum of them. So 2 ranks x
  grad_accum 1 train exactly what 1 rank x grad_accum 2 trains.
- The loss is divided by the trained tokens of the whole global step, every rank knows that
  count from the plan (no collective), and gradients are summed across ranks (not averaged).
- Rank 0 writes every file; the other ranks wait at barriers where a file must exist.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import QloraError
from ..recipe import STRATEGIES

# A rank that stops answering (killed, hung) makes the others fail a collective after this
# many seconds instead of waiting forever; torchrun also stops every rank when one dies.
DEFAULT_TIMEOUT_S = 600
# How long the launcher lets the ranks finish their step and write the checkpoint after Ctrl-C.
SHUTDOWN_TIMEOUT_S = 300


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run; World() is the single-process run.

    Args:
        rank (int): global rank. Default 0.
        size (int): number of processes. Default 1.
        local_rank (int): rank on this machine (its GPU index). Default 0.
        strategy (str): "single", "ddp" or "fsdp". Default "single".
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "single"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def keeps(self, grad_accum: int):
        """Predicate over the n-th micro-batch from a step boundary: is it this rank's to train?"""
        return lambda n: (n // grad_accum) % self.size == self.rank

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. one rank saw Ctrl-C)."""
        return bool(self.max(1 if flag else 0))

    def max(self, value: int) -> int:
        """The largest of the ranks' `value` on every rank (e.g. which stop signal any rank saw).

        Through a CPU (gloo) group, also under NCCL: asking this between micro-batches reads no
        GPU value, so it adds no host sync to a step (it does wait for the slowest rank's host).
        """
        if not self.parallel:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
        return int(t.item())

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks (in float64, so the sum depends little on the order)."""
        if not self.parallel:
            return value
        t = value.detach().double().to(collective_device())
        dist.all_reduce(t)
        return t.to(value.device)

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun/accelerate set them; (0, 1, 0) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))


def init_world(strategy: str | None, device: str) -> World:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); World() when alone.

    Args:
        strategy (str | None): train.distributed: "ddp", "fsdp", or None (ddp when world > 1).
        device (str): "cpu" or "cuda" (the resolved train.device).
    """
    rank, size, local_rank = world_from_env()
    if size == 1:
        return World()
    strategy = strategy or "ddp"
    if strategy not in STRATEGIES:
        raise QloraError(f"train.distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise QloraError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                             "start at most one process per GPU (--nproc-per-node).")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("QLORA_LITE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    global _CPU_GROUP
    # The stop flag's group (World.max): gloo beside NCCL, so agreeing on it never touches the GPU.
    _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    return World(rank, size, local_rank, strategy)


_CPU_GROUP = None  # None: the default group is gloo already (CPU runs) or there is no group


def close_world(world: World) -> None:
    if world.parallel and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> str:
    """Where tensors for a collective must live: the GPU under NCCL, the CPU under gloo."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum the adapters' gradients over ranks in one flat bucket, what DDP's reducer does at the
    last micro-step of an accumulation; once per optimizer step, not per micro-batch."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def step_sync(world: World, params: list[torch.Tensor], reduce_grads: bool = True):
    """The hook step.train_step calls after the backward passes: sum gradients (DDP; FSDP's own
    reduce-scatter already did) and the step's loss terms and statistics over ranks; returns the global sums."""
    def sync(sums: torch.Tensor) -> torch.Tensor:
        if reduce_grads:
            all_reduce_gradients(params)
        return world.sum_tensor(sums)

    return sync if world.parallel else None


def check_global_batch(saved_world: int, saved_accum: int, world: World, grad_accum: int) -> None:
    """Resuming with another world size must keep the global batch, so the run continues at
    the same global sample with the same steps; name the grad_accum that does."""
    if saved_world * saved_accum == world.size * grad_accum:
        return
    want = saved_world * saved_accum
    hint = (f"set --set train.grad_accum={want // world.size}" if want % world.size == 0
            else f"use a world size that divides {want}")
    raise QloraError(f"--resume: the run's global batch is {saved_world} process(es) x grad_accum {saved_accum} "
                     f"micro-batches, now {world.size} x {grad_accum}; {hint} to keep it.")


def exit_process(status: int):
    """End this process with `status`; a torchrun worker skips the interpreter's teardown.

    Twice on 2026-12-08 (2-process FSDP on gloo, torch 2.13, CPU, in full test-suite runs; not
    reproduced in 8 runs alone) a worker whose run had finished, written everything and destroyed
    its process group aborted in teardown with "terminate called without an active exception" (a
    C++ thread destroyed unjoined), so torchrun reported the finished run as failed. By the time a
    worker gets here its files are written atomically and its group is gone; nothing is lost by
    leaving without running the destructors.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def world_is_main() -> bool:
    """Rank 0 (or a single process), read from the launcher's environment."""
    return world_from_env()[0] == 0


def main_first(world: World, fn, others: bool = True):
    """Run `fn` on rank 0, then (others=True) on the other ranks; a QloraError on rank 0 is
    raised on every rank with the same message, so no rank waits for one that gave up.

    Args:
        world (World): this process.
        fn (callable): no arguments; its result is returned (None on ranks that skip it).
        others (bool): False: only rank 0 runs it (it writes files). Default True.
    """
    if not world.parallel:
        return fn()
    result, error = None, [None]
    if world.main:
        try:
            result = fn()
        except QloraError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise QloraError(error[0])
    if others and not world.main:
        result = fn()
    return result


def peer_lost(error: Exception) -> str:
    """What to tell the user when a collective fails: which rank we are and where to look."""
    rank, size, _ = world_from_env()
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"rank {rank} of {size} lost contact with the other ranks ({first}); another rank stopped, was "
            f"killed or hung for QLORA_LITE_DIST_TIMEOUT seconds (default {DEFAULT_TIMEOUT_S}); its own "
            "error is in the output above. Resume with --resume from the last checkpoint.")


def merge_peaks(world: World, record: dict) -> dict:
    """`record`'s peak_* fields replaced by the largest rank's, plus peak_rank (which rank)."""
    if not world.parallel:
        return record
    peaks = world.gather_objects({k: v for k, v in record.items() if k.startswith("peak_")})
    rank = max(range(world.size), key=lambda r: peaks[r]["peak_memory_gb"])
    return {**record, **peaks[rank], "peak_rank": rank}


# ---------------------------------------------------------------- the launcher


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine with `nproc` processes running `qlora-lite <cli_args>`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "qlora_lite", *cli_args]


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run torchrun as a child and return its exit status; Ctrl-C reaches torchrun, which
    passes it once to every rank (each finishes its step, rank 0 saves), and we return 130.
    SIGTERM and SIGUSR1 (a cluster's preemption) reach torchrun as SIGTERM, which it passes to
    every rank (torchrun dies of SIGUSR1 itself), and we return 128 + the signal we got."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores
    # Its own session: a terminal's Ctrl-C reaches only us, and we pass exactly one SIGINT on
    # (two would make torchrun cut its graceful shutdown short).
    proc = subprocess.Popen(torchrun_command(nproc, cli_args), env=env, start_new_session=True)
    # Python leaves SIGINT ignored when it started ignored (a job started in the background by a
    # non-interactive shell): set the handler ourselves so Ctrl-C (or kill -INT) always reaches us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    got = []

    def preempted(signum, frame):
        if not got:
            proc.send_signal(signal.SIGTERM)
        got.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, preempted)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            got.append(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
    return 128 + got[0] if got else code
