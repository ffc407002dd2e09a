"""Measured memory: real training steps per mode (qlora, lora, full), broken down by category.

Each mode loads the recipe's model the way `run` does (`model.load_model` +
`lora.attach_lora`), trains a few steps on random tokens, and the `MemoryTracker`
records the peak of live tensor storage and what it was made of. On CUDA the
allocator's own peak (torch.cuda.max_memory_allocated) is reported next to it.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

import torch

from .errors import QloraError
from .memory import CATEGORIES, MemoryTracker, module_tensors
from .recipe import Recipe

MODES = ("qlora", "lora", "full")
MODE_HELP = {
    "qlora": "NF4 base + LoRA (as trained)",
    "lora": "bf16 base + LoRA",
    "full": "bf16 full fine-tune, 32-bit optimizer state",
}
LABELS = {
    "base_weights": "base weights (+ quant constants)",
    "lora_params": "LoRA parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations saved for backward",
    "temporaries": "temporaries",
}


def parse_modes(text: str) -> list[str]:
    """`"qlora,lora,full"` -> list; unknown names raise QloraError."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise QloraError(f"--modes {text!r}: each mode must be one of {', '.join(MODES)} (comma-separated).")
    return modes


def optimizer_for(kind: str, params, lr: float, weight_decay: float = 0.0, full_precision: bool = False):
    """The optimizer `run` builds for `train.optimizer`; `full_precision` keeps 32-bit state.

    Args:
        kind (str): one of recipe.OPTIMIZERS.
        params (list[Tensor]): trainable parameters.
        lr (float): learning rate.
        weight_decay (float): Default 0.0.
        full_precision (bool): fp32 Adam state whatever the kind (the full fine-tune
            baseline): bitsandbytes' (paged) 32-bit AdamW. Default False.
    """
    import bitsandbytes as bnb

    from .optim import build_optimizer

    if not full_precision:
        return build_optimizer(kind, params, lr, weight_decay)
    cls = bnb.optim.PagedAdamW32bit if kind.startswith("paged") else bnb.optim.AdamW32bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def build_mode(recipe: Recipe, mode: str, device: str = "cpu"):
    """Load the recipe's model for `mode`; return (model, trainable params, lora params).

    Args:
        recipe (Recipe): the recipe.
        mode (str): "qlora", "lora" or "full".
        device (str): "cpu" or "cuda". Default "cpu".
    """
    from .lora import attach_lora, lora_parameters
    from .model import load_model

    cfg = copy.deepcopy(recipe.model)
    if mode != "qlora":
        cfg.quantization.bits = 16
    model = load_model(cfg, device)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [p for p in model.parameters()], []
    attach_lora(model, recipe.lora)
    lora = lora_parameters(model)
    return model, lora, lora


