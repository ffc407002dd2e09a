"""Time the packed attention kernels: forward + backward of packed Alpaca rows, each kernel forced.

    .venv/bin/python bench/attention_kernels.py --data ../shared/data/alpaca_5000.json \\
        [--hidden 576 --heads 9 --kv-heads 3] [--seq-len 512] [--layers 2] [--rounds 7] [--json]

A random bf16 Llama (--layers layers of --hidden, GQA with --kv-heads) with LoRA r 16 on every
linear and non-reentrant gradient checkpointing: qlora-lite's training micro-step without the
NF4 dequantization and the optimizer, so attention's share is as large as it gets. Rows are
Alpaca samples (prompt + response, tokens estimated as characters / 4, or counted with
--tokenizer) packed best-fit into rows of --seq-len, and --rows of them spread over the packing
are timed per round, through the model and, separately, one attention call per row alone (random
q, k, v of the model's head shapes). Rounds alternate the kernels (per_sample, sdpa_padded,
flash_varlen and torch_varlen where they can run) after one warm-up round; the median round is reported, with each
kernel's loss and gradient difference from per_sample on the first row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sample_lengths(data: str, tokenizer: str | None, n: int) -> list[int]:
    """Token counts of the first `n` Alpaca rows rendered as qlora-lite renders them."""
    from qlora_lite.data.templates import alpaca_prompt

    rows = json.loads(Path(data).read_text())[:n]
    texts = [alpaca_prompt(r["instruction"], r.get("input") or "") + r["output"] for r in rows]
    if tokenizer is None:
        return [max(1, len(t) // 4) + 1 for t in texts]  # ~4 characters per BPE token, + BOS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return [len(ids) + 1 for ids in tok(texts)["input_ids"]]


def packed_rows(lengths: list[int], seq_len: int, count: int, vocab: int) -> list[dict]:
    """`count` packed rows (batches of one row), spread over a best-fit packing of `lengths`."""
    from qlora_lite.data.batching import collate, pack_rows

    lengths = [min(n, seq_len) for n in lengths]
    plan = pack_rows(lengths, seq_len)
    picks = [plan[(2 * i + 1) * len(plan) // (2 * count)] for i in range(count)]  # mid-quantile rows
    g = torch.Generator().manual_seed(0)
    out = []
    for row in picks:
        samples = []
        for i in row:
            ids = torch.randint(3, vocab, (lengths[i],), generator=g).tolist()
            samples.append({"input_ids": ids, "labels": [-100] * (len(ids) // 3) + ids[len(ids) // 3:]})
        out.append(collate([samples], 0, packed_mask="position_ids"))
    return out


def build_model(args, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lite.lora.layer import attach_lora
    from qlora_lite.model.loader import enable_gradient_checkpointing
    from qlora_lite.recipe import LoraConfig

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0), dtype=dtype)
    with torch.no_grad():  # B = 0 would make the adapters' gradients the only non-trivial part
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    enable_gradient_checkpointing(model)
    return model.train()


def kernels_here(device: str, dtype: torch.dtype) -> list[str]:
    """per_sample and sdpa_padded always; flash_varlen and torch_varlen where attention_kernel allows them."""
    from qlora_lite.errors import QloraError
    from qlora_lite.ops.attention import attention_kernel

    out = ["per_sample", "sdpa_padded"]
    for varlen in ("flash_varlen", "torch_varlen"):
        try:
            out.append(attention_kernel(device, dtype, forced=varlen))
        except QloraError:  # cannot run here (CPU, fp32, or flash-attn / torch >= 2.10 missing)
            pass
    return out


def step(model, batch: dict, device: str) -> tuple[float, torch.Tensor]:
    """Forward + backward of one batch through the training path; (loss, adapter gradients)."""
    from qlora_lite.ops.loss import causal_lm_loss
    from qlora_lite.train.step import to_device

    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, to_device(batch, device), chunk_size=0)
    (loss / n).backward()
    return loss, n


def agreement(model, batch: dict, device: str, kernels: list[str]) -> dict:
    """Each kernel's loss and adapter-gradient difference from per_sample's on `batch`."""
    from qlora_lite.ops.attention import use_packed_attention

    out, want = {}, None
    for k in kernels:
        use_packed_attention(model, kernel=k)
        loss, n = step(model, batch, device)
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        loss = loss.item() / n
        if want is None:
            want = (loss, grads)
        out[k] = {"loss": loss, "loss_rel_diff": abs(loss - want[0]) / abs(want[0]),
                  "grad_rel_diff": float((grads - want[1]).norm() / want[1].norm()),
                  "grads_finite": bool(torch.isfinite(grads).all())}
    return out


def timed_round(model, rows: list[dict], device: str, kernel: str) -> float:
    from qlora_lite.ops.attention import use_packed_attention

    use_packed_attention(model, kernel=kernel)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in rows:
        step(model, batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def attention_inputs(args, rows: list[dict], device: str, dtype: torch.dtype) -> list[tuple]:
    """One layer's random (q, k, v, bounds) per row: [1, H, L, D], [1, H_kv, L, D] twice."""
    from qlora_lite.ops.attention import sample_bounds

    d, g, out = args.hidden // args.heads, torch.Generator().manual_seed(2), []
    for b in rows:
        length = b["input_ids"].shape[1]
        q = torch.randn(1, args.heads, length, d, generator=g).to(device, dtype).requires_grad_()
        k, v = (torch.randn(1, args.kv_heads, length, d, generator=g).to(device, dtype).requires_grad_()
                for _ in range(2))
        out.append((q, k, v, sample_bounds(b["position_ids"])))
    return out


