"""Measure one QLoRA micro-batch of a Llama-2-7B-shaped model with random NF4 weights.

    .venv/bin/python bench/measure_7b.py --seq-len 512            # CPU (minutes on 2 cores)
    .venv/bin/python bench/measure_7b.py --seq-len 2048 --device cuda

The model is built on the meta device and each linear is quantized from a random bf16
weight of that layer only, so 13 GB of bf16 never exist. A warm-up micro-batch of a few
tokens and one optimizer step create the optimizer state and leave gradients alive (as
in micro-batches 2..grad_accum of a real step); the tracker's peak is then taken over one
micro-batch at --seq-len and printed next to `qlora-lite estimate`'s prediction.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lite.lora.layer import attach_lora, lora_parameters
from qlora_lite.memory.estimate import estimate_mode
from qlora_lite.memory.estimate_inputs import CONFIG_DIR, Settings, load_arch
from qlora_lite.memory.tracker import MemoryTracker, module_tensors
from qlora_lite.model.loader import enable_gradient_checkpointing
from qlora_lite.ops.rms_norm import use_rms_norm_function
from qlora_lite.recipe import LoraConfig
from qlora_lite.train.optim import build_optimizer, optimizer_params
from qlora_lite.train.step import autocast_context, train_step
from qlora_lite.utils.units import gib, parse_size

WARMUP_TOKENS = 8


def build_random_nf4(config_name: str, layers: int | None, device: str):
    """A LlamaForCausalLM of `config_name`'s shape: NF4 linears, bf16 embeddings, frozen."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(str(_config_path(config_name)))
    if layers:
        config.num_hidden_layers = layers
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # Random weights are drawn where they are quantized: on a GPU, 7B of CPU randn takes minutes.
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                w = randn(child.out_features, child.in_features)
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
                setattr(module, child_name, q.to(device))  # quantizes; the bf16 weight is dropped here
                del w
    # What is left on meta: embeddings, lm_head, norms, rotary buffers.
    h, v = config.hidden_size, config.vocab_size
    model.model.embed_tokens.weight = torch.nn.Parameter(randn(v, h), requires_grad=False)
    model.lm_head.weight = torch.nn.Parameter(randn(v, h), requires_grad=False)
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # RMSNorm weights
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr,
                    torch.nn.Parameter(torch.ones(p.shape, dtype=torch.bfloat16, device=device), requires_grad=False))
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    for p in model.parameters():
        p.requires_grad_(False)
    use_rms_norm_function(model)  # as model.loader.load_model does
    return model


def _config_path(name: str) -> Path:

    p = CONFIG_DIR / f"{name}.json"
    if not p.is_file():
        raise SystemExit(f"unknown shipped config {name!r}")
    tmp = Path("/tmp/qlora-lite-measure") / name
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(p.read_text())
    return tmp


def measure(model, params, opt, args, seq_len: int, batch_size: int) -> dict:
    """One micro-batch of `batch_size` x `seq_len` with gradients and optimizer state alive:
    the tracker's peak (and the CUDA allocator's) next to the estimate's prediction."""
    tracker = MemoryTracker(module_tensors(model, lora_parameters(model)))
    tracker.watch_optimizer(opt)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cuda = args.device.startswith("cuda")

    def batch(n: int) -> dict:
        ids = torch.randint(0, vocab, (batch_size, n), generator=gen)
        return {"input_ids": ids, "labels": ids}

    forwards = []

    def phase(name: str) -> None:
        tracker.set_phase(name)
        if name == "forward":
            forwards.append(time.perf_counter())
            if len(forwards) == 2:  # the measured micro-batch starts: gradients and state are alive
                tracker.reset_peak()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
        elif name == "optimizer" and len(forwards) == 2:
            if cuda:
                torch.cuda.synchronize()
            forwards.append(time.perf_counter())

    step = dict(device=args.device, max_grad_norm=0.3, loss_chunk_size=args.loss_chunk_size,
                autocast=autocast_context(args.device, "bfloat16"))
    with tracker:
        # Step 1 creates the optimizer state. Step 2's first micro-batch leaves gradients alive, as
        # in micro-batches 2..grad_accum of a real step; the peak is taken over its second one.
        train_step(model, [batch(WARMUP_TOKENS)], params, opt, **step)
        loss = train_step(model, [batch(WARMUP_TOKENS), batch(seq_len)], params, opt, phase=phase, **step).loss
    peak = tracker.breakdown()
    arch = load_arch(args.config)
    arch.num_hidden_layers = args.layers or arch.num_hidden_layers
    settings = Settings(max_seq_len=seq_len, micro_batch_size=batch_size, r=args.lora_r, dropout=args.lora_dropout,
                        optimizer=args.optimizer, loss_chunk_size=args.loss_chunk_size,
                        device="cuda" if cuda else "cpu")
    predicted = estimate_mode(arch, settings, "qlora")
    result = {"config": args.config, "layers": arch.num_hidden_layers, "seq_len": seq_len, "batch_size": batch_size,
              "device": args.device, "loss": loss, "micro_batch_s": round(forwards[2] - forwards[1], 2),
              "measured": peak.to_dict(), "predicted": predicted, "error": predicted["total"] / peak.total - 1}
    if cuda:
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    return result


def report(r: dict) -> None:
    if "error_message" in r:
        print(f"{r['config']} seq {r['seq_len']} batch {r['batch_size']}: {r['error_message']}")
        return
    peak = r["measured"]
    cuda = (f"; CUDA allocated {gib(r['cuda_max_allocated'])}, reserved {gib(r['cuda_max_reserved'])}"
            if "cuda_max_allocated" in r else "")
    print(f"{r['config']} ({r['layers']} layers) seq {r['seq_len']} batch {r['batch_size']}: measured peak "
          f"{gib(peak['total'])} ({peak['phase']}), predicted {gib(r['predicted']['total'])} ({r['error']:+.1%})"
          f"{cuda}; micro-batch {r['micro_batch_s']} s")
    for c, n in peak["bytes"].items():
        print(f"  {c:16} measured {gib(n):>11}  predicted {gib(r['predicted']['bytes'][c]):>11}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--shapes", default=None, help="several SEQxBATCH shapes on one build, e.g. 2048x1,2048x2,4096x1")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check of the tool)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--optimizer", default="paged_adamw_8bit")
    ap.add_argument("--loss-chunk-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-mem", default=None, help="CUDA: cap this process's memory, e.g. 24GiB (a 24 GB card)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_mem:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(args.gpu_mem) / total))
    shapes = ([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else [(args.seq_len, args.batch_size)])
    t0 = time.perf_counter()
    model = build_random_nf4(args.config, args.layers, args.device)
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=args.lora_dropout))
    enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer(args.optimizer, lora_parameters(model), 1e-4, 0.0)
    params = optimizer_params(opt)
    built = time.perf_counter() - t0
    print(f"built in {built:.0f} s", flush=True)
    results = []
    for seq_len, batch_size in shapes:
        try:
            r = measure(model, params, opt, args, seq_len, batch_size)
        except torch.OutOfMemoryError as e:
            r = {"config": args.config, "seq_len": seq_len, "batch_size": batch_size,
                 "error_message": f"out of memory: {str(e).splitlines()[0]}"}
            del e
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        r.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), build_s=round(built, 1), gpu_mem=args.gpu_mem,
                 machine=f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
        report(r)
        results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results if args.shapes else results[0], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
