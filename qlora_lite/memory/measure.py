"""Measured memory: real training steps per mode (qlora, lora, full), broken down by category.

Each mode loads the recipe's model the way `run` does (`model.load_model` +
`lora.attach_lora`), trains a few steps on random tokens, and the `MemoryTracker`
records the peak of live tensor storage and what it was made of. On CUDA the
allocator's own peak (torch.cuda.max_memory_allocated) is reported next to it.
"""

from __future__ import annotations

import gc
import io
import time
from pathlib import Path

import torch

from ..errors import QloraError
from ..recipe import Recipe
from ..train.metrics import reset_peak_memory
from ..train.step import autocast_context, grad_scaler, train_step
from ..utils.units import gib
from .tracker import CATEGORIES, LABELS, MODES, MemoryTracker, module_tensors

MODE_HELP = {
    "qlora": "NF4 base + LoRA (as trained)",
    "lora": "bf16 base + LoRA",
    "full": "bf16 full fine-tune, 32-bit optimizer state",
}


def parse_modes(text: str) -> list[str]:
    """`"qlora,lora,full"` -> list; unknown names raise QloraError."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise QloraError(f"--modes {text!r}: each mode must be one of {', '.join(MODES)} (comma-separated).")
    return modes


def measure_mode(recipe: Recipe, mode: str, steps: int = 3, seq_len: int = 256, batch_size: int = 1,
                 device: str = "cpu", seed: int = 0) -> dict:
    """Train `steps` steps of `mode` on random tokens through `step.train_step`; return the peak breakdown.

    The last step runs two micro-batches when the recipe accumulates gradients, so the
    peak includes optimizer state and gradients held across micro-batches, as in `run`.

    Args:
        recipe (Recipe): the recipe (model, lora, train.optimizer, train.loss_chunk_size; train.objective
            dpo or orpo trains on random pairs, with DPO's reference pass).
        mode (str): "qlora", "lora" or "full".
        steps (int): optimizer steps. Default 3.
        seq_len (int): tokens per sample. Default 256.
        batch_size (int): samples (pairs, for DPO and ORPO) per micro-batch. Default 1.
        device (str): "cpu" or "cuda". Default "cpu".
        seed (int): seeds the random tokens. Default 0.
    """
    from ..train.objectives import build_objective
    from ..train.optim import build_optimizer, optimizer_params
    from ..train.reference import Reference
    from ..train.setup import build_model

    if mode == "full" and recipe.train.objective == "dpo":
        raise QloraError("a full fine-tune has no adapters to disable for DPO's reference (it would need a second "
                         "copy of the model); measure the qlora and lora modes.")
    t0 = time.perf_counter()
    model, trainable = build_model(recipe, device, mode=mode)
    lora = trainable if mode != "full" else []
    model.train()
    tc, compute = recipe.train, recipe.model.quantization.compute_dtype
    opt = build_optimizer(tc.optimizer, trainable, tc.lr, tc.weight_decay, full_precision=mode == "full")
    stepped = optimizer_params(opt)
    scaler = grad_scaler(compute, recipe.lora.dtype, device) if mode != "full" else None
    sequences = batch_size * (1 if tc.objective == "sft" else 2)  # a pair is two sequences
    plan = random_steps(model.get_input_embeddings().weight.shape[0], steps, 2 if tc.grad_accum > 1 else 1,
                        sequences, seq_len, seed)
    objective = build_objective(tc, recipe.data, Reference("base"))
    if objective.pairs:
        plan = [[pairs_batch(b) for b in batches] for batches in plan]
    tracker = MemoryTracker(module_tensors(model, lora))
    tracker.watch_optimizer(opt)
    reset_peak_memory(device)
    losses = []
    with tracker:
        for step, batches in enumerate(plan):
            r = train_step(model, batches, stepped, opt, device=device, max_grad_norm=tc.max_grad_norm,
                           loss_chunk_size=tc.loss_chunk_size, autocast=autocast_context(device, compute),
                           scaler=scaler, phase=lambda name, s=step: tracker.set_phase(name, s), objective=objective)
            losses.append(r.loss)
    result = {
        "mode": mode, "description": MODE_HELP[mode], "device": device, "seq_len": seq_len,
        "batch_size": batch_size, "steps": steps, "micro_batches_per_step": len(plan[-1]),
        "optimizer": type(opt).__name__, "trainable_params": sum(p.numel() for p in trainable),
        "peak": tracker.breakdown().to_dict(), "losses": losses, "seconds": round(time.perf_counter() - t0, 2),
    }
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    return result


def random_steps(vocab: int, steps: int, last_micro: int, batch_size: int, seq_len: int, seed: int) -> list:
    """Host batches of random tokens, trained on every token; only the last step gets `last_micro`
    micro-batches (earlier ones just create the optimizer state)."""
    gen = torch.Generator().manual_seed(seed)

    def batch():
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "labels": ids}

    return [[batch() for _ in range(last_micro if k == steps - 1 else 1)] for k in range(steps)]


def pairs_batch(batch: dict) -> dict:
    """Preference pairs from a batch of random rows: rows 2k and 2k + 1 are a pair's chosen and
    rejected, every token but the first scored (a pair of `seq_len`-token sequences, all completion)."""
    from ..data.batching import collate_pairs

    rows = batch["input_ids"].tolist()
    sides = [{"input_ids": ids, "labels": [-100] + ids[1:]} for ids in rows]
    return collate_pairs([[{"chosen": c, "rejected": r}] for c, r in zip(sides[::2], sides[1::2])], 0)


def run_mode_isolated(recipe: Recipe, mode: str, steps: int, seq_len: int, batch_size: int, device: str,
                      memory_limit: float | None) -> dict:
    """Measure one mode, or say why not: predicted not to fit `memory_limit`, or out of memory.

    Nothing of the mode outlives this call (model, optimizer, tracker), and the CUDA cache is
    emptied after it, so the next mode starts from an empty device.
    """
    if mode == "full" and recipe.train.objective == "dpo":
        return skipped(mode, None, "DPO's reference is the base with the adapters disabled; a full fine-tune would "
                                   "need a second copy of the model")
    predicted = predicted_peak(recipe, mode, seq_len, batch_size, device)
    if memory_limit and predicted and predicted > memory_limit:
        return skipped(mode, predicted, f"predicted {gib(predicted)}, does not fit in {gib(memory_limit)}")
    try:
        result = measure_mode(recipe, mode, steps, seq_len, batch_size, device)
    except torch.OutOfMemoryError as e:
        reason = f"out of memory: {str(e).splitlines()[0]}"
        del e  # its traceback holds the mode's tensors
        result = skipped(mode, predicted, reason)
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["predicted_total"] = predicted
    return result


def skipped(mode: str, predicted: int | None, reason: str) -> dict:
    return {"mode": mode, "description": MODE_HELP[mode], "skipped": reason, "predicted_total": predicted}


def predicted_peak(recipe: Recipe, mode: str, seq_len: int, batch_size: int, device: str) -> int | None:
    """`estimate`'s peak for this mode and shape; None when the model's config cannot be read."""
    from dataclasses import replace

    from ..model.loader import resolve_model_path
    from .estimate import estimate_mode
    from .estimate_inputs import load_arch, settings_from_recipe

    try:
        arch = load_arch(resolve_model_path(recipe.model.name_or_path))
    except QloraError:
        return None
    s = settings_from_recipe(recipe, seq_len, "cuda" if device.startswith("cuda") else "cpu")
    return estimate_mode(arch, replace(s, micro_batch_size=batch_size), mode)["total"]


# ---------------------------------------------------------------- reports


def report_markdown(results: list[dict], title: str = "") -> str:
    """One table per measured mode, a line per skipped one, and the QLoRA/full and LoRA/full ratios."""
    lines = [f"# Memory profile{': ' + title if title else ''}", ""]
    for r in results:
        lines += mode_markdown(r) + [""]
    by = {r["mode"]: r for r in results}
    if "full" in by:
        lines += ["## Ratios of peaks", ""]
        for m in ("qlora", "lora"):
            if m in by:
                guessed = [x for x in (m, "full") if "skipped" in by[x]]
                lines.append(f"- {m}/full: {peak_total(by[m]) / peak_total(by['full']):.3f}"
                             + (f" ({' and '.join(guessed)} {PREDICTED})" if guessed else ""))
        lines.append("")
    return "\n".join(lines)


PREDICTED = "(predicted)"


def peak_total(r: dict) -> float:
    """The measured peak, or the estimate's for a mode that was not run (nan when neither)."""
    if "skipped" not in r:
        return r["peak"]["total"]
    return r["predicted_total"] if r.get("predicted_total") else float("nan")


def mode_markdown(r: dict) -> list[str]:
    head = f"## {r['mode']}: {r['description']}"
    if "skipped" in r:
        return [head, "", f"**Not measured**: {r['skipped']}. The bar in memory.png is the estimate, "
                          "hatched and marked predicted."]
    p = r["peak"]
    lines = [head, "", f"{r['device']}, seq {r['seq_len']}, batch {r['batch_size']}, {r['steps']} steps "
             f"({r['micro_batches_per_step']} micro-batches in the last), {r['optimizer']}, "
             f"{r['trainable_params']:,} trainable; peak in {p['phase']} of step {p['step']}.", "",
             "| category | bytes | share |", "|---|---:|---:|"]
    for c in CATEGORIES:
        lines.append(f"| {LABELS[c]} | {gib(p['bytes'][c])} | {100 * p['bytes'][c] / max(p['total'], 1):.1f}% |")
    lines.append(f"| **total at peak** (tracker) | **{gib(p['total'])}** | 100% |")
    if p.get("host_peak"):  # offloaded activation checkpoints: host RAM, not device memory
        lines.append(f"| host memory (offloaded checkpoints), most at once | {gib(p['host_peak'])} | |")
    if r.get("predicted_total"):
        lines.append(f"| estimate's prediction | {gib(r['predicted_total'])} | |")
    if "cuda_max_allocated" in r:
        lines.append(f"| CUDA allocator peak (allocated / reserved) | "
                     f"{gib(r['cuda_max_allocated'])} / {gib(r['cuda_max_reserved'])} | |")
    return lines


def plot_png(results: list[dict], path) -> None:
    """Stacked bar per measured mode; a hatched bar of the estimate for a mode that was not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results), 4.5))
    names = [r["mode"] + ("\n" + PREDICTED if "skipped" in r else "") for r in results]
    bottom = [0.0] * len(results)
    for c in CATEGORIES:
        vals = [0.0 if "skipped" in r else r["peak"]["bytes"][c] / 2**20 for r in results]
        ax.bar(names, vals, bottom=bottom, label=LABELS[c])
        bottom = [b + v for b, v in zip(bottom, vals)]
    predicted = [(r.get("predicted_total") or 0) / 2**20 if "skipped" in r else 0.0 for r in results]
    if any(predicted):
        ax.bar(names, predicted, fill=False, hatch="//", label="predicted (not run)")
    ax.set_ylabel("MiB at peak")
    ax.set_title("Peak memory by category")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: list[dict], out_dir, title: str) -> list[Path]:
    """report.md, report.json and memory.png in `out_dir`, each written atomically; returns their paths."""
    from ..utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", report_markdown(results, title))
    atomic_write_json(out / "report.json", {"title": title, "results": results})
    buf = io.BytesIO()
    plot_png(results, buf)
    atomic_write_bytes(out / "memory.png", buf.getvalue())
    return [out / "report.md", out / "report.json", out / "memory.png"]


def profile_recipe(recipe: Recipe, modes=MODES, steps: int = 3, seq_len: int | None = None,
                   batch_size: int | None = None, out_dir=None, device: str | None = None,
                   title: str = "", log=print, memory_limit: float | None = None) -> list[dict]:
    """Measure every mode, writing report.md, report.json and memory.png to `out_dir` after each.

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
        memory_limit (float | None): bytes; a mode predicted above it is not run. Default: the
            GPU's memory on CUDA, no limit on CPU.
    """
    from ..model.loader import pick_device

    if steps < 1:
        raise QloraError(f"--steps must be >= 1, got {steps}.")
    seq_len = seq_len or (recipe.data.max_seq_len if recipe.data else 512)
    batch_size = batch_size or recipe.train.micro_batch_size
    device = device or pick_device(recipe.train.device)
    if memory_limit is None and device.startswith("cuda"):
        memory_limit = torch.cuda.get_device_properties(torch.device(device)).total_memory
    results = []
    for mode in modes:
        r = run_mode_isolated(recipe, mode, steps, seq_len, batch_size, device, memory_limit)
        log(f"{mode:>5}: not run, {r['skipped']}" if "skipped" in r else
            f"{mode:>5}: peak {gib(r['peak']['total'])} ({r['peak']['phase']}), {r['seconds']} s")
        results.append(r)
        if out_dir is not None:  # after every mode: a later crash keeps what was measured
            written = write_reports(results, out_dir, title)
    if out_dir is not None:
        log("wrote " + ", ".join(str(p) for p in written))
    return results
