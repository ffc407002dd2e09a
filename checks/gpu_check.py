"""The GPU check in one command: correctness and memory of qlora-lite on CUDA (speed: bench/gpu_speed.py).

    python checks/gpu_check.py --out gpu_check/ [--data ../shared/data/alpaca_5000.json]

Stages (each timed, each recorded even when it fails; gpu_check.json and gpu_check.md are
rewritten after every stage, so a crash or a timeout keeps what was measured):
  a. pytest tests/test_gpu.py
  b. tiny models on CUDA: packed rows vs the 4D block-diagonal mask (loss, grads); grads with
     gradient checkpointing on vs off; 5 steps + --resume vs 10 straight steps (tolerance from
     two straight runs); a paged optimizer whose state is paged (hidden 1024) and stays paged
     after a checkpoint reload; fp16 (fp32 adapters + GradScaler) vs bf16
  b2. the packed attention kernels (bench/attention_kernels.py): per_sample, sdpa_padded, and
     flash_varlen and torch_varlen where they run: forward + backward time of packed Alpaca rows and each
     kernel's loss and gradients against per_sample, on a SmolLM2-shaped and a 7B-wide model
  c. Llama-2-7B-shaped NF4 (random, built on the GPU) under a 24 GiB memory cap: tracker,
     allocated and reserved peaks next to the estimate, seq 2048 batch 1 and 2, seq 4096 batch 1
  e. 20 training steps on CUDA, export --verify, and the NF4 codes of the CUDA quantization
     that differ from the CPU one
  f. with 2+ GPUs (skipped otherwise): DDP and FSDP on 2 GPUs (torchrun, NCCL) against 1 GPU with
     twice the accumulation, losses within 1e-3 (checks/gpu_check_multi.py)
No network: random weights, the demo rows shipped in recipes/data, Alpaca rows from --data.
Runs on the CPU too (`--device cpu --quick`), which is how its logic is tried without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

DEMO_ROWS = ROOT / "recipes" / "data" / "tiny-instructions.jsonl"
CARD = "24GiB"  # an RTX 3090/4090


# ---------------------------------------------------------------- b: tiny models


def tiny_recipe(out: Path, device: str, **train):
    from qlora_lite.recipe import recipe_from_dict

    t = dict(seed=3, max_steps=10, micro_batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2, log_every=1,
             eval_every=0, save_every=5, keep_last=3, optimizer="paged_adamw_8bit", device=device)
    compute = train.pop("compute_dtype", "bfloat16")
    lora_dtype = train.pop("lora_dtype", "bfloat16")
    t.update(train)
    return recipe_from_dict({
        "model": {"name_or_path": "qlora-lite:tiny-llama", "quantization": {"compute_dtype": compute}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "dtype": lora_dtype},
        "data": {"path": str(DEMO_ROWS), "format": "alpaca", "max_seq_len": 128, "eval_split": 0.05,
                 "max_samples": 400},
        "train": t,
        "output": {"dir": str(out)},
    })


def logged_losses(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) for k in a)


def adapted(device: str, checkpointing: bool = True, hidden_path: str | None = None, r: int = 8):
    from qlora_lite.lora.layer import attach_lora, lora_modules
    from qlora_lite.model.loader import load_model
    from qlora_lite.recipe import LoraConfig, ModelConfig

    model = load_model(ModelConfig(name_or_path=hidden_path or "qlora-lite:tiny-llama",
                                   gradient_checkpointing=checkpointing), device)
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return model.train()


def loss_and_grads(model, batch, device):
    from qlora_lite.lora.layer import lora_parameters
    from qlora_lite.ops.loss import causal_lm_loss
    from qlora_lite.train.step import autocast_context, to_device

    for p in lora_parameters(model):
        p.grad = None
    with autocast_context(device, "bfloat16"):
        loss, n = causal_lm_loss(model, to_device(batch, device), chunk_size=0)
    (loss / n).backward()
    return (loss / n).item(), torch.cat([p.grad.flatten().float() for p in lora_parameters(model)])


def demo_samples(n: int):
    from qlora_lite.data.dataset import build_datasets
    from qlora_lite.model.loader import load_tokenizer

    recipe = tiny_recipe(Path("/nonexistent"), "cpu")
    samples, _, _ = build_datasets(recipe.data, load_tokenizer(recipe.model), 0, None)
    return samples[:n]


def check_packed_vs_mask(device: str) -> dict:
    from qlora_lite.data.batching import collate
    from qlora_lite.ops.attention import use_packed_attention

    s = demo_samples(12)
    rows = [s[0:5], s[5:9], s[9:12]]
    model = adapted(device)
    want_loss, want = loss_and_grads(model, collate(rows, 0, mask_dtype=torch.bfloat16), device)
    use_packed_attention(model)
    loss, got = loss_and_grads(model, collate(rows, 0, packed_mask="position_ids"), device)
    rel = float((got - want).norm() / want.norm())
    return {"loss_4d_mask": want_loss, "loss_packed": loss, "grad_rel_diff": rel,
            "ok": abs(loss - want_loss) <= 2e-3 * abs(want_loss) and rel < 0.1}  # bf16 paths differ in rounding


def check_checkpointing(device: str) -> dict:
    from qlora_lite.data.batching import collate

    s = demo_samples(8)
    batch = collate([s[0:4], s[4:8]], 0, packed_mask="4d", mask_dtype=torch.bfloat16)
    on = loss_and_grads(adapted(device, checkpointing=True), batch, device)
    off = loss_and_grads(adapted(device, checkpointing=False), batch, device)
    rel = float((on[1] - off[1]).norm() / off[1].norm())
    return {"loss_on": on[0], "loss_off": off[0], "grad_rel_diff": rel, "ok": on[0] == off[0] and rel < 1e-3}


def check_resume(device: str, work: Path) -> dict:
    import shutil

    from qlora_lite.train.loop import train

    runs = {}
    for name in ("s1", "s2"):
        train(tiny_recipe(work / name, device))
        runs[name] = logged_losses(work / name)
    shutil.copytree(work / "s1", work / "r")
    for p in ("checkpoints/step-10", "adapter"):
        shutil.rmtree(work / "r" / p)
    train(tiny_recipe(work / "r", device), resume=True)
    runs["r"] = logged_losses(work / "r")
    noise = max_diff(runs["s1"], runs["s2"])
    diff = max_diff(runs["s1"], runs["r"])
    return {"straight_vs_straight": noise, "resumed_vs_straight": diff, "ok": diff <= max(noise, 1e-6) * 2}


def check_paged(device: str, work: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lite.lora.layer import lora_parameters
    from qlora_lite.recipe import LoraConfig
    from qlora_lite.runs.checkpoint import load_checkpoint, save_checkpoint
    from qlora_lite.train.optim import build_optimizer, build_scheduler

    path = work / "h1024"
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    model = adapted(device, hidden_path=str(path), r=128)  # A: 128 x 1024 = 131k elements: paged
    params = lora_parameters(model)
    opt = build_optimizer("paged_adamw_8bit", params, 1e-4, 0.0)
    sched = build_scheduler(opt, "constant", 0, 10)
    ids = torch.randint(0, 512, (1, 64))
    loss_and_grads(model, {"input_ids": ids, "labels": ids}, device)
    opt.step()

    def paged_count(o):
        return sum(bool(getattr(st.get("state1"), "is_paged", False)) for st in o.state.values())

    before = paged_count(opt)
    ckpt = save_checkpoint(work / "prun", model, LoraConfig(r=128, alpha=256), str(path), opt, sched,
                           {"step": 1, "epoch": 0, "batch_in_epoch": 1}, keep_last=1)
    opt2 = build_optimizer("paged_adamw_8bit", params, 1e-4, 0.0)
    load_checkpoint(ckpt, model, opt2, build_scheduler(opt2, "constant", 0, 10))
    after = paged_count(opt2)
    same = all(torch.equal(opt.state[p]["state1"].cpu(), opt2.state[p]["state1"].cpu()) for p in opt.state)
    big = sum(p.numel() >= 100_000 for p in params)
    return {"params_paged_size": big, "paged_after_step": before, "paged_after_reload": after,
            "state_equal_after_reload": same, "ok": before == big > 0 and after == big and same}


def check_fp16(device: str, work: Path) -> dict:
    from qlora_lite.train.loop import train

    out = {}
    for name, kw in (("bf16", {}), ("fp16", {"compute_dtype": "float16", "lora_dtype": "float32"})):
        s = train(tiny_recipe(work / name, device, max_steps=20, save_every=0, **kw))
        out[name] = s["train_loss"]
    out["ok"] = all(v == v for v in out.values()) and abs(out["fp16"] - out["bf16"]) < 0.1 * out["bf16"]
    return out


def stage_tiny(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-tiny-"))
    res = {}
    for name, fn in (("packed_vs_4d_mask", lambda: check_packed_vs_mask(args.device)),
                     ("checkpointing_on_vs_off", lambda: check_checkpointing(args.device)),
                     ("resume_vs_straight", lambda: check_resume(args.device, work / "resume")),
                     ("paged_optimizer", lambda: check_paged(args.device, work / "paged")),
                     ("fp16_vs_bf16", lambda: check_fp16(args.device, work / "fp16"))):
        res[name] = guarded(fn)
    res["ok"] = all(v.get("ok") for v in res.values())
    return res


# ---------------------------------------------------------------- a, b2, c, d, e


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, str]:
    """A subprocess with its output in `log`; returns (exit code, output tail)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text()[-2000:]


