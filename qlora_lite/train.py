"""Training: `setup_run` builds a Run, `fit` runs its loop, `finish` writes the adapter and summary.

The loop in `fit` reads top to bottom: micro-batches, one optimizer step (step.train_step),
log, eval, checkpoint. Everything else lives in its own module.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from .adapter import save_adapter
from .atomic import atomic_dir, atomic_write_json
from .attention import use_packed_attention
from .batching import collate, plan_batches
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import build_datasets
from .distributed import (World, check_global_batch, close_world, init_world, main_first, merge_peaks, peer_lost,
                          step_sync, world_is_main)
from .errors import QloraError
from .host_memory import return_freed_memory
from .lora import attach_lora, lora_parameters, trainable_summary
from .loss import IGNORE_INDEX, causal_lm_loss
from .metrics import (LogWindow, MetricsLog, format_summary, last_logged_loss, log_record, peak_memory,
                      perplexity, reset_peak_memory, truncate_metrics)
from .model import cache_root, load_model, load_tokenizer, pick_device
from .optim import apply_schedule, build_optimizer, build_scheduler
from .parallel_run import adapter_state, load_parallel, prepare_parallel, save_parallel, saved_world_size
from .recipe import Recipe, save_recipe
from .runlock import clear_run_folder, has_content, run_lock
from .step import NonFiniteLoss, autocast_context, grad_scaler, to_device, train_step
from .tracking import Tracker, open_trackers

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"

__all__ = ["NonFiniteLoss", "Run", "setup_run", "fit", "finish", "train", "run_recipe"]


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at the last finished step."""


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint's trainer_state.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # the next micro-batch of `epoch` to train on
    tokens: int = 0  # tokens trained on, padding excluded
    trained_tokens: int = 0  # tokens that carried a loss
    wall: float = 0.0  # seconds spent in training steps
    world_size: int = 1  # processes that trained (a resume may change it, keeping the global batch)


class MicroBatch(NamedTuple):
    epoch: int
    index: int  # position in the epoch's batch plan
    tokens: int  # tokens in the batch, padding excluded
    trained: int  # tokens that carry a loss (step.count_trained of the collated batch)
    batch: dict | None  # collated host tensors; None when another rank trains it


@dataclass
class Run:
    """Everything a training run holds: built by `setup_run`, advanced by `fit`, closed by `finish`."""

    recipe: Recipe
    run_dir: Path
    device: str
    model: torch.nn.Module
    tokenizer: object
    train_set: list
    eval_set: list
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    autocast: object
    scaler: object = None  # a GradScaler with fp16 compute
    world: World = field(default_factory=World)  # data-parallel place; World() is one process
    state: RunState = field(default_factory=RunState)
    window: LogWindow = field(default_factory=LogWindow)
    last_eval: float | None = None
    tracker: Tracker = field(default_factory=lambda: Tracker([]))  # train.report_to (tracking.py)

    def evaluate(self) -> float:
        t = self.recipe.train
        return eval_loss(self.model, self.eval_set, t.micro_batch_size, self.tokenizer.pad_token_id,
                         t.loss_chunk_size, self.device, self.autocast, t.eval_max_batches)

    def save(self) -> None:
        cfg = self.recipe
        if self.world.parallel:  # every rank takes part (FSDP gathers), rank 0 writes
            return save_parallel(self)
        save_checkpoint(self.run_dir, self.model, cfg.lora, cfg.model.name_or_path, self.optimizer, self.scheduler,
                        dict(asdict(self.state), window=asdict(self.window)), cfg.train.keep_last,
                        scaler=self.scaler)


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False, demo: bool = False) -> int:
    """CLI entry: train, print the summary table, return the process exit status."""
    main = world_is_main()
    try:
        summary = train(recipe, resume=resume, overwrite=overwrite, demo=demo)
    except Interrupted as e:
        print(f"\ninterrupted: {e}; resume with --resume", file=sys.stderr) if main else None
        return EXIT_INTERRUPTED
    except NonFiniteLoss as e:  # every rank raised it; one says so
        print(f"error: {e}", file=sys.stderr) if main else None
        return 1
    except torch.distributed.DistError as e:  # a collective failed: another rank died or hung
        print(f"error: {peer_lost(e)}", file=sys.stderr)
        return 1
    if not main:
        return 0
    print(format_summary(summary))
    if "demo" in summary:
        from .demo import format_demo

        print(format_demo(summary["demo"]))
    return 0


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, demo: bool = False) -> dict:
    """Fine-tune the recipe's model; returns the run summary (also in <output>/summary.json).

    Args:
        recipe (Recipe): a validated recipe.
        resume (bool): continue from the newest complete checkpoint. Default False.
        overwrite (bool): delete a previous run in the output folder first. Default False.
        demo (bool): eval loss and a generation before and after training. Default False.
    """
    # One process owns a run folder, from before its first write to the summary (runlock.py); under
    # torchrun only the writing rank (0) holds the lock.
    with run_lock(recipe.output.dir, "run --resume" if resume else "run", enabled=writing_rank()):
        run = setup_run(recipe, resume=resume, overwrite=overwrite)
        try:
            before = _demo(run) if demo else None
            fit(run)
            extra = {"demo": {"before": before, "after": _demo(run)}} if before is not None else {}
            return finish(run, extra)
        finally:
            close_world(run.world)


