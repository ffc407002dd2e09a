"""Data-parallel scaling on this machine: tokens/s of 1 process vs 2 processes on the same rows.

    .venv/bin/python bench/dp_scaling.py --data ../shared/data/alpaca_5000.json [--rows 256] [--repeats 2]

Both sides train the built-in tiny Llama (or --model) on the first --rows rows with the same
global batch: 1 process x grad_accum 2 against 2 processes x grad_accum 1 (torchrun, gloo),
one thread per process (OMP_NUM_THREADS=1), DDP; the 2-process run trains exactly the same
samples per step. Throughput is tokens (padding excluded) over the training loop's wall time
(summary.json); scaling efficiency = tokens/s(2) / (2 x tokens/s(1)). Runs alternate 1, 2,
1, 2, ... and the medians are reported. Other processes on the machine (other engineers' jobs)
take cores from both sides: say so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(data: str, rows: int, model: str, out: Path, grad_accum: int) -> dict:
    return {
        "model": {"name_or_path": model},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "data": {"path": data, "max_seq_len": 256, "eval_split": 0.0, "max_samples": rows},
        "train": {"seed": 0, "epochs": 1, "micro_batch_size": 4, "grad_accum": grad_accum, "lr": 2e-4,
                  "warmup_steps": 0, "log_every": 10, "eval_every": 0, "save_every": 0, "optimizer": "adamw",
                  "device": "cpu"},
        "output": {"dir": str(out)},
    }


def run_once(data: str, rows: int, model: str, nproc: int, work: Path) -> dict:
    """One training run; returns its summary (tokens, wall_time_s, ...)."""
    import yaml

    out = work / f"run-{nproc}-{len(list(work.iterdir()))}"
    path = work / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(data, rows, model, out, 2 // nproc)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "qlora_lite", "run", str(path), "--nproc", str(nproc)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"nproc": nproc, "tokens": s["tokens"], "wall_time_s": s["wall_time_s"],
            "tokens_per_s": s["tokens"] / s["wall_time_s"], "steps": s["steps"], "train_loss": s["train_loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="rows to train on, e.g. ../shared/data/alpaca_5000.json")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--model", default="qlora-lite:tiny-llama")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for nproc in (1, 2):
                runs.append(run_once(args.data, args.rows, args.model, nproc, Path(tmp)))
    if len({(r["tokens"], r["steps"]) for r in runs}) != 1:  # the claim: the same samples on both sides
        raise SystemExit(f"1 and 2 processes trained different tokens or steps: {runs}")
    tps = {n: statistics.median(r["tokens_per_s"] for r in runs if r["nproc"] == n) for n in (1, 2)}
    result = {"rows": args.rows, "model": args.model, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "runs": runs, "tokens_per_s": tps,
              "scaling_efficiency": tps[2] / (2 * tps[1])}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"| processes | tokens/s (median of {args.repeats}) |\n|---|---:|")
    for n in (1, 2):
        print(f"| {n} | {tps[n]:.0f} |")
    print(f"scaling efficiency {result['scaling_efficiency']:.0%} on {os.cpu_count()} CPUs, "
          f"load average {result['load_average'][0]:.1f} at the end (other jobs share the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
