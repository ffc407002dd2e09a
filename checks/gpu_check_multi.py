"""The multi-GPU stage of the GPU check: DDP and FSDP on 2 GPUs through torchrun and NCCL.

    .venv/bin/python checks/gpu_check_multi.py [--data rows.jsonl] [--out runs/gpu-check-multi]

`multi_gpu_stage(out)` is meant to be called from checks/gpu_check.py as one stage; run alone it
prints its result as JSON. With fewer than 2 visible GPUs it returns {"skipped": reason}.
For each strategy it trains the built-in tiny Llama for 4 steps on 2 GPUs (grad_accum 1) and
on 1 GPU (grad_accum 2), the same samples per step, and compares the losses (GPU kernels
reduce in their own order: the tolerance is 1e-3 relative, not the CPU's 1e-5) and reports
the peak memory of the largest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3


def _recipe(data: str, out: Path, strategy: str, grad_accum: int) -> dict:
    return {
        "model": {"name_or_path": "qlora-lite:tiny-llama"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": data, "format": "alpaca", "max_seq_len": 64, "eval_split": 0.1},
        "train": {"seed": 3, "max_steps": 4, "micro_batch_size": 4, "grad_accum": grad_accum, "lr": 1e-3,
                  "warmup_steps": 2, "log_every": 1, "eval_every": 0, "save_every": 2, "optimizer": "adamw",
                  "device": "cuda", "distributed": strategy},
        "output": {"dir": str(out)},
    }


def _train(data: str, out: Path, strategy: str, nproc: int) -> dict:
    import yaml

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(_recipe(data, out, strategy, 2 // nproc)))
    p = subprocess.run([sys.executable, "-m", "qlora_lite", "run", str(path), "--nproc", str(nproc), "--overwrite"],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{strategy} on {nproc} GPU(s) failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    return {"losses": losses, "summary": json.loads((out / "summary.json").read_text())}


def multi_gpu_stage(out: str | Path, data: str | None = None) -> dict:
    """Run DDP and FSDP on 2 GPUs against 1 GPU; {"skipped": why} with fewer than 2 GPUs.

    Args:
        out (str | Path): a folder for the runs.
        data (str | None): alpaca rows (JSONL); default: the built-in demo rows written to `out`.
    """
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) visible; the multi-GPU stage needs 2"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from qlora_lite.data.demo_rows import demo_rows

        data = str(out / "rows.jsonl")
        Path(data).write_text("".join(json.dumps(r) + "\n" for r in demo_rows(160, seed=1)))
    result = {}
    for strategy in ("ddp", "fsdp"):
        two, one = _train(data, out / f"{strategy}-2", strategy, 2), _train(data, out / f"{strategy}-1", strategy, 1)
        worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(two["losses"], one["losses"]))
        result[strategy] = {"losses_2gpu": two["losses"], "losses_1gpu": one["losses"], "worst_rel_diff": worst,
                            "ok": worst <= TOLERANCE and len(two["losses"]) == len(one["losses"]),
                            "peak_memory_bytes": two["summary"]["peak_memory_bytes"],
                            "peak_memory_rank": two["summary"].get("peak_memory_rank")}
    result["ok"] = all(result[s]["ok"] for s in ("ddp", "fsdp"))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="runs/gpu-check-multi")
    args = ap.parse_args(argv)
    r = multi_gpu_stage(args.out, args.data)
    print(json.dumps(r, indent=2))
    return 0 if r.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
