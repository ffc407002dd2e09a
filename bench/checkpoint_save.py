"""How long a checkpoint of a 7B QLoRA run takes to write: what bounds a preempted run's stop.

    .venv/bin/python bench/checkpoint_save.py --out-dir /tmp/bench-ckpt

The base weights are never saved, only the adapter, the optimizer state, the schedule and the
RNG, so a checkpoint's size is set by the adapter: Llama-2-7B (hidden 4096, MLP 11008, 32
layers) with lora.r=16 on all seven linear layers has 39,976,960 adapter weights. This times
runs/checkpoint.save_checkpoint, the function a stopping run calls, on tensors of exactly those
shapes (bf16 adapter) with the optimizer state of paged_adamw_8bit (two uint8 moments and their
block-wise fp32 absmax, bitsandbytes' layout) and of paged_adamw_32bit (two fp32 moments), on
this machine's CPU and the disk under --out-dir; every file is fsynced, as in a real save.
Nothing here runs in the unit tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_lite.lora.layer import attach_lora
from qlora_lite.recipe import LoraConfig
from qlora_lite.runs.checkpoint import save_checkpoint

HIDDEN, MLP, LAYERS, R = 4096, 11008, 32, 16
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
BLOCK = 256  # bitsandbytes' 8-bit optimizer block size: one fp32 absmax per block


def adapter_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(LAYERS):
        for name, (fan_in, fan_out) in SHAPES.items():
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            where = f"model.layers.{layer}.{block}.{name}"
            out[f"{where}.lora_A.weight"] = torch.randn(R, fan_in, dtype=torch.bfloat16)
            out[f"{where}.lora_B.weight"] = torch.randn(fan_out, R, dtype=torch.bfloat16)
    return out


def optimizer_state(tensors: list[torch.Tensor], bits: int) -> dict:
    state = {}
    for i, t in enumerate(tensors):
        n = t.numel()
        if bits == 8:
            state[i] = {"step": torch.tensor(10.0), "state1": torch.randint(0, 255, (n,), dtype=torch.uint8),
                        "state2": torch.randint(0, 255, (n,), dtype=torch.uint8),
                        "absmax1": torch.rand((n + BLOCK - 1) // BLOCK), "absmax2": torch.rand((n + BLOCK - 1) // BLOCK),
                        "qmap1": torch.rand(256), "qmap2": torch.rand(256)}
        else:
            state[i] = {"step": torch.tensor(10.0), "state1": torch.randn(n), "state2": torch.randn(n)}
    return {"state": state, "param_groups": [{"lr": 2e-4, "params": list(range(len(tensors)))}]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="/tmp/bench-ckpt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    # A small model with the adapter layout, for adapter_config.json; the tensors are the 7B's.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    lora = LoraConfig(r=R, alpha=32, dropout=0.05)
    attach_lora(model, lora)
    adapter = adapter_tensors()
    n = sum(t.numel() for t in adapter.values())
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                              lambda s: 1.0)
    print(f"adapter weights: {n:,} (Llama-2-7B, r={R}, all linear layers)")
    for bits in (8, 32):
        optim = optimizer_state(list(adapter.values()), bits)
        seconds = []
        for k in range(args.repeats):
            run = Path(args.out_dir) / f"run-{bits}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            path = save_checkpoint(run, model, lora, "meta-llama/Llama-2-7b-hf", None, sched, {"step": k + 1},
                                   keep_last=1, adapter_state=adapter, optimizer_state=optim)
            seconds.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"paged_adamw_{bits}bit: checkpoint {size / 1e6:,.0f} MB, save {statistics.median(seconds):.2f} s "
              f"(median of {args.repeats}; {', '.join(f'{s:.2f}' for s in seconds)})")
        shutil.rmtree(Path(args.out_dir) / f"run-{bits}", ignore_errors=True)


if __name__ == "__main__":
    main()