def json_in_log(log: Path) -> dict:
    """The JSON object a tool printed last into `log` (warnings may come first)."""
    text = log.read_text()
    return json.loads(text[0 if text.startswith("{") else text.index("\n{") + 1:])


def stage_pytest(args) -> dict:
    rc, tail = run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"], 180,
                   args.out / "pytest.log")
    return {"exit_code": rc, "summary": tail.strip().splitlines()[-1] if tail.strip() else "", "ok": rc == 0}


# bench/attention_kernels.py shapes: SmolLM2's attention (9 heads on 3 kv heads) and a 7B-wide one.
ATTENTION_SHAPES = {
    "smollm2_1024": ["--hidden", "576", "--heads", "9", "--kv-heads", "3", "--seq-len", "1024", "--layers", "4"],
    "7b_2048": ["--hidden", "4096", "--heads", "32", "--kv-heads", "32", "--seq-len", "2048", "--layers", "2",
                "--samples", "1500"],
}
QUICK_ATTENTION = ["--hidden", "128", "--heads", "4", "--kv-heads", "2", "--seq-len", "256", "--layers", "1",
                   "--rows", "2", "--rounds", "1"]


def stage_attention(args) -> dict:
    """Each packed attention kernel on this device: times, and loss/gradients against per_sample."""
    out = {}
    shapes = {"quick": QUICK_ATTENTION} if args.quick else ATTENTION_SHAPES
    for name, extra in shapes.items():
        cmd = [sys.executable, "bench/attention_kernels.py", "--data", str(args.data), "--device", args.device,
               "--json", *extra]
        rc, tail = run(cmd, 150, args.out / f"attention_{name}.log")
        if rc != 0:
            out[name] = {"exit_code": rc, "tail": tail}
            continue
        res = json_in_log(args.out / f"attention_{name}.log")
        # bf16 kernels round differently: the packed-vs-4D-mask check above allows 0.1 on gradients.
        agree = all(a["grads_finite"] and a["loss_rel_diff"] < 5e-3 and a["grad_rel_diff"] < 0.05
                    for a in res["agreement"].values())
        out[name] = {k: res[k] for k in ("shape", "median_s", "ratio_to_per_sample", "attention_median_s",
                                         "attention_ratio_to_per_sample", "agreement")} | {"ok": agree}
    out["ok"] = all(v.get("ok") for v in out.values() if isinstance(v, dict))
    return out


