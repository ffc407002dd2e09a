"""Why a run stops before its last step, and how it stops cleanly: a signal (Ctrl-C, a cluster's
SIGTERM or SIGUSR1) or train.max_time.

A signal handler only raises a flag (a Python int; nothing on the GPU). The loop reads it between
micro-batches and at each step boundary (loop.fit); under data parallelism the ranks agree on it
(World.max, a CPU collective), so every rank stops at the same micro-batch, whichever got the
signal. A step cut short is dropped, not saved: its gradients are zeroed and the RNG is put back
to where the step began (`rng_snapshot`), so the checkpoint is exactly that of the last finished
optimizer step and a resumed run gives the losses of an uninterrupted one. The process then exits
with 128 + the signal's number (the shell's convention: 130 Ctrl-C, 138 SIGUSR1, 143 SIGTERM), or
EXIT_TIME_LIMIT for train.max_time.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# The reason code of train.max_time, agreed on like a signal's number: below every signal, so a
# rank's signal wins over rank 0's clock (an exit status 143 says more than 75).
TIME_LIMIT = 1
# sysexits' EX_TEMPFAIL, "try again later": stopped with a checkpoint before train.max_time, not
# finished; the same command with --resume auto goes on. Distinct from 0 so a job script or a
# Kubernetes Job sees the run is not done.
EXIT_TIME_LIMIT = 75
# A first guess of a checkpoint save's speed, before the run has timed one (train.max_time):
# adapter + optimizer state, written and fsynced. A conservative disk; measured saves replace it.
SAVE_GUESS_BYTES_PER_S = 100e6


def reason_name(code: int) -> str:
    return "train.max_time" if code == TIME_LIMIT else signal.Signals(code).name


def exit_status(code: int) -> int:
    return EXIT_TIME_LIMIT if code == TIME_LIMIT else 128 + code


class Stopped(Exception):
    """A signal or train.max_time stopped the run; a checkpoint was saved at the last finished step.

    Args:
        code (int): the signal's number, or TIME_LIMIT.
        step (int): the step of the checkpoint.
        checkpoint (Path): its folder.
    """

    def __init__(self, code: int, step: int, checkpoint: Path):
        self.code, self.step, self.checkpoint = code, step, checkpoint
        super().__init__(f"{reason_name(code)} at step {step}: checkpoint {checkpoint}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.code)

    def line(self, recipe_path: str = "RECIPE") -> str:
        """The one line the user sees: what stopped the run, where the checkpoint is, how to go on."""
        what = {signal.SIGINT: "interrupted by Ctrl-C (SIGINT)", TIME_LIMIT: "stopped by train.max_time"}.get(
            self.code, f"preempted by {reason_name(self.code)}")
        return (f"{what} at step {self.step}: checkpoint {self.checkpoint}; resume with: qlora-lite run "
                f"{recipe_path} --resume auto")


class StepAbandoned(Exception):
    """The ranks agreed to stop between two micro-batches of a step; the step was dropped."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(reason_name(code))


class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 ask for a checkpoint at the next micro-batch boundary.

    A second Ctrl-C aborts at once (KeyboardInterrupt; the atomic writes keep the older
    checkpoints whole). A second SIGTERM or SIGUSR1 (SLURM's early USR1 then its TERM, or a
    repeated scancel) is only noted: the save under way goes on, and SIGKILL, which nothing can
    catch, is what a grace period ends with.
    """

    def __init__(self):
        self.code = 0  # the first signal's number; 0 while none came
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.code != 0

    def _handler(self, signum, frame):
        if self.code:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(f"\n{signal.Signals(signum).name}: already stopping, the checkpoint is being saved",
                  file=sys.stderr)
            return
        self.code = signum
        hint = " (press again to abort without saving)" if signum == signal.SIGINT else ""
        print(f"\n{signal.Signals(signum).name}: stopping at the next micro-batch with a checkpoint of the last "
              f"finished step{hint}", file=sys.stderr)

    def poll(self, world) -> int:
        """Between micro-batches: the stop signal any rank has seen (0: none), the same on every rank."""
        return self._agree(world, self.code)

    def agreed(self, world, time_up: bool = False) -> int:
        """At a step boundary: why the ranks stop (a signal's number, TIME_LIMIT) or 0 to go on.

        Args:
            world: the data-parallel world (World.max).
            time_up (bool): train.max_time says stop (rank 0's clock; the others pass False).

        The flag is only ever raised here, never assigned from the all-reduce: ranks wait for each
        other inside that collective, which is where a signal most often lands, and writing its
        result back would erase a flag the handler raised during the call (seen as a lost Ctrl-C
        under torchrun). Such a late signal is agreed on at the next boundary.
        """
        return self._agree(world, max(self.code, TIME_LIMIT if time_up else 0))

    def _agree(self, world, mine: int) -> int:
        code = world.max(mine)
        if code > TIME_LIMIT and not self.code:
            self.code = code
        return code

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class TimeBudget:
    """train.max_time: whether the next step and a checkpoint still fit before the limit.

    Counted from when the process began training setup (each requeued job has its own
    allocation). The next step is assumed to take as long as the slowest so far (eval and saves
    included) and the save as long as the longest so far; before the first save, a guess from
    the bytes to write (SAVE_GUESS_BYTES_PER_S).

    Args:
        limit_s (float | None): train.max_time in seconds; None never stops.
        save_bytes (int): about what a checkpoint writes, for the first guess. Default 0.
    """

    def __init__(self, limit_s: float | None, save_bytes: int = 0):
        self.limit_s = limit_s
        self.started = time.monotonic()
        self.slowest_step = 0.0
        self.save_s = save_bytes / SAVE_GUESS_BYTES_PER_S
        self.saves = 0

    def note_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def note_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds) if self.saves else seconds
        self.saves += 1

    def up(self) -> bool:
        # Not before this process finished a step: each job makes progress, however small its budget.
        if self.limit_s is None or not self.slowest_step:
            return False
        return time.monotonic() - self.started + self.slowest_step + self.save_s > self.limit_s


def rng_snapshot() -> dict:
    """Every RNG a step draws from (dropout), as it stands before the step: host-side copies of
    the generators' states (CUDA's is its seed and offset), no GPU value read."""
    snap = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state()  # this rank's device: the one its dropout draws from
    return snap


def restore_rng(snap: dict) -> None:
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["python"])
    if "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"])
