"""The training loop: `train` sets a run up (setup.setup_run), `fit` runs its loop, `finish`
writes the adapter and summary.

The loop in `fit` reads top to bottom: micro-batches, one optimizer step (step.train_step),
log, eval (with the sample answers, train/samples.py), checkpoint. Everything else lives in its
own module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from ..lora.files import save_adapter
from ..lora.layer import trainable_summary
from ..parallel.distributed import close_world, merge_peaks, peer_lost, step_sync, world_is_main
from ..recipe import Recipe
from ..runs.card import adapter_card, write_card
from ..runs.events import record_event
from ..runs.lock import run_lock
from ..utils.atomic import atomic_dir, atomic_write_json
from .batches import MicroBatch, mask_dtype, micro_batches
from .metrics import (LogWindow, MetricsLog, format_summary, last_logged_loss, log_record, logged_seconds, peak_memory,
                      perplexity)
from .parallel_run import adapter_state
from .samples import Sampler
from .setup import Run, setup_run
from .step import NonFiniteLoss, train_step
from .stopping import (
    SAVE_GUESS_BYTES_PER_S,
    StepAbandoned,
    StopFlag,
    Stopped,
    TimeBudget,
    reason_name,
    restore_rng,
    rng_snapshot,
)

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"; SIGTERM 143, SIGUSR1 138 (stopping.py)


def run_recipe(recipe: Recipe, resume: bool | str = False, overwrite: bool = False, demo: bool = False,
               accept_changed_data: bool = False, recipe_path: str = "RECIPE") -> int:
    """CLI entry: train, print the summary table, return the process exit status."""
    main = world_is_main()
    # From here to the exit line: a signal while the stopped run saves, or after, is only noted.
    with StopFlag() as flag:
        try:
            summary = train(recipe, resume=resume, overwrite=overwrite, demo=demo,
                            accept_changed_data=accept_changed_data, stop=flag)
        except Stopped as e:
            print(f"\n{e.line(recipe_path)}", file=sys.stderr) if main else None
            return e.exit_status
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


def train(recipe: Recipe, resume: bool | str = False, overwrite: bool = False, demo: bool = False,
          accept_changed_data: bool = False, stop: StopFlag | None = None) -> dict:
    """Fine-tune the recipe's model; returns the run summary (also in <output>/summary.json).

    Args:
        recipe (Recipe): a validated recipe.
        resume (bool | str): True: continue from the newest complete checkpoint; "auto": that
            when there is one, else start fresh (runs/folder.resolve_resume). Default False.
        overwrite (bool): delete a previous run in the output folder first. Default False.
        demo (bool): eval loss and a generation before and after training. Default False.
        accept_changed_data (bool): resume although the data changed (recorded). Default False.
        stop (StopFlag | None): the signal flag the caller holds; None: one for the training. Default None.
    """
    budget = TimeBudget(recipe.train.max_time_s)  # the clock starts before setup: loading counts
    # One process owns a run folder, from before its first write to the summary (runs/lock.py); under
    # torchrun only the writing rank (0) holds the lock.
    with run_lock(recipe.output.dir, "run --resume" if resume else "run", enabled=writing_rank()):
        run = setup_run(recipe, resume=resume, overwrite=overwrite, accept_changed_data=accept_changed_data)
        try:
            with contextlib.nullcontext(stop) if stop is not None else StopFlag() as flag:
                before = _demo(run) if demo else None
                fit(run, flag, budget)
                extra = {"demo": {"before": before, "after": _demo(run)}} if before is not None else {}
                return finish(run, extra)
        except NonFiniteLoss as e:
            if run.world.main:
                record_event(run.run_dir, "error", run.state.step, reason=str(e), world_size=run.world.size)
            raise
        finally:
            close_world(run.world)


def writing_rank() -> bool:
    """Whether this process writes the run folder: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def _demo(run: Run) -> dict | None:
    from .demo import demo_snapshot

    return demo_snapshot(run.model, run.tokenizer, run.eval_set, run.evaluate) if run.eval_set else None


def fit(run: Run, flag: StopFlag | None = None, budget: TimeBudget | None = None) -> None:
    """Train until `total_steps`: each step is grad_accum micro-batches and one optimizer step.
    A stop signal or train.max_time ends it early with a checkpoint (`stop_run`, raises Stopped)."""
    t, state, world = run.recipe.train, run.state, run.world
    flag, budget = flag or StopFlag(), budget or TimeBudget(t.max_time_s)
    budget.save_s = budget.save_s or checkpoint_bytes(run) / SAVE_GUESS_BYTES_PER_S
    stream = micro_batches(run.train_set, run.recipe, state.epoch, state.batch_in_epoch,
                           run.tokenizer.pad_token_id, mask_dtype(run.model), keep=world.keeps(t.grad_accum),
                           objective=run.objective)
    log = MetricsLog(run.run_dir / "metrics.jsonl" if world.main else None, tracker=run.tracker)  # rank 0 writes
    # disable=None: a bar on a terminal, plain log lines in files and CI.
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if world.main else True)
    log.write = bar.write if world.main else _quiet
    sampler = Sampler(run, log.write, world.main)  # train.sample_prompts; nothing to do without them
    run.model.train()
    with bar, run.tracker:
        try:
            if state.step == 0:
                eval_point(run, log, sampler, with_eval=False)  # the base's own answers
            while state.step < run.total_steps:
                # All ranks stop at the same step; rank 0's clock decides train.max_time.
                if code := flag.agreed(world, time_up=world.main and budget.up()):
                    stop_run(run, code, budget)
                t0 = time.perf_counter()
                rng = rng_snapshot()  # a step cut short puts the RNG back here: the checkpoint stays exact
                micro = [next(stream) for _ in range(t.grad_accum * world.size)]  # the global step
                try:
                    result = checked_step(run, micro, stop=lambda: flag.poll(world))
                except StepAbandoned as e:
                    restore_rng(rng)
                    stop_run(run, e.code, budget)
                advance(run, micro, result, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}")
                if state.step % t.log_every == 0 or state.step == run.total_steps:
                    log.train(merge_peaks(world, log_record(state, run.window, run.scheduler.get_last_lr()[0],
                                                            result.grad_norm, run.device)))
                    run.window = LogWindow()
                if t.eval_every and state.step % t.eval_every == 0 and state.step != run.total_steps:
                    eval_point(run, log, sampler)
                if t.save_every and state.step % t.save_every == 0:
                    timed_save(run, budget)
                budget.note_step(time.perf_counter() - t0)
            eval_point(run, log, sampler)
        finally:
            log.close()
            sampler.close()


