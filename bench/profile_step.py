"""Where a qlora-lite training step's CPU time goes, on bench/peers.py's recipe: the command behind
the "Where the time goes" figures of docs/performance.md.

    .venv/bin/python bench/profile_step.py --model .cache/models/smollm2-135m-instruct \
        --data ../shared/data/alpaca_5000.json --profile --ab keep-dequantized

One process: `train.setup_run` with bench/peers.py's qlora-lite recipe (packed 512-token rows,
checkpointing, LoRA r 16 with dropout on all linears), 2 warm-up steps, then:

- `--steps N`: N timed steps; seconds and minor page faults per step. `--mmap-threshold` and
  `--trim-threshold` replace utils/host_memory.py's glibc settings before loading (run one process per
  setting: glibc serves later allocations from the heap the earlier ones shaped).
- `--profile`: torch.profiler over 2 steps; the ops with the most self CPU time, their share, and
  NF4 dequantize calls per step.
- `--ab keep-dequantized`: rounds of 3 steps alternating the kept NF4 weights on and off
  (quant.keeps_dequantized_weights), median seconds per round of each.
- `--ops`: the ops one training step dispatches per decoder layer (forward, recompute, backward
  and optimizer), on the path of 0.1 (QLORA_LITE_FUSED=0 QLORA_LITE_FLAT=0: PEFT-style LoRA
  linears, transformers' RMSNorm, one optimizer update per tensor) and on today's, side by side:
  random copies of the model with 1 and 2 decoder layers, one profiled step each after 2 warm-ups,
  the difference is a layer's. `--attention sdpa_padded` runs the kernel CUDA takes without
  flash-attn (the CPU's own is per_sample).

    .venv/bin/python bench/profile_step.py --model qlora-lite:tiny-llama \
        --data ../shared/data/alpaca_5000.json --steps 0 --ops --attention sdpa_padded
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from peers import LORA  # the same adapters as the benchmark


def setup(args, out_dir: str):
    import torch

    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.batches import micro_batches
    from qlora_lite.train.setup import setup_run
    from qlora_lite.utils import host_memory

    torch.set_num_threads(args.threads)
    if args.mmap_threshold:
        host_memory.MMAP_THRESHOLD = args.mmap_threshold
    if args.trim_threshold:
        host_memory.TRIM_THRESHOLD = args.trim_threshold
    rows = Path(out_dir) / "rows.json"
    rows.write_text(json.dumps(json.loads(Path(args.data).read_text())[: args.rows]))
    raw = {
        "model": {"name_or_path": args.model, "gradient_checkpointing": True,
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}},
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"path": str(rows), "format": "alpaca", "chat_template": "alpaca", "train_on": "responses",
                 "max_seq_len": args.max_seq_len, "eval_split": 0.0, "packing": True},
        "train": {"seed": 0, "epochs": 1, "micro_batch_size": 1, "grad_accum": 1, "lr": 2e-4,
                  "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                  "optimizer": "paged_adamw_32bit", "log_every": 1, "eval_every": 0, "save_every": 0,
                  "device": "cpu"},
        "output": {"dir": str(Path(out_dir) / "run")},
    }
    with contextlib.redirect_stdout(io.StringIO()):
        run = setup_run(recipe_from_dict(raw), overwrite=True)
    run.model.train()
    stream = micro_batches(run.train_set, run.recipe, 0, 0, run.tokenizer.pad_token_id, torch.bfloat16)
    return run, stream


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face model folder")
    p.add_argument("--data", required=True, help="Alpaca-format JSON (a list of rows)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps (0: none)")
    p.add_argument("--mmap-threshold", type=int, default=0, help="bytes; 0: host_memory.py's")
    p.add_argument("--trim-threshold", type=int, default=0, help="bytes; 0: host_memory.py's")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 2 steps")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--ab", choices=["keep-dequantized"], help="alternate a setting over rounds")
    p.add_argument("--ops", action="store_true", help="ops per decoder layer and step, 0.1's path and today's")
    p.add_argument("--attention", default=None, help="force the packed attention kernel (QLORA_LITE_ATTENTION)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)

    import torch

    from qlora_lite.lora.layer import keep_dequantized_weights, lora_modules

    if args.attention:
        os.environ["QLORA_LITE_ATTENTION"] = args.attention
    with tempfile.TemporaryDirectory() as out_dir:
        run, stream = setup(args, out_dir)

        def step():
            train_step_of(run, stream)

        for _ in range(2):  # warm-up: first shapes, optimizer state
            step()
        report: dict = {"model": args.model, "threads": args.threads, "rows": args.rows,
                        "nf4_linears": sum(m.keep_dequantized for m in lora_modules(run.model).values())}
        if args.steps:
            faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(args.steps):
                step()
            report["step_s"] = (time.perf_counter() - t) / args.steps
            report["minor_faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // args.steps
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
                step()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
            report["self_cpu_share"] = {e.key: round(e.self_cpu_time_total / total, 4) for e in top}
            report["dequantize_4bit_per_step"] = sum(e.count for e in events if e.key == "bitsandbytes::dequantize_4bit") / 2
        if args.ab:
            rounds: dict[str, list[float]] = {"on": [], "off": []}
            for r in range(args.rounds):
                for arm in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    keep_dequantized_weights(run.model, "cpu" if arm == "on" else "cuda", gradient_checkpointing=True)
                    t = time.perf_counter()
                    for _ in range(3):
                        step()
                    rounds[arm].append(time.perf_counter() - t)
            keep_dequantized_weights(run.model, "cpu", gradient_checkpointing=True)
            report["ab"] = {"setting": args.ab, "rounds_s": rounds,
                            "median_s": {k: statistics.median(v) for k, v in rounds.items()}}
        if args.ops:
            report["ops_per_layer"] = layer_ops(args, out_dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return report


# Ops that launch no kernel: views, metadata, allocation, dtype dispatch (their copies are counted).
NO_KERNEL = {"aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::numpy_T", "aten::reshape",
             "aten::_reshape_alias", "aten::_unsafe_view", "aten::expand", "aten::unsqueeze", "aten::squeeze",
             "aten::select", "aten::slice", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::chunk",
             "aten::unflatten", "aten::flatten", "aten::permute", "aten::detach", "aten::detach_", "aten::alias",
             "aten::lift_fresh", "aten::contiguous", "aten::view_as", "aten::resolve_conj", "aten::resolve_neg",
             "aten::result_type", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
             "aten::new_empty_strided", "aten::resize_", "aten::to", "aten::_to_copy",
             "aten::_has_compatible_shallow_copy_type", "aten::is_nonzero", "aten::matrix_H"}
PATHS = {"0.1": {"QLORA_LITE_FUSED": "0", "QLORA_LITE_FLAT": "0"}, "now": {"QLORA_LITE_FUSED": "1", "QLORA_LITE_FLAT": "1"}}


def count_ops(prof) -> dict:
    """What one profiled step dispatched: every aten/bitsandbytes op (nested ones too); the ones
    called from Python or autograd (top level); kernels (innermost ops on tensors of more than one
    element that are not views or metadata: on a GPU, launches); NF4 dequantizations."""
    events = [e for e in prof.events() if e.name.startswith(("aten::", "bitsandbytes::"))]
    ours = {id(e) for e in events}

    def kernel(e):
        on_tensors = any(isinstance(sh, list) and sh and math.prod(sh) > 1 for sh in e.input_shapes)
        return on_tensors and e.name not in NO_KERNEL and not any(
            id(c) in ours and c.name not in NO_KERNEL for c in _descendants(e))

    return {"dispatched": len(events),
            "top_level": sum(e.cpu_parent is None or id(e.cpu_parent) not in ours for e in events),
            "kernels": sum(kernel(e) for e in events),
            "dequantize_4bit": sum(e.name == "bitsandbytes::dequantize_4bit" for e in events)}


def _descendants(e):
    for c in e.cpu_children:
        yield c
        yield from _descendants(c)


def layer_ops(args, out_dir: str) -> dict:
    """{path: {metric: per decoder layer}} from random copies of args.model with 1 and 2 layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora_lite.model.loader import resolve_model_path

    source = resolve_model_path(args.model)
    config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    counts: dict = collections.defaultdict(dict)
    for layers in (1, 2):
        path = Path(out_dir) / f"random-{layers}"
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        for name, env in PATHS.items():
            with switches(env):
                run, stream = setup(argparse.Namespace(**{**vars(args), "model": str(path)}), out_dir)
            for _ in range(2):  # warm-up: first shapes, optimizer state
                train_step_of(run, stream)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                train_step_of(run, stream)
            counts[name][layers] = count_ops(prof)
    return {name: {k: c[2][k] - c[1][k] for k in c[2]} for name, c in counts.items()}