def writing_rank() -> bool:
    """Whether this process writes the run folder: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def _demo(run: Run) -> dict | None:
    from .demo import demo_snapshot

    return demo_snapshot(run.model, run.tokenizer, run.eval_set, run.evaluate) if run.eval_set else None


def setup_run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Run:
    """Prepare the run folder, data, model with adapters, optimizer and schedule; restore a
    checkpoint when resuming.

    Args:
        recipe (Recipe): a validated recipe.
        resume (bool): continue from the newest complete checkpoint. Default False.
        overwrite (bool): delete a previous run in the output folder first. Default False.
    """
    cfg, t = recipe, recipe.train
    if cfg.data is None:
        raise QloraError("The recipe has no `data` section; add `data: {path: ...}`.")
    run_dir = Path(cfg.output.dir)
    device = pick_device(t.device)
    world = init_world(t.distributed, device)
    device = f"cuda:{world.local_rank}" if world.parallel and device == "cuda" else device
    main_first(world, lambda: prepare_run(cfg, run_dir, resume, overwrite, world), others=False)
    return_freed_memory()  # before loading: its temporaries are the first to pile up (host_memory.py)
    scaler = grad_scaler(cfg.model.quantization.compute_dtype, cfg.lora.dtype, device)
    tracker = open_trackers(cfg, run_dir, resume) if world.main else Tracker([])  # fails here if a library is missing
    seed_everything(t.seed)

    # Rank 0 first: it fills the caches (tokenized data, a built-in model) the others then read.
    tokenizer, (train_set, eval_set, data_summary) = main_first(world, lambda: (
        tok := load_tokenizer(cfg.model), build_datasets(cfg.data, tok, t.seed, cache_root() / "data")))
    if world.main:
        print(data_summary.format())
        atomic_write_json(run_dir / "data_summary.json", data_summary.__dict__)

    model = load_model(cfg.model, device)
    torch.manual_seed(t.seed)  # adapter init does not depend on what loading consumed
    attach_lora(model, cfg.lora)
    if cfg.data.packing:
        use_packed_attention(model)  # each packed sample attends only to itself, at its own cost
    if world.main:
        print(trainable_summary(model))
    if world.parallel:
        prepare_parallel(model, world, t.seed, t.optimizer)
    params = lora_parameters(model)
    optimizer = build_optimizer(t.optimizer, params, t.lr, t.weight_decay)
    steps_per_epoch = max(1, len(plan_epoch(train_set, cfg, 0)) // (t.grad_accum * world.size))  # global steps
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, total_steps)
    run = Run(recipe, run_dir, device, model, tokenizer, train_set, eval_set, params, optimizer, scheduler,
              total_steps, autocast_context(device, cfg.model.quantization.compute_dtype), scaler, tracker=tracker,
              world=world)
    if resume:
        restore_run(run)
    run.state.world_size = world.size
    world.barrier()
    reset_peak_memory(device)
    return run


def restore_run(run: Run) -> None:
    """Load the run folder's newest checkpoint into `run`: adapters, optimizer, schedule, RNG, position."""
    ckpt, world = latest_checkpoint(run.run_dir), run.world
    saved = (load_parallel(run, ckpt) if world.parallel
             else load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, scaler=run.scaler))
    apply_schedule(run.scheduler)  # a resume may lengthen the run: its lr follows the new curve
    run.window = LogWindow(**saved.pop("window", {}))
    run.state = RunState(**dict(saved, world_size=world.size))
    if world.main:
        truncate_metrics(run.run_dir / "metrics.jsonl", run.state.step)
        print(f"resumed from {ckpt} (step {run.state.step} of {run.total_steps})")


