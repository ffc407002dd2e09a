"""What a run logs and reports: metrics.jsonl records, the log window, peak memory, the summary table."""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils.atomic import atomic_write_text
from ..utils.readers import read_log

MAX_LOG_PPL = 50.0  # perplexity is reported as exp(min(loss, 50)): no float overflow on a diverged run


def perplexity(loss: float) -> float:
    return math.exp(min(loss, MAX_LOG_PPL))


@dataclass
class LogWindow:
    """Sums over the steps since the last log line; travels in checkpoints so a resumed run
    logs the same averages as a straight one."""

    loss: float = 0.0  # sum of (step loss x step weight)
    trained: int = 0
    tokens: int = 0
    time: float = 0.0
    weight: float = 0.0  # what the loss is a mean over: trained tokens (SFT) or pairs (DPO, ORPO)
    stats: dict = field(default_factory=dict)  # the objective's statistics: name -> [sum of mean x count, count]

    @classmethod
    def from_saved(cls, saved: dict) -> LogWindow:
        """The window of a checkpoint; those written before `weight` existed weighed by trained tokens."""
        return cls(**{"weight": saved.get("trained", 0), **saved})

    def add(self, loss: float, trained: int, tokens: int, seconds: float, weight: float | None = None,
            stats: dict | None = None, counts: dict | None = None) -> None:
        """One step: its loss (weighed by `weight`, default `trained`) and its statistics
        (`stats`: name -> mean, weighed by `counts`: name -> count)."""
        weight = trained if weight is None else weight
        self.loss += loss * weight
        self.weight += weight
        self.trained += trained
        self.tokens += tokens
        self.time += seconds
        for name, mean in (stats or {}).items():
            total, count = self.stats.get(name, (0.0, 0))
            self.stats[name] = [total + mean * counts[name], count + counts[name]]


def peak_memory(device: str) -> dict:
    """Peak memory since the last reset: CUDA allocator peaks (allocated and reserved), or the
    process's peak resident set on CPU. bitsandbytes' paged optimizer state lives in CUDA
    unified memory, outside the allocator, so it is in neither CUDA figure."""
    if device.startswith("cuda"):
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # KiB on Linux


def reset_peak_memory(device: str) -> None:
    """Start the peak after setup, so loading (e.g. a bf16 layer before quantization) is not counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def log_record(state, window: LogWindow, lr: float, grad_norm: float, device: str) -> dict:
    """One metrics.jsonl training record: window averages plus the run's running totals."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "loss": window.loss / max(window.weight, 1),
        **{name: total / max(count, 1) for name, (total, count) in window.stats.items()},
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": window.tokens / max(window.time, 1e-9),
        "trained_tokens_per_s": window.trained / max(window.time, 1e-9),
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        **peak_memory(device),
    }


def format_record(r: dict) -> str:
    return (f"step {r['step']:>5}  loss {r['loss']:.4f}{format_preference(r)}  lr {r['lr']:.2e}  "
            f"grad {r['grad_norm']:.3f}  {r['tokens_per_s']:.0f} tok/s  peak {r['peak_memory_gb']:.2f} GB")


def format_preference(r: dict, prefix: str = "") -> str:
    """The preference statistics of a record for the console: reward accuracy and margin (and ORPO's NLL)."""
    if f"{prefix}rewards/accuracies" not in r:
        return ""
    nll = f"  nll {r[prefix + 'nll_loss']:.4f}" if f"{prefix}nll_loss" in r else ""
    return f"{nll}  acc {r[prefix + 'rewards/accuracies']:.2f}  margin {r[prefix + 'rewards/margins']:.4f}"


class MetricsLog:
    """metrics.jsonl, appended and flushed record by record, echoed through `write` (a tqdm bar's)
    and sent to the run's experiment trackers (`tracker`, train/tracking.py) when given."""

    def __init__(self, path: Path | None, write=print, tracker=None):
        self.file = open(path, "a") if path is not None else None  # None: a rank that does not write
        self.write = write
        self.tracker = tracker

    def train(self, record: dict) -> None:
        self._append(record)
        self.write(format_record(record))

    def eval(self, step: int, metrics: dict | None, seconds: dict[str, float]) -> dict | None:
        """Log an eval point: `metrics` ({"loss": ..., and the objective's statistics}; None when
        there is no eval split) and how long it took (`eval_seconds`, `sample_seconds`), kept apart
        from the training records' tokens/s. Returns `metrics`."""
        record = {"step": step, **{f"eval_{k}": v for k, v in (metrics or {}).items()},
                  **{k: round(v, 3) for k, v in seconds.items()}}
        if metrics is not None and set(metrics) == {"loss"}:  # SFT: a next-token loss, so a perplexity
            record["eval_perplexity"] = perplexity(metrics["loss"])
        self._append(record)
        took = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in seconds.items())
        if metrics is None:
            self.write(f"step {step:>5}  samples ({took})")
            return None
        ppl = f"  ppl {record['eval_perplexity']:.2f}" if "eval_perplexity" in record else ""
        self.write(f"step {step:>5}  eval loss {metrics['loss']:.4f}{ppl}{format_preference(record, 'eval_')}  ({took})")
        return metrics

    def _append(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so the file reads as one run."""
    if not path.exists():
        return
    keep = [r for r in read_log(path) if r.get("step", 0) <= step]  # read_log: a line cut by kill -9 is dropped
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def logged_seconds(path: Path, key: str) -> float:
    """The sum of `key` (eval_seconds, sample_seconds) over metrics.jsonl: time spent outside training steps."""
    return round(sum(r.get(key, 0.0) for r in read_log(path)), 2)


def last_logged_loss(path: Path) -> float | None:
    losses = [r.get("loss") for r in read_log(path)]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


def format_summary(s: dict) -> str:
    """The table `run` prints at the end (summary.json, human-readable)."""
    def num(key: str, fmt: str) -> str:
        return format(s[key], fmt) if s.get(key) is not None else "-"

    rows = [
        ("steps", s["steps"]),
        ("train loss", num("train_loss", ".4f")),
        ("eval loss", num("eval_loss", ".4f")),
        ("perplexity", num("eval_perplexity", ".2f")),
        ("tokens", f"{s['tokens']:,} ({s['trained_tokens']:,} trained)"),
        ("wall time", f"{s['wall_time_s']:.1f} s training" + "".join(
            f", {s[k]:.1f} s {what}" for k, what in (("eval_time_s", "eval"), ("sample_time_s", "samples")) if s.get(k))),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**30:.2f} GB"),
        ("adapter", f"{s['adapter_bytes'] / 2**20:.2f} MB"),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)