@contextlib.contextmanager
def switches(env: dict):
    """The environment switches of one path (utils/env.py) while a run is set up (they are read there)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def train_step_of(run, stream) -> None:
    from qlora_lite.train.step import train_step

    train_step(run.model, [next(stream).batch], run.params, run.optimizer, device="cpu", max_grad_norm=1.0,
               loss_chunk_size=run.recipe.train.loss_chunk_size, autocast=run.autocast)


def format_report(r: dict) -> str:
    lines = [f"model {r['model']}, {r['threads']} thread(s), {r['rows']} rows, "
             f"{r['nf4_linears']} NF4 linears keeping their dequantized weight"]
    if "step_s" in r:
        lines.append(f"step {r['step_s']:.3f} s, {r['minor_faults_per_step']:,} minor page faults a step")
    if "self_cpu_share" in r:
        lines.append(f"self CPU time (2 steps); NF4 dequantize calls a step: {r['dequantize_4bit_per_step']:g}")
        lines += [f"  {share:6.1%}  {key}" for key, share in r["self_cpu_share"].items()]
    if "ops_per_layer" in r:
        old, new = r["ops_per_layer"]["0.1"], r["ops_per_layer"]["now"]
        lines.append("per decoder layer and step (forward, recompute, backward, optimizer): 0.1's path, today's, ratio")
        lines += [f"  {k:<16} {old[k]:>6} {new[k]:>6}  {new[k] / max(old[k], 1):.2f}x" for k in old]
    if "ab" in r:
        m = r["ab"]["median_s"]
        lines.append(f"{r['ab']['setting']}: on {m['on']:.3f} s, off {m['off']:.3f} s a round of 3 steps "
                     f"(median of {len(r['ab']['rounds_s']['on'])}; on/off {m['on'] / m['off']:.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