def eval_point(run: Run, log: MetricsLog, sampler: Sampler, with_eval: bool = True) -> None:
    """The eval loss (when there is an eval split) and the sample answers at this step, each timed
    and logged apart from the training steps' tokens/s."""
    seconds = {}
    metrics = None
    if with_eval and run.eval_set:
        t0 = time.perf_counter()
        metrics = run.evaluate()
        seconds["eval_seconds"] = time.perf_counter() - t0
    if sampler.prompts:
        seconds["sample_seconds"] = sampler(run.state.step)
    if seconds:
        run.last_eval = log.eval(run.state.step, metrics, seconds) or run.last_eval
    run.model.train()


def timed_save(run: Run, budget: TimeBudget) -> None:
    """Checkpoint the last finished step (every rank takes part), timing it for train.max_time."""
    t0 = time.perf_counter()
    run.save()
    run.saved_step = run.state.step
    budget.note_save(time.perf_counter() - t0)


def stop_run(run: Run, code: int, budget: TimeBudget) -> None:
    """Save the last finished step (unless that checkpoint exists), record why, raise Stopped."""
    if run.saved_step != run.state.step:
        timed_save(run, budget)
    checkpoint = run.run_dir / "checkpoints" / f"step-{run.state.step}"
    if run.world.main:
        record_event(run.run_dir, "stop", run.state.step, reason=reason_name(code), world_size=run.world.size,
                     checkpoint=str(checkpoint), save_s=round(budget.save_s, 3))
    raise Stopped(code, run.state.step, checkpoint)


def checkpoint_bytes(run: Run) -> int:
    """About what a checkpoint writes: the adapter and two optimizer moments per weight (fp32,
    the most an optimizer we offer keeps); train.max_time's guess before the first save."""
    return sum(p.numel() * (p.element_size() + 8) for p in run.params)


def _quiet(message: str) -> None:
    """The log echo of ranks other than 0."""


def checked_step(run: Run, micro: list[MicroBatch], stop=None):
    """One optimizer step over this rank's share of `micro` (the global step); a NaN/inf loss
    names the step and the checkpoint that stays."""
    t, world = run.recipe.train, run.world
    # Divide by the counts (trained tokens, pairs) of the whole global step, sum over ranks.
    normalizer = {u: sum(m.units[u] for m in micro) for u in micro[0].units}
    try:
        return train_step(run.model, [m.batch for m in micro if m.batch is not None], run.params, run.optimizer,
                          device=run.device, max_grad_norm=t.max_grad_norm, loss_chunk_size=t.loss_chunk_size,
                          autocast=run.autocast, scaler=run.scaler, normalizer=normalizer,
                          sync=step_sync(world, run.params, reduce_grads=world.strategy == "ddp"),
                          objective=run.objective, stop=stop)
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
    units, objective = result.units, run.objective
    run.window.add(result.loss, result.trained, tokens, seconds, weight=units[objective.loss_unit],
                   stats=result.stats, counts={name: units[u] for name, u in objective.stats})


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
    evaluated = run.last_eval or {}
    summary = {
        "objective": run.objective.name,
        "steps": run.state.step,
        "train_loss": last_logged_loss(run.run_dir / "metrics.jsonl"),
        "eval_loss": evaluated.get("loss"),
        "eval_perplexity": perplexity(evaluated["loss"]) if set(evaluated) == {"loss"} else None,
        **{f"eval_{k}": v for k, v in evaluated.items() if k != "loss"},
        "tokens": run.state.tokens,
        "trained_tokens": run.state.trained_tokens,
        "wall_time_s": round(run.state.wall, 2),  # the training steps only; eval and samples below
        "eval_time_s": logged_seconds(run.run_dir / "metrics.jsonl", "eval_seconds"),
        "sample_time_s": logged_seconds(run.run_dir / "metrics.jsonl", "sample_seconds"),
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
        record_event(run.run_dir, "finish", run.state.step, world_size=run.world.size)
        write_card(run.run_dir / "adapter", adapter_card(cfg, run.run_dir))  # README.md for `hf upload`
        run.tracker.finish(summary)
    run.world.barrier()
    return summary