def timed_attention(inputs: list[tuple], device: str, kernel: str) -> float:
    """Forward + backward of one attention call per row through `kernel`, its indices built anew."""
    from qlora_lite.ops.packed_kernels import KERNELS, PackedRows

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for q, k, v, bounds in inputs:
        out = KERNELS[kernel](q, k, v, PackedRows(bounds, q.shape[2]), 0.0, None)
        out.backward(torch.ones_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(args) -> dict:
    from qlora_lite.ops.attention import sample_bounds

    device = args.device
    dtype = getattr(torch, args.dtype)
    rows = packed_rows(sample_lengths(args.data, args.tokenizer, args.samples), args.seq_len, args.rows, args.vocab)
    model = build_model(args, device)
    kernels = kernels_here(device, dtype)
    inputs = attention_inputs(args, rows, device, dtype)
    times, attention = {k: [] for k in kernels}, {k: [] for k in kernels}
    for r in range(args.rounds + 1):  # round 0 warms up every kernel
        for k in (kernels if r % 2 else kernels[::-1]):  # alternate the order: drift hits all alike
            t, a = timed_round(model, rows, device, k), timed_attention(inputs, device, k)
            if r:
                times[k].append(t)
                attention[k].append(a)
    samples = [len(sample_bounds(b["position_ids"])[0]) for b in rows]
    med = {k: statistics.median(v) for k, v in times.items()}
    att = {k: statistics.median(v) for k, v in attention.items()}
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "shape": {"hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads, "layers": args.layers,
                  "seq_len": args.seq_len, "rows": args.rows, "dtype": args.dtype,
                  "samples_per_row": statistics.mean(samples), "tokens": sum(int(b["input_ids"].numel()) for b in rows)},
        "median_s": med, "rounds_s": times,
        "ratio_to_per_sample": {k: med[k] / med["per_sample"] for k in kernels},
        # One attention call per row alone (one layer, no model around it).
        "attention_median_s": att,
        "attention_ratio_to_per_sample": {k: att[k] / att["per_sample"] for k in kernels},
        "agreement": agreement(model, rows[0], device, kernels),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"),
                    help="Alpaca JSON: the sample lengths come from its rows.")
    ap.add_argument("--tokenizer", default=None, help="A tokenizer folder to count tokens (default: characters / 4).")
    ap.add_argument("--samples", type=int, default=600, help="Alpaca rows packed.")
    ap.add_argument("--seq-len", type=int, default=512, help="Packed row length.")
    ap.add_argument("--rows", type=int, default=4, help="Packed rows timed per round (one micro-batch each).")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--rounds", type=int, default=5, help="Timed rounds per kernel, after one warm-up round.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default torch's). On a shared, loaded machine 1 keeps OpenMP barriers "
                         "from stalling.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data!r} is not a file; pass an Alpaca JSON (e.g. ../shared/data/alpaca_5000.json).")
    res = bench(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    s = res["shape"]
    print(f"{res['device']}: hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} kv, {s['layers']} layers, "
          f"{s['dtype']}; {s['rows']} rows of {s['seq_len']} ({s['samples_per_row']:.1f} samples/row)")
    for k, t in res["median_s"].items():
        a = res["agreement"][k]
        print(f"  {k:<12} step {t * 1000:7.0f} ms/round {res['ratio_to_per_sample'][k]:5.2f}x per_sample;"
              f"  attention alone {res['attention_median_s'][k] * 1000:6.1f} ms "
              f"{res['attention_ratio_to_per_sample'][k]:5.2f}x;"
              f"  loss diff {a['loss_rel_diff']:.1e}, grad diff {a['grad_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
