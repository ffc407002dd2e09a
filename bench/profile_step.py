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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)

    import torch

    from qlora_lite.lora.layer import keep_dequantized_weights, lora_modules
    from qlora_lite.train.step import train_step

    with tempfile.TemporaryDirectory() as out_dir:
        run, stream = setup(args, out_dir)

        def step():
            train_step(run.model, [next(stream).batch], run.params, run.optimizer, device="cpu",
                       max_grad_norm=1.0, loss_chunk_size=run.recipe.train.loss_chunk_size, autocast=run.autocast)

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
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return report


def format_report(r: dict) -> str:
    lines = [f"model {r['model']}, {r['threads']} thread(s), {r['rows']} rows, "
             f"{r['nf4_linears']} NF4 linears keeping their dequantized weight"]
    if "step_s" in r:
        lines.append(f"step {r['step_s']:.3f} s, {r['minor_faults_per_step']:,} minor page faults a step")
    if "self_cpu_share" in r:
        lines.append(f"self CPU time (2 steps); NF4 dequantize calls a step: {r['dequantize_4bit_per_step']:g}")
        lines += [f"  {share:6.1%}  {key}" for key, share in r["self_cpu_share"].items()]
    if "ab" in r:
        m = r["ab"]["median_s"]
        lines.append(f"{r['ab']['setting']}: on {m['on']:.3f} s, off {m['off']:.3f} s a round of 3 steps "
                     f"(median of {len(r['ab']['rounds_s']['on'])}; on/off {m['on'] / m['off']:.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