def stage_7b(args) -> dict:
    shapes = "256x1,256x2" if args.quick else "2048x1,2048x2,4096x1"
    cmd = [sys.executable, "bench/measure_7b.py", "--device", args.device, "--shapes", shapes,
           "--out", str(args.out / "measure_7b.json")]
    cmd += ["--layers", "2"] if args.quick else []
    cmd += ["--gpu-mem", CARD] if args.device == "cuda" else []
    rc, tail = run(cmd, 240, args.out / "measure_7b.log")
    if rc != 0:
        return {"exit_code": rc, "tail": tail, "ok": False}
    rows = json.loads((args.out / "measure_7b.json").read_text())
    return {"card": CARD, "shapes": [{k: r.get(k) for k in ("seq_len", "batch_size", "error", "error_message",
                                                             "cuda_max_allocated", "cuda_max_reserved", "micro_batch_s")}
                                     | {"tracker_peak": r.get("measured", {}).get("total"),
                                        "predicted": r.get("predicted", {}).get("total")} for r in rows],
            "ok": all("error_message" not in r for r in rows)}


def stage_export(args) -> dict:
    import bitsandbytes.functional as F

    from qlora_lite.model.loader import load_model
    from qlora_lite.recipe import ModelConfig, QuantizationConfig
    from qlora_lite.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="gpu-check-export-"))
    summary = train(tiny_recipe(work / "run", args.device, max_steps=20, save_every=0))
    rc, tail = run([sys.executable, "-m", "qlora_lite.cli", "export", str(work / "run"), "--out", str(work / "merged"),
                    "--verify"], 240, args.out / "export.log")
    # NF4 codes: the base quantized on this device vs on the CPU, from the same bf16 weights.
    bf16 = load_model(ModelConfig(name_or_path="qlora-lite:tiny-llama", quantization=QuantizationConfig(bits=16)))
    differ = total = 0
    for name, mod in bf16.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            w = mod.weight.detach()
            q_dev, _ = F.quantize_4bit(w.to(args.device), blocksize=64, compress_statistics=True, quant_type="nf4")
            q_cpu, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            a, b = q_dev.cpu().view(torch.uint8), q_cpu.view(torch.uint8)
            codes = torch.stack([a >> 4, a & 15]).flatten(), torch.stack([b >> 4, b & 15]).flatten()
            differ += int((codes[0] != codes[1]).sum())
            total += codes[0].numel()
    return {"train_loss": summary["train_loss"], "device": summary["device"], "export_exit_code": rc,
            "export_tail": tail[-600:], "nf4_codes_differing": differ, "nf4_codes": total,
            "ok": rc == 0 and "verify" in tail.lower()}


