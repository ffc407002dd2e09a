"""Side-by-side benchmark: qlora-lite against the Hugging Face QLoRA stack (transformers + peft + TRL).

    .venv/bin/python tools/bench_peers.py --data ../shared/data/alpaca_5000.json [--pairs 3] [--json > run.json]
    .venv/bin/python tools/bench_peers.py --show run.json      # the table of a saved --json run

Both stacks train the same random-init Llama (~58M parameters: hidden 512, 8 layers, vocab
32000, written with a BPE tokenizer trained on the data into `--work-dir`) on the same rows,
with the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers), NF4 + double-quant base,
paged_adamw_32bit at a constant 2e-4, max_seq_len truncation and loss on the responses only.
Each run is its own process; runs alternate reference, qlora-lite, reference, ... and pair k
uses seed k on both sides.

Reported per run and as medians: trained tokens per second (non-padding tokens over the
training loop's time), peak memory (the process's peak RSS from `wait4`, and on CUDA
`torch.cuda.max_memory_allocated`), and the loss after the same trained tokens: both sides see
every selected row exactly once, so they train the same tokens; the loss compared is the
response-token-weighted mean of the per-step training loss over the last quarter of them.
Each side shuffles the rows with its own seeded sampler (qlora-lite packs them, so a shared
order is not possible); the spread over seeds says how much that moves the loss.

peft and trl are imported only by the reference worker (the `bench` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SIDES = ("reference", "qlora-lite")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
# The share of the token budget, at its end, over which the training loss is averaged:
# one step's loss is too noisy to compare, a quarter of the run is not.
LOSS_WINDOW = 0.25


# ---------------------------------------------------------------- the shared model and rows


def prepare(args) -> tuple[Path, Path]:
    """Write (once per settings) the model folder and the rows file under --work-dir."""
    import torch
    import transformers

    from qlora_lite.atomic import atomic_dir, atomic_write_json
    from qlora_lite.data import alpaca_prompt
    from qlora_lite.tiny import train_bpe_tokenizer

    rows = json.loads(Path(args.data).read_text())
    work = Path(args.work_dir)
    rows_file = work / f"rows-{args.rows}.json"
    if not rows_file.exists():
        atomic_write_json(rows_file, rows[: args.rows])
    shape = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
             "data": hashlib.sha256(Path(args.data).read_bytes()).hexdigest()[:16], "version": 1}
    model_dir = work / "model-{}".format(hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12])
    if (model_dir / "config.json").exists():
        return model_dir, rows_file
    texts = [alpaca_prompt(r["instruction"], r.get("input") or "") + r["output"] for r in rows]
    tokenizer = train_bpe_tokenizer(texts, args.vocab, model_max_length=4096)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_dir(model_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "bench.json", shape)
    return model_dir, rows_file


# ---------------------------------------------------------------- workers (run in their own process)


def reference_worker(spec: dict) -> dict:
    """The QLoRA paper / PEFT / TRL recipe: BitsAndBytesConfig, prepare_model_for_kbit_training,
    LoraConfig(all-linear), SFTTrainer on prompt/completion rows (completion-only loss)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_lite.data import alpaca_prompt

    set_seed(spec["seed"])  # the adapters are initialised before the Trainer seeds anything
    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = json.loads(Path(spec["rows"]).read_text())
    dataset = Dataset.from_list([{"prompt": alpaca_prompt(r["instruction"], r.get("input") or ""),
                                  "completion": r["output"]} for r in rows])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(Path(spec["out"]) / "trl"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"], num_train_epochs=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, optim="paged_adamw_32bit", weight_decay=0.0,
        max_grad_norm=1.0, max_length=spec["max_seq_len"], bf16=True, gradient_checkpointing=True,
        logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], disable_tqdm=True,
        use_cpu=not cuda, dataloader_num_workers=0,
    )
    steps: list[list] = []  # per optimizer step: [response tokens, loss]
    counts = {"tokens": 0, "trained": 0}

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Still the collated CPU batch here, so counting costs no device sync.
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            counts["train_s"] = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                steps.append([counts["trained"], float(logs["loss"])])

    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=lora, callbacks=[Clock()])
    trainer.train()
    # Turn cumulative counts into per-step response tokens, as qlora-lite logs them.
    per_step = [[b[0] - a[0], b[1]] for a, b in zip([[0, 0]] + steps, steps)]
    return {"tokens": counts["tokens"], "trained_tokens": counts["trained"], "train_s": counts["train_s"],
            "steps": per_step}