def prepare_run(cfg: Recipe, run_dir: Path, resume: bool, overwrite: bool, world: World) -> None:
    """Make or check the run folder, refuse a resume that changes the run, record the recipe."""
    prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        saved = check_resumable(cfg, run_dir / "recipe.yaml")
        if saved is not None:
            check_global_batch(saved_world_size(latest_checkpoint(run_dir)), saved.train.grad_accum, world,
                               cfg.train.grad_accum)
    save_recipe(cfg, run_dir / "recipe.yaml")


def fit(run: Run) -> None:
    """Train until `total_steps`: each step is grad_accum micro-batches and one optimizer step."""
    t, state, world = run.recipe.train, run.state, run.world
    stream = micro_batches(run.train_set, run.recipe, state.epoch, state.batch_in_epoch,
                           run.tokenizer.pad_token_id, mask_dtype(run.model), keep=world.keeps(t.grad_accum))
    log = MetricsLog(run.run_dir / "metrics.jsonl" if world.main else None, tracker=run.tracker)  # rank 0 writes
    # disable=None: a bar on a terminal, plain log lines in files and CI.
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if world.main else True)
    log.write = bar.write if world.main else _quiet
    run.model.train()
    with InterruptFlag() as interrupt, bar, run.tracker:
        try:
            while state.step < run.total_steps:
                t0 = time.perf_counter()
                micro = [next(stream) for _ in range(t.grad_accum * world.size)]  # the global step
                result = checked_step(run, micro)
                advance(run, micro, result, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}")
                if state.step % t.log_every == 0 or state.step == run.total_steps:
                    log.train(merge_peaks(world, log_record(state, run.window, run.scheduler.get_last_lr()[0],
                                                            result.grad_norm, run.device)))
                    run.window = LogWindow()
                if run.eval_set and t.eval_every and state.step % t.eval_every == 0 and state.step != run.total_steps:
                    run.last_eval = log.eval(state.step, run.evaluate())
                    run.model.train()
                interrupt.requested = world.any(interrupt.requested)  # all ranks stop at the same step
                if (t.save_every and state.step % t.save_every == 0) or interrupt.requested:
                    run.save()
                if interrupt.requested:
                    raise Interrupted(f"checkpoint saved at step {state.step}")
            if run.eval_set:
                run.last_eval = log.eval(state.step, run.evaluate())
        finally:
            log.close()


def _quiet(message: str) -> None:
    """The log echo of ranks other than 0."""


