"""The training loop, top to bottom: set up, then for each step: lr, micro-batches,
clip, optimizer step, log, eval, checkpoint. Everything else lives in its own module."""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import save_adapter
from .attention import use_packed_attention
from .batching import collate, plan_batches
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX, build_datasets
from .errors import QloraError
from .generate import generate_ids, stop_ids
from .atomic import atomic_dir, atomic_write_json, atomic_write_text
from .lora import attach_lora, lora_parameters, trainable_summary
from .loss import causal_lm_loss
from .model import cache_root, load_model, load_tokenizer, pick_device
from .optim import build_optimizer, build_scheduler
from .recipe import Recipe, save_recipe

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"
DEMO_NEW_TOKENS = 24  # enough for the demo's one-line answers
MAX_LOG_PPL = 50.0  # perplexity is reported as exp(min(loss, 50)): no float overflow on a diverged run


class NonFiniteLoss(QloraError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at the last finished step."""


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False, demo: bool = False) -> int:
    """CLI entry: train, print the summary table, return the process exit status."""
    try:
        summary = train(recipe, resume=resume, overwrite=overwrite, demo=demo)
    except Interrupted as e:
        print(f"\ninterrupted: {e}; resume with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, demo: bool = False) -> dict:
    """Fine-tune the recipe's model; returns the run summary (also in <output>/summary.json).

    Args:
        recipe (Recipe): a validated recipe.
        resume (bool): continue from the newest complete checkpoint. Default False.
        overwrite (bool): delete a previous run in the output folder first. Default False.
        demo (bool): print eval loss and a generation before and after training. Default False.
    """
    cfg, t = recipe, recipe.train
    if cfg.data is None:
        raise QloraError("The recipe has no `data` section; add `data: {path: ...}`.")
    run_dir = Path(cfg.output.dir)
    prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        check_resumable(cfg, run_dir / "recipe.yaml")
    save_recipe(cfg, run_dir / "recipe.yaml")
    seed_everything(t.seed)
    device = pick_device(t.device)

    # ---- data: tokenized once, cached across runs
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set, data_summary = build_datasets(cfg.data, tokenizer, t.seed, cache_root() / "data")
    print(data_summary.format())
    atomic_write_json(run_dir / "data_summary.json", data_summary.__dict__)

    # ---- model: frozen (quantized) base + adapters
    model = load_model(cfg.model, device)
    torch.manual_seed(t.seed)  # adapter init does not depend on what loading consumed
    attach_lora(model, cfg.lora, dtype=getattr(torch, cfg.lora.dtype))
    if cfg.data.packing:
        use_packed_attention(model)  # each packed sample attends only to itself, at its own cost
    print(trainable_summary(model))
    params = lora_parameters(model)
    optimizer = build_optimizer(t.optimizer, params, t.lr, t.weight_decay)

    epoch_batches = len(plan_epoch(train_set, cfg, 0))
    steps_per_epoch = max(1, epoch_batches // t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, total_steps)
    pad_id = tokenizer.pad_token_id
    mask_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    autocast = autocast_context(device, cfg.model.quantization.compute_dtype)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "trained_tokens": 0, "wall": 0.0}
    if resume:
        ckpt = latest_checkpoint(run_dir)
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        print(f"resumed from {ckpt} (step {state['step']} of {total_steps})")

    def evaluate() -> float:
        return eval_loss(model, eval_set, t.micro_batch_size, pad_id, t.loss_chunk_size, device, autocast,
                         t.eval_max_batches)

    before = demo_snapshot(model, tokenizer, eval_set, evaluate) if demo and eval_set else None
    stream = micro_batches(train_set, cfg, state["epoch"], state["batch_in_epoch"], pad_id, mask_dtype)
    interrupt = InterruptFlag()
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    # disable=None: a bar on a terminal, plain log lines in files and CI.
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True, disable=None)
    # The log window travels in checkpoints, so a resumed run logs the same averages.
    window = state.pop("window", None) or {"loss": 0.0, "trained": 0, "tokens": 0, "time": 0.0}
    last_eval = None
    model.train()
    with interrupt, metrics_file, bar:
        while state["step"] < total_steps:
            t0 = time.perf_counter()
            # Normalise by the trained tokens of the whole step so that gradient accumulation
            # weighs every token the same, whatever the micro-batch it landed in.
            batches = [next(stream) for _ in range(t.grad_accum)]
            step_trained = sum(count_trained(b["labels"]) for *_, b in batches)
            step_loss = torch.zeros((), device=device)
            for *_, batch in batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast:
                    loss_sum, _ = causal_lm_loss(model, batch, t.loss_chunk_size)
                (loss_sum / max(step_trained, 1)).backward()
                step_loss += loss_sum.detach()
            # One host sync per optimizer step, not one per micro-batch.
            loss = step_loss.item() / max(step_trained, 1)
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {state['step'] + 1}; the last good checkpoint "
                                    f"is kept in {run_dir / 'checkpoints'}. Lower train.lr or check the data.")
            grad_norm = clip_grad_norm(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            epoch, index, _, _ = batches[-1]
            dt = time.perf_counter() - t0
            tokens = sum(n for _, _, n, _ in batches)
            state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1,
                         tokens=state["tokens"] + tokens, trained_tokens=state["trained_tokens"] + step_trained,
                         wall=state["wall"] + dt)
            for k, v in (("loss", loss * step_trained), ("trained", step_trained), ("tokens", tokens), ("time", dt)):
                window[k] += v
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                record = log_record(state, window, scheduler.get_last_lr()[0], grad_norm, device)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.write(format_record(record))
                window = {k: 0 if k != "loss" else 0.0 for k in window}
            if eval_set and t.eval_every and state["step"] % t.eval_every == 0 and state["step"] != total_steps:
                last_eval = log_eval(metrics_file, bar, state["step"], evaluate())
                model.train()
            if (t.save_every and state["step"] % t.save_every == 0) or interrupt.requested:
                save_checkpoint(run_dir, model, cfg.lora, cfg.model.name_or_path, optimizer, scheduler,
                                dict(state, window=window), t.keep_last)
            if interrupt.requested:
                raise Interrupted(f"checkpoint saved at step {state['step']}")

        if eval_set:
            last_eval = log_eval(metrics_file, bar, state["step"], evaluate())

    # ---- outputs: the adapter and a summary
    with atomic_dir(run_dir / "adapter", overwrite=True) as tmp:
        adapter_bytes = save_adapter(model, tmp, cfg.lora, cfg.model.name_or_path)
    summary = {
        "steps": state["step"],
        "train_loss": last_logged_loss(run_dir / "metrics.jsonl"),
        "eval_loss": last_eval,
        "eval_perplexity": math.exp(min(last_eval, MAX_LOG_PPL)) if last_eval is not None else None,
        "tokens": state["tokens"],
        "trained_tokens": state["trained_tokens"],
        "wall_time_s": round(state["wall"], 2),
        "peak_memory_bytes": peak_memory_bytes(device),
        "adapter_bytes": adapter_bytes,
        "trainable": trainable_summary(model),
        "device": device,
    }
    if before is not None:
        summary["demo"] = {"before": before, "after": demo_snapshot(model, tokenizer, eval_set, evaluate)}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- pieces of the loop


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool = False) -> None:
    if overwrite and run_dir.exists():
        # Only ever delete a run folder (or an empty one): output.dir=. must not wipe a project.
        if any(run_dir.iterdir()) and not any((run_dir / n).exists() for n in RUN_MARKERS):
            raise QloraError(f"--overwrite: {str(run_dir)!r} is not a qlora-lite run folder (no "
                             f"{', '.join(RUN_MARKERS)}); refusing to delete it. Choose another output.dir.")
        shutil.rmtree(run_dir)
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


RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints")
# What may change between a run and its resume: how long and how often, never what is trained.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
                     "train.eval_max_batches", "train.save_every", "train.keep_last", "train.device",
                     "output.dir"}  # a run folder may be moved


def check_resumable(cfg: Recipe, saved_path: Path) -> None:
    """Refuse to resume with settings that change the model, the data plan or the optimizer."""
    from .recipe import load_recipe

    if not saved_path.is_file():
        return
    saved = _flatten(load_recipe(saved_path).to_dict())
    now = _flatten(cfg.to_dict())
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key) and key not in RESUMABLE_CHANGES:
            raise QloraError(f"--resume: {key} is {now.get(key)!r} but the run was started with "
                             f"{saved.get(key)!r}; resume with the run's own settings "
                             f"(e.g. qlora-lite run {saved_path} --resume).")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(device: str, compute_dtype: str):
    """bf16/fp16 autocast on CUDA. On CPU the base and adapters are already in the compute
    dtype, so autocast would only add casts."""
    if device == "cuda" and compute_dtype != "float32":
        dtype = torch.bfloat16 if compute_dtype == "bfloat16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def plan_epoch(samples, cfg: Recipe, epoch: int, shuffle: bool = True):
    return plan_batches(samples, cfg.train.micro_batch_size, cfg.train.seed, epoch, packing=cfg.data.packing,
                        group_by_length=cfg.data.group_by_length, max_seq_len=cfg.data.max_seq_len,
                        shuffle=shuffle)


def micro_batches(samples, cfg: Recipe, epoch: int, start: int, pad_id: int, mask_dtype: torch.dtype):
    """(epoch, index, tokens, batch) forever, from data position (epoch, start): the same plan as an
    uninterrupted run, so a resumed run sees exactly the batches it would have seen."""
    while True:
        plan = plan_epoch(samples, cfg, epoch)
        for index in range(start, len(plan)):
            rows = [[samples[i] for i in row] for row in plan[index]]
            tokens = sum(len(s["input_ids"]) for row in rows for s in row)  # padding excluded
            # Packed rows need no [L, L] mask: the packed attention splits them where positions restart.
            packed_mask = "position_ids" if cfg.data.packing else "4d"
            yield epoch, index, tokens, collate(rows, pad_id, mask_dtype=mask_dtype, packed_mask=packed_mask)
        epoch, start = epoch + 1, 0


def count_trained(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the one-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def clip_grad_norm(params, max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))


@torch.no_grad()
def eval_loss(model, samples, batch_size, pad_id, chunk, device, autocast, max_batches=None) -> float:
    """Token-weighted mean loss over the eval samples, in a fixed order."""
    model.eval()
    total, count = 0.0, 0
    plan = plan_batches(samples, batch_size, 0, 0, shuffle=False)
    for k, rows in enumerate(plan[:max_batches]):
        batch = {k_: v.to(device) for k_, v in collate([[samples[i] for i in r] for r in rows], pad_id).items()}
        with autocast:
            s, n = causal_lm_loss(model, batch, chunk)
        total, count = total + s.item(), count + n
    return total / max(count, 1)


def peak_memory_bytes(device: str) -> int:
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def log_record(state, window, lr, grad_norm, device) -> dict:
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        "loss": window["loss"] / max(window["trained"], 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
        "trained_tokens_per_s": window["trained"] / max(window["time"], 1e-9),
        "tokens": state["tokens"],
        "trained_tokens": state["trained_tokens"],
        "peak_memory_gb": peak_memory_bytes(device) / 2**30,
    }


def format_record(r: dict) -> str:
    return (f"step {r['step']:>5}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  grad {r['grad_norm']:.3f}  "
            f"{r['tokens_per_s']:.0f} tok/s  peak {r['peak_memory_gb']:.2f} GB")


def log_eval(metrics_file, bar, step: int, loss: float) -> float:
    record = {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, MAX_LOG_PPL))}
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    bar.write(f"step {step:>5}  eval loss {loss:.4f}  ppl {record['eval_perplexity']:.2f}")
    return loss


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so the file reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def last_logged_loss(path: Path) -> float | None:
    losses = [json.loads(line).get("loss") for line in path.read_text().splitlines() if line.strip()]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


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


def demo_snapshot(model, tokenizer, samples, evaluate) -> dict:
    """Eval loss and a greedy generation for the first eval prompt (for `run --demo`)."""
    sample = samples[0]
    first_trained = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    prompt = sample["input_ids"][:first_trained]
    new = generate_ids(model, torch.tensor([prompt]), max_new_tokens=DEMO_NEW_TOKENS,
                       eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return {"eval_loss": evaluate(), "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "generation": tokenizer.decode(new, skip_special_tokens=True)}


def prompt_gist(prompt: str) -> str:
    """The instruction (and input) lines of a formatted prompt, without template headers."""
    lines = [line.strip() for line in prompt.splitlines()]
    return " / ".join(x for x in lines if x and not x.startswith(("###", "Below is an instruction")))


def format_summary(s: dict) -> str:
    rows = [
        ("steps", s["steps"]),
        ("train loss", f"{s['train_loss']:.4f}" if s["train_loss"] is not None else "-"),
        ("eval loss", f"{s['eval_loss']:.4f}" if s["eval_loss"] is not None else "-"),
        ("perplexity", f"{s['eval_perplexity']:.2f}" if s["eval_perplexity"] is not None else "-"),
        ("tokens", f"{s['tokens']:,} ({s['trained_tokens']:,} trained)"),
        ("wall time", f"{s['wall_time_s']:.1f} s"),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**30:.2f} GB"),
        ("adapter", f"{s['adapter_bytes'] / 2**20:.2f} MB"),
    ]
    if "demo" in s:
        b, a = s["demo"]["before"], s["demo"]["after"]
        rows += [("eval before", f"{b['eval_loss']:.4f}"), ("eval after", f"{a['eval_loss']:.4f}"),
                 ("prompt", prompt_gist(b["prompt"])),
                 ("gen before", repr(b["generation"])), ("gen after", repr(a["generation"]))]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)