def lite_worker(spec: dict) -> dict:
    """qlora-lite through its public API: a recipe dict, `recipe_from_dict`, `train`."""
    from qlora_lite.recipe import recipe_from_dict, parse_override
    from qlora_lite.train import train

    out = Path(spec["out"]) / "run"
    raw = {
        "model": {"name_or_path": spec["model"], "gradient_checkpointing": True,
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}},
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"path": spec["rows"], "format": "alpaca", "chat_template": "alpaca", "train_on": "responses",
                 "max_seq_len": spec["max_seq_len"], "eval_split": 0.0, "packing": spec["packing"]},
        "train": {"seed": spec["seed"], "epochs": 1, "micro_batch_size": spec["batch"], "grad_accum": spec["accum"],
                  "lr": spec["lr"], "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                  "optimizer": "paged_adamw_32bit", "weight_decay": 0.0, "log_every": 1, "eval_every": 0,
                  "save_every": 0, "device": spec["device"]},
        "output": {"dir": str(out)},
    }
    for text in spec["lite_set"]:
        path, value = parse_override(text)
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    summary = train(recipe_from_dict(raw))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    trained = [r["trained_tokens"] for r in records]
    per_step = [[b - a, r["loss"]] for a, b, r in zip([0] + trained, trained, records)]
    data = json.loads((out / "data_summary.json").read_text())
    # summary["tokens"] counts a packed row's tail padding; the data summary counts only real tokens,
    # and one epoch trains each of them once.
    return {"tokens": data["tokens"], "trained_tokens": summary["trained_tokens"],
            "train_s": summary["wall_time_s"], "steps": per_step}


