"""Throughput cost of DoRA vs LoRA: training steps on the NF4 base, same model, data and settings.

    python bench/dora_cost.py [--model qlora-lite:tiny-llama] [--seq-len 256] [--batch-size 4]
                               [--steps 10] [--r 16] [--device cpu] [--repeats 3]

Each variant (LoRA, DoRA) runs `--steps` timed optimizer steps (forward, backward, AdamW step,
gradient checkpointing on, dropout 0.05, bf16 adapters as `run` trains) after two warm-up steps,
on the same random tokens; the variants alternate `--repeats` times and the median is reported,
so drifting load on a shared machine hits both alike. Prints tokens/s per variant and DoRA's cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def steps_per_second(model_name: str, use_dora: bool, tokens: torch.Tensor, steps: int, r: int,
                     device: str) -> float:
    """Optimizer steps per second of one variant (after two warm-up steps)."""
    from qlora_lite.lora.layer import attach_lora, lora_parameters
    from qlora_lite.model.loader import load_model
    from qlora_lite.ops.loss import causal_lm_loss
    from qlora_lite.recipe import LoraConfig, ModelConfig
    from qlora_lite.train.optim import build_optimizer

    model = load_model(ModelConfig(name_or_path=model_name, gradient_checkpointing=True), device)
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.05, use_dora=use_dora))
    params = lora_parameters(model)
    opt = build_optimizer("adamw", params, 1e-4, 0.0)
    batch = {"input_ids": tokens.to(device), "labels": tokens.to(device),
             "attention_mask": torch.ones_like(tokens).to(device)}
    model.train()

    def step():
        loss, n = causal_lm_loss(model, batch, 1024)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qlora-lite:tiny-llama")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()

    tokens = torch.randint(3, 500, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    per_step = args.batch_size * args.seq_len
    runs = {"LoRA": [], "DoRA": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(steps_per_second(args.model, name == "DoRA", tokens, args.steps, args.r, args.device))
    tps = {name: statistics.median(v) * per_step for name, v in runs.items()}
    print(f"{args.model}: NF4 base, r={args.r} all-linear, seq {args.seq_len} x batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats on {args.device} (median)")
    for name, v in tps.items():
        print(f"{name}: {v:,.0f} tokens/s")
    print(f"DoRA: {tps['DoRA'] / tps['LoRA']:.2f}x LoRA's throughput ({1 - tps['DoRA'] / tps['LoRA']:+.0%} slower)")


if __name__ == "__main__":
    main()
