"""GPU speed: qlora-lite against the tuned Hugging Face QLoRA stack on one GPU, side by side.

    python bench/gpu_speed.py --data ../shared/data/alpaca_5000.json --out gpu_speed/
    (on an offline GPU machine without the package installed: PYTHONPATH=. python bench/gpu_speed.py ...)

Both stacks train a Llama-2-7B-wide model (its config with 4 decoder layers, random bf16 weights
quantized to NF4 + double quant, a BPE tokenizer trained on the rows) on the same Alpaca rows
with the same adapters (r 16, alpha 32, dropout 0.05, every linear layer) and optimizer
(paged_adamw_8bit, constant lr), packed 1,024-token rows, gradient checkpointing. The reference
is transformers + peft + bitsandbytes + TRL set up as an expert would (bench/peers_reference.py,
`tuned`: bf16 without prepare_model_for_kbit_training's fp32 upcast, non-reentrant
checkpointing, TRL's padding-free packing, SDPA).

Workloads: `w1` one 1,024-token row a step, `w4` four. Each workload runs qlora-lite, the
reference, and qlora-lite again (the two qlora-lite runs bound the noise), each in its own
process. Per run: the first --warmup steps (CUDA context, kernel choice, allocator growth) are
timed apart; over the rest, tokens/s and the median and p90 step time; the peak allocated and
reserved CUDA memory; and one profiled step: CUDA kernels launched, host syncs (cudaDeviceSynchronize
/ cudaStreamSynchronize / cudaEventSynchronize calls) and GPU busy time over wall time.
Then qlora-lite on the full Llama-2-7B shape (32 layers, random NF4 built on the GPU, one
2,048-token sequence a step): tokens/s, peak memory, and MFU = model FLOPs per second over the
GPU's dense bf16 peak, with model FLOPs per token (recompute not counted):

    4 * N_base + 6 * N_lora + 12 * layers * hidden * seq

(forward and input gradient through the frozen base, 2 each per weight; forward, input gradient
and weight gradient per adapter weight; attention scores and values, forward and backward).

gpu_speed.json and gpu_speed.md in --out are rewritten after every run. On a CPU it runs too
(tiny shapes in the tests): the CUDA figures are then absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
OPTIMIZER = "paged_adamw_8bit"
WORKLOADS = {"w1": 1, "w4": 4}  # rows of --max-seq-len tokens per step
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
# Dense bf16 peaks (TFLOP/s) of GPUs a user may have, for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "RTX 4090": 165.2, "RTX 3090": 71.0}


# ---------------------------------------------------------------- the shared model and rows


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The rows file and the Llama-2-7B-wide random model (written once per shape under `work`)."""
    import torch
    import transformers

    from qlora_lite.data.templates import alpaca_prompt
    from qlora_lite.memory.estimate_inputs import CONFIG_DIR
    from qlora_lite.model.tiny import train_bpe_tokenizer

    rows = json.loads(Path(args.data).read_text())[: args.rows]
    rows_file = work / "rows.json"
    rows_file.write_text(json.dumps(rows))
    config = transformers.LlamaConfig(**json.loads((CONFIG_DIR / "llama-2-7b.json").read_text()))
    config.num_hidden_layers = args.layers
    if args.hidden:  # a small model of the same kind (the tests)
        config.hidden_size, config.intermediate_size = args.hidden, args.hidden * 2
        config.num_attention_heads = config.num_key_value_heads = max(1, args.hidden // 32)
    config.vocab_size, config.use_cache = args.vocab, False
    model_dir = work / f"model-h{config.hidden_size}-l{config.num_hidden_layers}-v{config.vocab_size}"
    if (model_dir / "config.json").exists():
        return model_dir, rows_file
    texts = [alpaca_prompt(r["instruction"], r.get("input") or "") + r["output"] for r in rows]
    tokenizer = train_bpe_tokenizer(texts, args.vocab, model_max_length=4096)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, rows_file


# ---------------------------------------------------------------- workers (each in its own process)


def lite_worker(spec: dict) -> dict:
    """qlora-lite's own setup and step (train.setup.setup_run, train.step.train_step), step by step."""
    import torch

    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.batches import micro_batches
    from qlora_lite.train.setup import setup_run
    from qlora_lite.train.step import train_step

    raw = {"model": {"name_or_path": spec["model"], "gradient_checkpointing": True},
           "lora": {**LORA, "target_modules": "all-linear"},
           "data": {"path": spec["rows"], "format": "alpaca", "chat_template": "alpaca", "max_seq_len": spec["seq"],
                    "eval_split": 0.0, "packing": True},
           "train": {"seed": 0, "micro_batch_size": spec["batch"], "grad_accum": 1, "lr": 2e-4,
                     "lr_scheduler": "constant", "warmup_steps": 0, "optimizer": OPTIMIZER, "save_every": 0,
                     "eval_every": 0, "device": spec["device"]},
           "output": {"dir": str(Path(spec["out"]) / "run")}}
    run = setup_run(recipe_from_dict(raw), overwrite=True)
    run.model.train()
    stream = micro_batches(run.train_set, run.recipe, 0, 0, run.tokenizer.pad_token_id, torch.bfloat16)

    def step():
        m = next(stream)
        train_step(run.model, [m.batch], run.params, run.optimizer, device=run.device, max_grad_norm=1.0,
                   loss_chunk_size=run.recipe.train.loss_chunk_size, autocast=run.autocast)  # reads the loss: one sync
        return m.tokens

    return timed_steps(step, spec)


def reference_worker(spec: dict) -> dict:
    """The tuned Hugging Face stack (bench/peers_reference.py) for --steps steps, timed step by step."""
    from peers_reference import reference_worker as hf_worker
    from transformers import TrainerCallback

    clock: dict = {"marks": [], "profile": None}

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            sync(spec["device"])
            clock["marks"].append(time.perf_counter())
            if state.global_step == spec["steps"] - 1:
                clock["profiler"] = start_profile(spec["device"])

        def on_step_end(self, args, state, control, **k):
            if clock.get("profiler") is not None:
                clock["profile"] = stop_profile(clock.pop("profiler"), spec["device"])

    hf_spec = {"seed": 0, "device": spec["device"], "model": spec["model"], "rows": spec["rows"], "out": spec["out"],
               "reference": "tuned", "batch": spec["batch"], "accum": 1, "lr": 2e-4, "max_seq_len": spec["seq"],
               "optim": OPTIMIZER, "max_steps": spec["steps"]}
    result = hf_worker(hf_spec, LORA, callbacks=[Steps()])
    sync(spec["device"])
    clock["marks"].append(time.perf_counter())
    tokens = [n for n, _ in result["step_clock"]]
    seconds = [b - a for a, b in zip(clock["marks"], clock["marks"][1:])]
    return summarise_steps(tokens, seconds, spec["warmup"], clock["profile"])


def timed_steps(step, spec: dict) -> dict:
    """Run spec["steps"] steps of `step` (returns its tokens), the last one profiled."""
    tokens, seconds, profile = [], [], None
    for k in range(spec["steps"]):
        sync(spec["device"])
        t0 = time.perf_counter()
        if k == spec["steps"] - 1:
            profiler = start_profile(spec["device"])
            tokens.append(step())
            profile = stop_profile(profiler, spec["device"])
        else:
            tokens.append(step())
        sync(spec["device"])
        seconds.append(time.perf_counter() - t0)
    return summarise_steps(tokens, seconds, spec["warmup"], profile)


def summarise_steps(tokens: list[int], seconds: list[float], warmup: int, profile: dict | None) -> dict:
    """Warm-up apart; tokens/s, median and p90 step time over the rest (the profiled last step excluded)."""
    timed_tokens, timed = tokens[warmup:-1], seconds[warmup:-1]
    ordered = sorted(timed)
    return {"steps": len(seconds), "warmup_s": sum(seconds[:warmup]), "tokens_per_s": sum(timed_tokens) / sum(timed),
            "step_median_s": statistics.median(timed), "step_p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "tokens_per_step": statistics.median(timed_tokens), "profile": profile}


def full_7b_worker(spec: dict) -> dict:
    """qlora-lite on the full Llama-2-7B shape: one `seq`-token sequence a step, random NF4 built on the device."""
    import torch
    from measure_7b import build_random_nf4

    from qlora_lite.lora.layer import attach_lora, lora_parameters
    from qlora_lite.model.loader import enable_gradient_checkpointing
    from qlora_lite.recipe import LoraConfig
    from qlora_lite.train.optim import build_optimizer, optimizer_params
    from qlora_lite.train.step import autocast_context, train_step

    model = build_random_nf4("llama-2-7b", spec["layers"], spec["device"])
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(**LORA))
    enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer(OPTIMIZER, lora_parameters(model), 2e-4, 0.0)
    params, gen = optimizer_params(opt), torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, model.config.vocab_size, (1, spec["seq"]), generator=gen)
        train_step(model, [{"input_ids": ids, "labels": ids}], params, opt, device=spec["device"], max_grad_norm=1.0,
                   loss_chunk_size=1024, autocast=autocast_context(spec["device"], "bfloat16"))
        return spec["seq"]

    result = timed_steps(step, spec)
    n_base = sum(m.base.in_features * m.base.out_features for m in _lora_modules(model))
    n_lora = sum(p.numel() for p in lora_parameters(model))
    c = model.config
    result["flop_per_token"] = 4 * n_base + 6 * n_lora + 12 * c.num_hidden_layers * c.hidden_size * spec["seq"]
    return result