def worker_main(side: str, spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    result = (reference_worker if side == "reference" else lite_worker)(spec)
    result["wall_s"] = time.perf_counter() - t0
    result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated()) if spec["device"] == "cuda" else None
    Path(spec["out"], "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: run, measure, report


def run_side(side: str, spec: dict, quiet: bool) -> dict:
    """Run one worker process; add its peak RSS (from wait4, so both sides are measured alike)."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "QLORA_LITE_CACHE": str(Path(spec["work_dir"]) / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    log = open(out / "log.txt", "w")
    cmd = [sys.executable, __file__, "--worker", side, str(out / "spec.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{side} run failed (exit {proc.returncode}); log {out / 'log.txt'}:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["side"], result["seed"] = side, spec["seed"]
    result["tokens_per_s"] = result["tokens"] / result["train_s"]
    result["loss_at_tokens"] = windowed_loss(result["steps"], result["trained_tokens"])
    if not quiet:
        print(format_row(result), flush=True)
    return result


def windowed_loss(steps: list[list], total: int) -> float:
    """Response-token-weighted mean loss over the steps in the last LOSS_WINDOW of `total` tokens."""
    seen, num, den = 0, 0.0, 0
    for n, loss in steps:
        seen += n
        if seen > total * (1 - LOSS_WINDOW):
            num, den = num + loss * n, den + n
    return num / max(den, 1)


def memory_of(r: dict) -> int:
    return r["cuda_peak_bytes"] if r.get("cuda_peak_bytes") else r["peak_rss_bytes"]


HEADER = f"{'side':<11}{'seed':>5}{'steps':>7}{'tokens':>9}{'tok/s':>9}{'peak RSS MB':>13}{'CUDA MB':>9}{'loss@T':>9}"


def format_row(r: dict) -> str:
    cuda = f"{r['cuda_peak_bytes'] / 2**20:.0f}" if r.get("cuda_peak_bytes") else "-"
    return (f"{r['side']:<11}{r['seed']:>5}{len(r['steps']):>7}{r['tokens']:>9}{r['tokens_per_s']:>9.1f}"
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}{cuda:>9}{r['loss_at_tokens']:>9.4f}")


def summarise(results: list[dict]) -> dict:
    """Medians per side, seed spread of the loss, and the qlora-lite/reference ratios."""
    out = {}
    for side in SIDES:
        rs = [r for r in results if r["side"] == side]
        losses = [r["loss_at_tokens"] for r in rs]
        out[side] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "peak_memory_bytes": statistics.median(memory_of(r) for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "loss_at_tokens": statistics.median(losses),
            "loss_spread": max(losses) - min(losses),
            "tokens": rs[0]["tokens"], "trained_tokens": rs[0]["trained_tokens"],
        }
    ref, lite = out["reference"], out["qlora-lite"]
    out["ratios"] = {
        "tokens_per_s": lite["tokens_per_s"] / ref["tokens_per_s"],
        "peak_memory": lite["peak_memory_bytes"] / ref["peak_memory_bytes"],
        "loss_delta": lite["loss_at_tokens"] - ref["loss_at_tokens"],
    }
    return out


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2], sys.argv[3])
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--show":
        return print_saved(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"),
                    help="Alpaca JSON file (trains the tokenizer; its first --rows rows are trained on).")
    ap.add_argument("--work-dir", default="/tmp/qlora-lite-bench", help="Scratch folder: model, rows, runs.")
    ap.add_argument("--pairs", type=int, default=3, help="Reference/qlora-lite pairs (seeds 0..pairs-1).")
    ap.add_argument("--rows", type=int, default=64, help="Rows trained on, one epoch.")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="Micro-batch (rows per forward) of the reference.")
    ap.add_argument("--accum", type=int, default=1, help="Gradient accumulation, both sides.")
    ap.add_argument("--no-packing", action="store_true",
                    help="Run qlora-lite unpacked (length-grouped batches of --batch rows) instead of packed.")
    ap.add_argument("--lite-batch", type=int, default=None,
                    help="qlora-lite micro-batch: default 1 packed row of max-seq-len tokens (about as many "
                         "tokens per step as --batch padded alpaca rows), or --batch with --no-packing.")
    ap.add_argument("--lite-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="Extra recipe override for the qlora-lite side (repeatable).")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: torch's, one per core). On a shared, loaded machine 1 "
                         "keeps OpenMP barriers from stalling and the two sides comparable.")
    ap.add_argument("--only", choices=SIDES, default=None, help="Run one side only (profiling).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data!r} is not a file; pass the Alpaca JSON (e.g. ../shared/data/alpaca_5000.json).")

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_dir, rows_file = prepare(args)
    base = {"model": str(model_dir), "rows": str(rows_file), "max_seq_len": args.max_seq_len, "accum": args.accum,
            "lr": args.lr, "device": device, "work_dir": str(args.work_dir), "threads": args.threads}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()[0]
    results = []
    if not args.json:
        print(HEADER, flush=True)
    for seed in range(args.pairs):
        for side in ([args.only] if args.only else SIDES):
            batch = args.batch if side == "reference" else (args.lite_batch or (args.batch if args.no_packing else 1))
            spec = {**base, "seed": seed, "batch": batch, "packing": not args.no_packing, "lite_set": args.lite_set,
                    "out": str(Path(args.work_dir) / "runs" / stamp / f"{seed}-{side}")}
            results.append(run_side(side, spec, quiet=args.json))
    if args.only:
        return
    s = summarise(results)
    s["load_average"] = [load_before, os.getloadavg()[0]]  # other processes on the machine skew tokens/s
    report = {"device": device, "threads": args.threads or torch.get_num_threads(), "args": vars(args),
              "runs": results, "summary": s}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_footer(report))


def format_footer(report: dict) -> str:
    """Medians, the conditions, and (last line) the qlora-lite/reference ratios."""
    s, lines = report["summary"], []
    for side in SIDES:
        m = s[side]
        cuda = f"{m['peak_memory_bytes'] / 2**20:.0f}" if report["device"] == "cuda" else "-"
        lines.append(f"{'median ' + side:<23}{m['tokens']:>9}{m['tokens_per_s']:>9.1f}"
                     f"{m['peak_rss_bytes'] / 2**20:>13.0f}{cuda:>9}{m['loss_at_tokens']:>9.4f}"
                     f"  (loss spread over seeds {m['loss_spread']:.4f})")
    threads = report.get("threads") or report["args"].get("threads")
    lines.append(f"device {report['device']}, threads {threads}, 1-min load average "
                 f"{s['load_average'][0]:.1f} at start, {s['load_average'][1]:.1f} at end")
    r = s["ratios"]
    lines.append(f"qlora-lite/reference: tokens/s {r['tokens_per_s']:.2f}x, peak memory {r['peak_memory']:.2f}x, "
                 f"loss@T {r['loss_delta']:+.4f}")
    return "\n".join(lines)


def print_saved(path: str) -> None:
    """The table of a saved `--json` run."""
    report = json.loads(Path(path).read_text())
    print(HEADER)
    for r in report["runs"]:
        print(format_row(r))
    print(format_footer(report))

if __name__ == "__main__":
    main()
