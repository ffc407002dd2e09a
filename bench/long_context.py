"""Training tokens/s with and without the tiled MLP and offloaded checkpoints (CPU or CUDA).

Builds a small random Llama (or takes --model), then runs training steps (forward, backward,
optimizer) on random tokens for each variant, interleaved round by round so that a machine
shared with other work slows every variant alike; reports each variant's best round and its
ratio to the plain run. Not a test: timings depend on the machine.

    python bench/long_context.py --seq-len 8192 --rounds 3
    python bench/long_context.py --model llama-dir --seq-len 16384 --variants plain,tiled
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "plain": {},
    "tiled": {"tiled_mlp": "auto"},
    "offload": {"offload_activations": True},
    "both": {"tiled_mlp": "auto", "offload_activations": True},
}


def write_random_llama(out: Path, hidden: int, intermediate: int, layers: int, vocab: int, max_pos: int) -> str:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                                   vocab_size=vocab, max_position_embeddings=max_pos)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return str(out)


def load_variant(model_path: str, extra: dict, args, device: str):
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.optim import build_optimizer
    from qlora_lite.train.setup import build_model

    recipe = recipe_from_dict({"model": {"name_or_path": model_path, **extra},
                               "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                               "train": {"loss_chunk_size": 1024}})
    model, trainable = build_model(recipe, device, mode=args.mode)
    model.train()
    return model, build_optimizer("adamw", trainable, 1e-4, 0.0)


def one_step(model, opt, ids) -> float:
    from qlora_lite.ops.loss import causal_lm_loss

    t0 = time.perf_counter()
    loss, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, 1024)
    (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model folder; default: build a small Llama")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=896)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default="qlora", choices=["qlora", "lora"])
    ap.add_argument("--variants", default="plain,tiled", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--tiles", default="auto", help="model.tiled_mlp of the tiled variants: auto or N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    tiles = args.tiles if args.tiles == "auto" else int(args.tiles)
    variants = {n: {k: (tiles if k == "tiled_mlp" else v) for k, v in VARIANTS[n].items()} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_random_llama(Path(tmp) / "m", args.hidden, args.intermediate, args.layers, args.vocab,
                                         max(args.seq_len, 4096))
        runs = {n: load_variant(path, variants[n], args, args.device) for n in names}
        gen = torch.Generator().manual_seed(0)
        vocab = next(iter(runs.values()))[0].get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, args.seq_len), generator=gen).to(args.device)
        for model, opt in runs.values():  # warm-up: allocator, optimizer state, pinned pool
            one_step(model, opt, ids)
        best = {n: float("inf") for n in names}
        for r in range(args.rounds):
            for n in names:
                best[n] = min(best[n], one_step(*runs[n], ids))
            print(f"round {r + 1}: " + ", ".join(f"{n} {args.seq_len / best[n]:.0f} tok/s" for n in names), flush=True)
    result = {"seq_len": args.seq_len, "mode": args.mode, "tiled_mlp": tiles, "threads": torch.get_num_threads(),
              "tokens_per_s": {n: args.seq_len / best[n] for n in names},
              "ratio_to_plain": {n: best["plain"] / best[n] for n in names} if "plain" in best else {}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