def _lora_modules(model):
    from qlora_lite.lora.layer import lora_modules

    return lora_modules(model).values()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def start_profile(device: str):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    prof.t0 = time.perf_counter()
    return prof


def stop_profile(prof, device: str) -> dict:
    """CUDA kernels, host syncs and GPU busy / wall of the profiled step; on CPU, ops dispatched."""
    sync(device)
    wall = time.perf_counter() - prof.t0
    prof.__exit__(None, None, None)
    events = prof.events()
    kernels = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    return {"cuda_kernels": len(kernels), "host_syncs": sum(e.name in SYNC_CALLS for e in events),
            "gpu_busy_s": busy, "wall_s": wall, "gpu_busy_share": busy / wall if wall else None,
            "ops_dispatched": sum(e.name.startswith(("aten::", "bitsandbytes::")) for e in events)}


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def worker_main(kind: str, spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"lite": lite_worker, "reference": reference_worker, "full-7b": full_7b_worker}[kind](spec)
    if spec["device"] == "cuda":
        result.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
    Path(spec["out"], "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: run, report


def run_worker(kind: str, spec: dict) -> dict:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "QLORA_LITE_CACHE": str(out.parent / "cache")}
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.run([sys.executable, __file__, "--worker", kind, str(out / "spec.json")], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        return {"error": f"exit {code}: {(out / 'log.txt').read_text()[-1500:]}", "process_s": time.perf_counter() - t0}
    return {**json.loads((out / "result.json").read_text()), "process_s": round(time.perf_counter() - t0, 1)}


def plan(args, model_dir: Path, rows_file: Path) -> list[tuple[str, str, dict]]:
    """(label, worker kind, spec) of every run, in order."""
    runs = []
    for name, batch in WORKLOADS.items():
        if name not in args.workloads:
            continue
        for k, kind in enumerate(("lite", "reference", "lite")):
            label = f"{name} {'qlora-lite' if kind == 'lite' else 'reference'}{' (again)' if k == 2 else ''}"
            runs.append((label, kind, {"model": str(model_dir), "rows": str(rows_file), "seq": args.max_seq_len,
                                       "batch": batch, "steps": args.steps, "warmup": args.warmup,
                                       "device": args.device, "out": str(args.out / name / f"{k}-{kind}")}))
    if args.full_layers:
        runs.append(("7B qlora-lite", "full-7b", {"layers": args.full_layers, "seq": args.full_seq,
                                                  "steps": args.full_steps, "warmup": args.warmup, "device": args.device,
                                                  "out": str(args.out / "full-7b")}))
    return runs


def ratios(results: dict) -> dict:
    """Per workload: qlora-lite (median of its two runs) over the reference."""
    out = {}
    for name in WORKLOADS:
        lite = [r for label, r in results.items() if label.startswith(f"{name} qlora-lite") and "error" not in r]
        ref = results.get(f"{name} reference", {})
        if not lite or "error" in ref or not ref:
            continue
        mid = {k: statistics.median(r[k] for r in lite) for k in ("tokens_per_s", "peak_allocated", "peak_reserved")
               if all(k in r for r in lite)}
        out[name] = {k: mid[k] / ref[k] for k in mid if ref.get(k)}
        out[name]["lite_spread"] = (max(r["tokens_per_s"] for r in lite) / min(r["tokens_per_s"] for r in lite)) - 1
    return out


def markdown(report: dict) -> str:
    gib = 2**30
    lines = [f"# GPU speed: {report['gpu']}, {report['date']}", "", f"`{report['command']}`", "",
             "| run | warm-up s | tokens/s | step median s | step p90 s | peak alloc GiB | peak reserved GiB | "
             "kernels/step | host syncs/step | GPU busy |", "|---|" + "---:|" * 9]
    for label, r in report["runs"].items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'].splitlines()[0][:80]} |" + " |" * 8)
            continue
        p, cuda = r.get("profile") or {}, "peak_allocated" in r
        busy = f"{p['gpu_busy_share']:.0%}" if cuda and p.get("gpu_busy_share") is not None else "-"
        mem = f"{r['peak_allocated'] / gib:.2f} | {r['peak_reserved'] / gib:.2f}" if cuda else "- | -"
        kernels = f"{p.get('cuda_kernels')} | {p.get('host_syncs')}" if cuda else "- | -"
        lines.append(f"| {label} | {r['warmup_s']:.1f} | {r['tokens_per_s']:.0f} | {r['step_median_s']:.3f} | "
                     f"{r['step_p90_s']:.3f} | {mem} | {kernels} | {busy} |")
    for name, q in report["ratios"].items():
        parts = [f"{k.replace('_', ' ')} {q[k]:.2f}x" for k in ("tokens_per_s", "peak_allocated", "peak_reserved") if k in q]
        lines.append(f"\n{name}: qlora-lite / reference: {', '.join(parts)}; the two qlora-lite runs differ by "
                     f"{q['lite_spread']:.1%}")
    full = report["runs"].get("7B qlora-lite")
    if full and "error" not in full and report.get("peak_tflops"):
        mfu = full["tokens_per_s"] * full["flop_per_token"] / (report["peak_tflops"] * 1e12)
        lines.append(f"\n7B: {full['tokens_per_s']:.0f} tokens/s, MFU {mfu:.1%} of {report['peak_tflops']} TFLOP/s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2], sys.argv[3]) or 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Alpaca JSON (e.g. ../shared/data/alpaca_5000.json)")
    ap.add_argument("--out", type=Path, default=Path("gpu_speed"))
    ap.add_argument("--rows", type=int, default=1200, help="rows the tokenizer learns and the runs train on")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16, help="steps per run, the warm-up and the profiled last one included")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workloads", default="w1,w4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=None, help="a smaller model of the same kind (tests)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--full-layers", type=int, default=32, help="layers of the full 7B run; 0 skips it")
    ap.add_argument("--full-seq", type=int, default=2048)
    ap.add_argument("--full-steps", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"))
    args = ap.parse_args(argv)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    report = {"gpu": gpu, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "command": " ".join([Path(sys.argv[0]).name if argv is None else "gpu_speed.py", *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "peak_tflops": args.peak_tflops or next(
                  (v for k, v in PEAK_TFLOPS.items() if k in gpu), None), "runs": {}, "ratios": {}}
    t0 = time.perf_counter()
    model_dir, rows_file = prepare(args, args.out)
    report["prepare_s"] = round(time.perf_counter() - t0, 1)
    for label, kind, spec in plan(args, model_dir, rows_file):
        report["runs"][label] = run_worker(kind, spec)
        report["ratios"] = ratios(report["runs"])
        report["total_s"] = round(time.perf_counter() - t0, 1)
        (args.out / "gpu_speed.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_speed.md").write_text(markdown(report))
        print(f"{label}: " + (report["runs"][label].get("error", "").splitlines()[:1] or
                              [f"{report['runs'][label]['tokens_per_s']:.0f} tokens/s"])[0], flush=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
