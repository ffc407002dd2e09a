"""Peak host memory of `qlora-lite export` on a random Llama of >= 1 GB (bf16), against its sizes.

    .venv/bin/python bench/export_memory.py --out-dir /tmp/bench-export

Builds (once) a random Llama (hidden 2048, 12 layers, vocab 32000: 1.5 GB in bf16) and a run
folder with a random rank-16 all-linear adapter in --out-dir, then exports it in a fresh
subprocess per mode and reports the peak resident memory of each phase: loading the base
(NF4 quantization by transformers, or an empty meta model for --base original) and the
streaming merge + write. The peak of the load phase is reset with /proc/self/clear_refs so
the streaming phase is measured on its own. Nothing here runs in the unit tests (minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler:
    """Max RssAnon / RssFile seen, sampled every 20 ms (VmHWM gives only their sum)."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            s = proc_status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.02)

    def take(self) -> dict[str, int]:
        peak, self.peak = dict(self.peak), {"RssAnon": 0, "RssFile": 0}
        return peak


def reset_peak() -> None:
    # Linux >= 4.0: "5" resets VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def build(out_dir: Path, hidden: int, layers: int, vocab: int, inter: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lite.lora.files import save_adapter
    from qlora_lite.lora.layer import attach_lora, lora_modules
    from qlora_lite.model.loader import load_model
    from qlora_lite.recipe import DataConfig, LoraConfig, ModelConfig, Recipe, save_recipe

    base, run = out_dir / "base", out_dir / "run"
    if not (base / "config.json").is_file():
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # init directly in bf16: no fp32 copy of 1.5 GB
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(base, max_shard_size="500MB")
        del model
    if not (run / "adapter" / "adapter_config.json").is_file():
        mc = ModelConfig(name_or_path=str(base), gradient_checkpointing=False)
        lora = LoraConfig(r=16, alpha=32, dropout=0.0)
        m = load_model(mc)
        attach_lora(m, lora)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_B.weight.normal_(0, 0.01)
        save_recipe(Recipe(model=mc, lora=lora, data=DataConfig(path="unused.jsonl")), run / "recipe.yaml")
        save_adapter(m, run / "adapter", lora, str(base))
    return base, run


def child(run: str, out: str, base_mode: str, max_shard_size: str) -> None:
    """One export in this process; print a JSON line of memory and time."""
    import qlora_lite.export.merge as ex

    baseline = proc_status()["VmRSS"]
    sampler, phases = Sampler(), {}
    real_load = ex.load_base

    def load_base(cfg, base):
        t = time.perf_counter()
        model = real_load(cfg, base)
        s = proc_status()
        phases["load"] = {"peak": s["VmHWM"], "after": s["VmRSS"], "seconds": time.perf_counter() - t,
                          **{f"peak_{k}": v for k, v in sampler.take().items()}}
        # Meta tensors (--base original) hold no memory.
        phases["model_bytes"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                                    if t.device.type != "meta")
        reset_peak()
        return model

    ex.load_base = load_base
    t = time.perf_counter()
    info = ex.export_model(run, out, base=base_mode, max_shard_size=max_shard_size, log=lambda m: None)
    s = proc_status()
    phases["stream"] = {"peak": s["VmHWM"], **{f"peak_{k}": v for k, v in sampler.take().items()}}
    print(json.dumps({"mode": base_mode, "max_shard_size": max_shard_size, "baseline_rss": baseline,
                      "total_seconds": time.perf_counter() - t, "export_bytes": info["total_bytes"],
                      "shards": info["shards"], **phases}))


def main() -> None:
    from qlora_lite.utils.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, help="scratch folder (base model, run, exports: ~5 GB)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--modes", default="dequantized,original")
    ap.add_argument("--child", nargs=4, metavar=("RUN", "OUT", "MODE", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    out_dir = Path(args.out_dir)
    t = time.perf_counter()
    base, run = build(out_dir, args.hidden, args.layers, args.vocab, args.intermediate)
    print(f"base + run ready in {time.perf_counter() - t:.0f} s: {base}")
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    results = []
    for mode in args.modes.split(","):
        out = out_dir / f"export-{mode}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        p = subprocess.run([sys.executable, __file__, "--out-dir", str(out_dir), "--child", str(run), str(out), mode,
                            args.max_shard_size], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["base_checkpoint_bytes"] = base_bytes
        results.append(r)
        shard = min(r["export_bytes"], parse_size(args.max_shard_size))
        print(f"\n--base {mode}, --max-shard-size {args.max_shard_size} ({r['shards']} shards), "
              f"{r['total_seconds']:.0f} s")
        print(f"  bf16 model {base_bytes / GB:.2f} GB; loaded base in memory {r['model_bytes'] / GB:.2f} GB; "
              f"python+torch+transformers baseline {r['baseline_rss'] / GB:.2f} GB")
        print(f"  peak RSS while loading ({r['load']['seconds']:.0f} s): {r['load']['peak'] / GB:.2f} GB "
              f"(anon {r['load']['peak_RssAnon'] / GB:.2f}, file-backed {r['load']['peak_RssFile'] / GB:.2f})")
        print(f"  peak RSS while merging + writing: {r['stream']['peak'] / GB:.2f} GB "
              f"(anon {r['stream']['peak_RssAnon'] / GB:.2f}, file-backed {r['stream']['peak_RssFile'] / GB:.2f}); "
              f"budget baseline + base + 2 shards = "
              f"{(r['baseline_rss'] + r['model_bytes'] + 2 * shard) / GB:.2f} GB")
    (out_dir / f"results-{args.max_shard_size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