def checked_step(run: Run, micro: list[MicroBatch]):
    """One optimizer step over this rank's share of `micro` (the global step); a NaN/inf loss
    names the step and the checkpoint that stays."""
    t, world = run.recipe.train, run.world
    # Data-parallel: divide by the trained tokens of the whole global step, sum over ranks.
    normalizer = sum(m.trained for m in micro) if world.parallel else None
    try:
        return train_step(run.model, [m.batch for m in micro if m.batch is not None], run.params, run.optimizer,
                          device=run.device, max_grad_norm=t.max_grad_norm, loss_chunk_size=t.loss_chunk_size,
                          autocast=run.autocast, scaler=run.scaler, normalizer=normalizer,
                          sync=step_sync(world, run.params, reduce_grads=world.strategy == "ddp"))
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{e} at step {run.state.step + 1}; the last good checkpoint is kept in "
                            f"{run.run_dir / 'checkpoints'}. Lower train.lr or check the data.") from None


def advance(run: Run, micro: list[MicroBatch], result, seconds: float) -> None:
    """Move the run's state, data position and log window past a finished (global) step."""
    run.scheduler.step()
    tokens = sum(m.tokens for m in micro)
    s = run.state
    s.step += 1
    s.epoch, s.batch_in_epoch = micro[-1].epoch, micro[-1].index + 1
    s.tokens += tokens
    s.trained_tokens += result.trained
    s.wall += seconds
    run.window.add(result.loss, result.trained, tokens, seconds)


def finish(run: Run, extra: dict | None = None) -> dict:
    """Write the final adapter and summary.json; return the summary.

    Args:
        run (Run): a fitted run.
        extra (dict | None): more summary fields (the demo's before/after). Default None.
    """
    cfg = run.recipe
    state = adapter_state(run.model, run.world)  # FSDP: every rank gathers, rank 0 writes
    adapter_bytes = 0
    if run.world.main:
        with atomic_dir(run.run_dir / "adapter", overwrite=True) as tmp:
            adapter_bytes = save_adapter(run.model, tmp, cfg.lora, cfg.model.name_or_path, state=state)
    peak = merge_peaks(run.world, peak_memory(run.device))
    summary = {
        "steps": run.state.step,
        "train_loss": last_logged_loss(run.run_dir / "metrics.jsonl"),
        "eval_loss": run.last_eval,
        "eval_perplexity": perplexity(run.last_eval) if run.last_eval is not None else None,
        "tokens": run.state.tokens,
        "trained_tokens": run.state.trained_tokens,
        "wall_time_s": round(run.state.wall, 2),
        "peak_memory_bytes": int(peak["peak_memory_gb"] * 2**30),
        **({"peak_reserved_bytes": int(peak["peak_reserved_gb"] * 2**30)} if "peak_reserved_gb" in peak else {}),
        "adapter_bytes": adapter_bytes,
        "trainable": trainable_summary(run.model),
        "device": run.device,
        **({"world_size": run.world.size, "distributed": run.world.strategy, "peak_memory_rank": peak["peak_rank"]}
           if run.world.parallel else {}),
        **(extra or {}),
    }
    if run.world.main:
        atomic_write_json(run.run_dir / "summary.json", summary)
        run.tracker.finish(summary)
    run.world.barrier()
    return summary


# ---------------------------------------------------------------- the run folder


RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints")
# What may change between a run and its resume: how long and how often, never what is trained.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
                     "train.eval_max_batches", "train.save_every", "train.keep_last", "train.device",
                     "output.dir",  # a run folder may be moved
                     "train.report_to",  # trackers: one added on resume starts its own run there
                     "train.report_to",  # trackers: one added on resume starts its own run there
                     # Another world size: grad_accum may change with it as long as the global
                     # batch stays (distributed.check_global_batch).
                     "train.grad_accum"}


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool = False) -> None:
    if overwrite and run_dir.exists():
        # Only ever delete a run folder (or an empty one): output.dir=. must not wipe a project.
        if has_content(run_dir) and not any((run_dir / n).exists() for n in RUN_MARKERS):
            raise QloraError(f"--overwrite: {str(run_dir)!r} is not a qlora-lite run folder (no "
                             f"{', '.join(RUN_MARKERS)}); refusing to delete it. Choose another output.dir.")
        clear_run_folder(run_dir)  # keeps the lock this process holds
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise QloraError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}; "
                             "run without --resume to start fresh.")
        return
    if (run_dir / "checkpoints").exists() or (run_dir / "adapter").exists():
        raise QloraError(f"Output folder {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                         "--overwrite to replace it, or --set output.dir=runs/new to start another.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def check_resumable(cfg: Recipe, saved_path: Path) -> Recipe | None:
    """Refuse to resume with settings that change the model, the data plan or the optimizer;
    return the run's saved recipe (None when it has none)."""
    from .recipe import load_recipe

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


# ---------------------------------------------------------------- data and eval


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def mask_dtype(model) -> torch.dtype:
    """The dtype of 4D additive masks: that of the model's floating-point weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def plan_epoch(samples, cfg: Recipe, epoch: int, shuffle: bool = True):
    return plan_batches(samples, cfg.train.micro_batch_size, cfg.train.seed, epoch, packing=cfg.data.packing,
                        group_by_length=cfg.data.group_by_length, max_seq_len=cfg.data.max_seq_len,
                        shuffle=shuffle)


def micro_batches(samples, cfg: Recipe, epoch: int, start: int, pad_id: int,
                  dtype: torch.dtype, keep=None) -> Iterator[MicroBatch]:
    """Micro-batches forever, from data position (epoch, start): the same plan as an
    uninterrupted run, so a resumed run sees exactly the batches it would have seen.

    `keep(n)` says whether the n-th micro-batch from `start` is this rank's; the others are
    counted but not collated (batch None). Default: all are."""
    # Packed rows need no [L, L] mask: the packed attention splits them where positions restart.
    packed_mask = "position_ids" if cfg.data.packing else "4d"
    # Packed rows are all max_seq_len wide: one shape for every step. Rows of 505-512 tokens
    # made each step's matmuls a new shape, and on CPU torch's oneDNN caches a primitive per
    # shape (+24 MB RSS a step on SmolLM2-135M, README "Host memory").
    width = cfg.data.max_seq_len if cfg.data.packing else 0
    n = 0
    while True:
        plan = plan_epoch(samples, cfg, epoch)
        for index in range(start, len(plan)):
            rows = [[samples[i] for i in row] for row in plan[index]]
            tokens = sum(len(s["input_ids"]) for row in rows for s in row)  # padding excluded
            # After the one-token shift a sample trains on its labels[1:]; packing masks the
            # first token of every later sample in a row, so the sum is the same either way.
            trained = sum(sum(1 for y in s["labels"][1:] if y != IGNORE_INDEX) for row in rows for s in row)
            mine = keep is None or keep(n)
            batch = collate(rows, pad_id, mask_dtype=dtype, packed_mask=packed_mask, width=width) if mine else None
            yield MicroBatch(epoch, index, tokens, trained, batch)
            n += 1
        epoch, start = epoch + 1, 0


@torch.no_grad()
def eval_loss(model, samples, batch_size, pad_id, chunk, device, autocast, max_batches=None) -> float:
    """Token-weighted mean loss over the eval samples, in a fixed order."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    plan = plan_batches(samples, batch_size, 0, 0, shuffle=False)
    for rows in plan[:max_batches]:
        batch = collate([[samples[i] for i in r] for r in rows], pad_id)
        with autocast:
            s, n = causal_lm_loss(model, to_device(batch, device), chunk)
        total, count = total + s.double(), count + n
    return float(total) / max(count, 1)  # one host sync for the whole eval


class InterruptFlag:
    """First Ctrl-C asks for a checkpoint at the end of the current step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)",
              file=sys.stderr)

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