def measure_mode(recipe: Recipe, mode: str, steps: int = 3, seq_len: int = 256, batch_size: int = 1,
                 device: str = "cpu", seed: int = 0) -> dict:
    """Train `steps` steps of `mode` on random tokens; return the peak breakdown.

    The last step runs two micro-batches when the recipe accumulates gradients, so the
    peak includes optimizer state and gradients held across micro-batches, as in `run`.

    Args:
        recipe (Recipe): the recipe (model, lora, train.optimizer, train.loss_chunk_size).
        mode (str): "qlora", "lora" or "full".
        steps (int): optimizer steps. Default 3.
        seq_len (int): tokens per sample. Default 256.
        batch_size (int): samples per micro-batch. Default 1.
        device (str): "cpu" or "cuda". Default "cpu".
        seed (int): seeds the random tokens. Default 0.
    """
    from .loss import causal_lm_loss
    from .train import autocast_context

    t0 = time.perf_counter()
    gc.collect()
    model, trainable, lora = build_mode(recipe, mode, device)
    model.train()
    tc = recipe.train
    opt = optimizer_for(tc.optimizer, trainable, tc.lr, tc.weight_decay, full_precision=mode == "full")
    vocab = model.get_input_embeddings().weight.shape[0]
    micro = 2 if tc.grad_accum > 1 else 1
    gen = torch.Generator().manual_seed(seed)
    cuda = device.startswith("cuda")
    autocast = autocast_context(device, recipe.model.quantization.compute_dtype)
    tracker = MemoryTracker(module_tensors(model, lora))
    tracker.watch_optimizer(opt)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    with tracker:
        for step in range(steps):
            # Only the last step needs a second micro-batch: earlier ones just create the state.
            for _ in range(micro if step == steps - 1 else 1):
                tracker.set_phase("forward", step)
                ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
                with autocast:
                    loss_sum, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, tc.loss_chunk_size)
                loss = loss_sum / n
                tracker.set_phase("backward")
                loss.backward()
                losses.append(float(loss.detach()))
                del loss, ids
            tracker.set_phase("optimizer")
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    b = tracker.breakdown()
    result = {
        "mode": mode,
        "description": MODE_HELP[mode],
        "device": device,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "micro_batches_per_step": micro,
        "optimizer": type(opt).__name__,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak": b.to_dict(),
        "losses": losses,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cuda:
        torch.cuda.synchronize()
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    del model, opt, trainable, lora, tracker
    gc.collect()
    return result


# ---------------------------------------------------------------- reports


def gib(n: float) -> str:
    """Bytes as a short human string (GiB above 1 GiB, else MiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_markdown(results: list[dict], title: str = "") -> str:
    """One table per mode plus the QLoRA/full and LoRA/full ratios of the peaks."""
    lines = [f"# Memory profile{': ' + title if title else ''}", ""]
    for r in results:
        p = r["peak"]
        lines += [f"## {r['mode']}: {r['description']}", "",
                  f"{r['device']}, seq {r['seq_len']}, batch {r['batch_size']}, {r['steps']} steps "
                  f"({r['micro_batches_per_step']} micro-batches in the last), {r['optimizer']}, "
                  f"{r['trainable_params']:,} trainable; peak in {p['phase']} of step {p['step']}.", "",
                  "| category | bytes | share |", "|---|---:|---:|"]
        for c in CATEGORIES:
            lines.append(f"| {LABELS[c]} | {gib(p['bytes'][c])} | {100 * p['bytes'][c] / max(p['total'], 1):.1f}% |")
        lines.append(f"| **total at peak** | **{gib(p['total'])}** | 100% |")
        if p.get("host_peak"):  # offloaded activation checkpoints: host RAM, not device memory
            lines.append(f"| host memory (offloaded checkpoints), most at once | {gib(p['host_peak'])} | |")
        if "cuda_max_allocated" in r:
            lines.append(f"| CUDA allocator peak (allocated / reserved) | "
                         f"{gib(r['cuda_max_allocated'])} / {gib(r['cuda_max_reserved'])} | |")
        lines.append("")
    by = {r["mode"]: r["peak"]["total"] for r in results}
    if "full" in by:
        lines += ["## Ratios of peaks", ""]
        for m in ("qlora", "lora"):
            if m in by:
                lines.append(f"- {m}/full: {by[m] / by['full']:.3f}")
        lines.append("")
    return "\n".join(lines)


def plot_png(results: list[dict], path) -> bool:
    """Stacked bar per mode; returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results), 4.5))
    names = [r["mode"] for r in results]
    bottom = [0.0] * len(results)
    for c in CATEGORIES:
        vals = [r["peak"]["bytes"][c] / 2**20 for r in results]
        ax.bar(names, vals, bottom=bottom, label=LABELS[c])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB at peak")
    ax.set_title("Peak memory by category")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def profile_recipe(recipe: Recipe, modes=MODES, steps: int = 3, seq_len: int | None = None,
                   batch_size: int | None = None, out_dir=None, device: str | None = None,
                   title: str = "", log=print) -> list[dict]:
    """Measure every mode and write report.md, report.json and memory.png to `out_dir`.

    Args:
        recipe (Recipe): the recipe.
        modes (iterable[str]): modes to run. Default all.
        steps (int): optimizer steps per mode. Default 3.
        seq_len (int | None): default the recipe's data.max_seq_len (512 without data).
        batch_size (int | None): default the recipe's train.micro_batch_size.
        out_dir (str | Path | None): where the reports go; None writes nothing.
        device (str | None): default the recipe's train.device resolved.
        title (str): a name for the report heading. Default "".
        log (callable): progress lines. Default print.
    """
    from .atomic import atomic_write_json, atomic_write_text
    from .model import pick_device

    if steps < 1:
        raise QloraError(f"--steps must be >= 1, got {steps}.")
    seq_len = seq_len or (recipe.data.max_seq_len if recipe.data else 512)
    batch_size = batch_size or recipe.train.micro_batch_size
    device = device or pick_device(recipe.train.device)
    results = []
    for mode in modes:
        r = measure_mode(recipe, mode, steps, seq_len, batch_size, device)
        log(f"{mode:>5}: peak {gib(r['peak']['total'])} ({r['peak']['phase']}), {r['seconds']} s")
        results.append(r)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "report.md", report_markdown(results, title))
        atomic_write_json(out / "report.json", {"title": title, "results": results})
        if not plot_png(results, out / "memory.png"):
            log("matplotlib is not installed, skipping memory.png (pip install 'qlora-lite[plot]').")
    return results