# ---------------------------------------------------------------- driver


def stage_multi_gpu(args) -> dict:
    from gpu_check_multi import multi_gpu_stage

    res = multi_gpu_stage(args.out / "multi_gpu", data=str(DEMO_ROWS))
    res.setdefault("ok", True)  # skipped: fewer than 2 GPUs is not a failure
    return res


def guarded(fn) -> dict:
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # a failed check is a result, not the end of the script
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def environment() -> dict:
    import bitsandbytes
    import transformers

    env = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   bf16=torch.cuda.is_bf16_supported())
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except ImportError:
        env["flash_attn"] = None
    return env


def markdown(results: dict) -> str:
    lines = ["# GPU check", "", "```", json.dumps(results["environment"], indent=1), "```", ""]
    for stage, res in results["stages"].items():
        lines.append(f"## {stage}: {'ok' if res.get('ok') else 'FAILED'} ({res.get('seconds')} s)")
        lines += ["", "```", json.dumps({k: v for k, v in res.items() if k not in ("traceback",)}, indent=1,
                                        default=str)[:4000], "```", ""]
    return "\n".join(lines)


# Throughput last: the longest stage, so a time limit costs the least.
STAGES = {"a_pytest": stage_pytest, "b_tiny": stage_tiny, "b2_attention": stage_attention, "c_7b_memory": stage_7b,
          "e_export": stage_export, "f_multi_gpu": stage_multi_gpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpaca_5000.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    ap.add_argument("--quick", action="store_true", help="small shapes (trying the script on a CPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # models, caches: not in the report folder
    os.environ.setdefault("QLORA_LITE_CACHE", str(args.work / "cache"))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    results = {"environment": environment(), "stages": {}}
    t0 = time.perf_counter()
    for name in args.stages.split(","):
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} ...", flush=True)
        results["stages"][name] = res = guarded(lambda: STAGES[name](args))
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {'ok' if res.get('ok') else 'FAILED'}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(markdown(results))
    results["total_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    return 0 if all(r.get("ok") for r in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
