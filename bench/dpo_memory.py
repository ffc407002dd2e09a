"""Peak memory of a DPO step: qlora-lite's DPO against its own SFT step and against TRL's DPOTrainer + PEFT.

    .venv/bin/python bench/dpo_memory.py --model .cache/models/smollm2-135m-instruct \
        --data ../shared/data/alpaca_5000.json [--pairs 2] [--steps 3] [--json > run.json]

The pairs: the longest Alpaca answers (`--data`), each chosen against the next one's answer (a long,
wrong answer to the question: the shape of a real preference pair at its length), as conversational
messages so that both stacks apply the model's chat template to the same text. Every pair fits in
`--max-seq-len`, so neither side truncates or drops one.

Three sides, each in its own process, on the same 4-bit model (NF4, double quantization, bf16
compute, gradient checkpointing) with the same LoRA (r 16, alpha 32, dropout 0, all linear layers),
`--batch` pairs a step, paged_adamw_32bit, `--steps` optimizer steps:

- `dpo`: `qlora-lite` with `train.objective: dpo` (reference: the adapters disabled, in the step);
- `sft`: `qlora-lite` SFT on the same sequences (each chosen and each rejected answer a row,
  2 x `--batch` rows a step, no packing): the same tokens a forward, without the pair and the
  reference pass;
- `trl`: TRL's DPOTrainer with a PEFT model (reference: `disable_adapter()`), tuned as an expert
  would (no prepare_model_for_kbit_training, non-reentrant checkpointing).

Two peaks a run, both over the same stretch on each side:
- `tracker`: qlora-lite's MemoryTracker (qlora_lite/memory/tracker.py: live tensor storage, what a GPU
  would have to hold) from the loaded model to the last optimizer step: weights, adapters, optimizer
  state, activations, logits and temporaries, the same dispatch-level count on both stacks;
- `rss`: the process's peak RSS from `wait4`: everything, Python and the libraries included (model
  loading too: about 0.84 GiB for SmolLM2 on either stack, so RSS ratios understate the step's own
  difference; glibc's and oneDNN's caches make it move by ~0.2 GiB from run to run).
Runs alternate dpo, sft, trl per pair; medians over `--pairs` are quoted. peft and trl are imported by the `trl` worker only (the `bench` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("dpo", "sft", "trl")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BETA = 0.1
LR = 5e-6


# ---------------------------------------------------------------- the shared pairs


def write_pairs(data: str, model: str, n: int, max_seq_len: int, out: Path) -> dict:
    """`n` pairs from the longest answers in `data` that fit `max_seq_len` with the chat template;
    writes pairs.jsonl (conversational preference rows) and rows.jsonl (the same turns as SFT rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = sorted(json.loads(Path(data).read_text()), key=lambda r: -len(r["output"]))

    def length(row: dict, answer: str) -> int:
        return len(tokenizer.apply_chat_template(conversation(row, answer), tokenize=True, return_dict=True)["input_ids"])

    chosen = [r for r in rows if length(r, r["output"]) <= max_seq_len // 2][:n + 1]
    pairs = [{"prompt": conversation(a)[:1], "chosen": conversation(a, a["output"])[1:],
              "rejected": conversation(a, b["output"])[1:]} for a, b in itertools.pairwise(chosen)]
    sft = [{"messages": p["prompt"] + p[side]} for p in pairs for side in ("chosen", "rejected")]
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    lengths = [length(a, b["output"]) for a, b in itertools.pairwise(chosen)] + [length(a, a["output"]) for a in chosen[:n]]
    return {"pairs": len(pairs), "longest": max(lengths), "mean": round(statistics.mean(lengths))}


def conversation(row: dict, answer: str | None = None) -> list[dict]:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    msgs = [{"role": "user", "content": user}]
    return msgs + [{"role": "assistant", "content": answer}] if answer is not None else msgs


# ---------------------------------------------------------------- the workers


def lite_worker(spec: dict, objective: str) -> dict:
    """qlora-lite as `train` runs it (setup_run, fit, finish), the tracker around the loop."""
    from qlora_lite.lora.layer import lora_parameters
    from qlora_lite.memory.tracker import MemoryTracker, module_tensors
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.loop import finish, fit
    from qlora_lite.train.setup import setup_run

    dpo = objective == "dpo"
    train_cfg = {"seed": spec["seed"], "max_steps": spec["steps"], "micro_batch_size": spec["batch"] * (1 if dpo else 2),
                 "grad_accum": 1, "lr": LR, "lr_scheduler": "constant", "warmup_steps": 0,
                 "optimizer": "paged_adamw_32bit", "weight_decay": 0.0, "log_every": 1, "eval_every": 0,
                 "save_every": 0, "device": "cpu"}
    if spec.get("loss_chunk_size") is not None:
        train_cfg["loss_chunk_size"] = spec["loss_chunk_size"]
    if dpo:
        train_cfg.update(objective="dpo", beta=BETA)
    run = setup_run(recipe_from_dict({
        "model": {"name_or_path": spec["model"], "gradient_checkpointing": True,
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}},
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"path": spec["pairs" if dpo else "rows"], "format": "preference" if dpo else "messages",
                 "max_seq_len": spec["max_seq_len"], "eval_split": 0.0, "packing": False},
        "train": train_cfg,
        "output": {"dir": str(Path(spec["out"]) / "run")},
    }))
    tracker = MemoryTracker(module_tensors(run.model, lora_parameters(run.model)))
    with tracker:
        fit(run)
    summary = finish(run)
    return {"tokens": summary["tokens"], "train_s": summary["wall_time_s"], "loss": summary["train_loss"],
            "tracker_peak_bytes": tracker.peak, "tracker_at_peak": tracker.breakdown().to_dict()}


def trl_worker(spec: dict) -> dict:
    """TRL's DPOTrainer with a PEFT LoRA model on the 4-bit base, set up as TRL documents it for QLoRA."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import DPOConfig, DPOTrainer

    from qlora_lite.memory.tracker import MemoryTracker, module_tensors

    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    pairs = [json.loads(line) for line in open(spec["pairs"])]
    config = DPOConfig(
        output_dir=str(Path(spec["out"]) / "trl"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, optim="paged_adamw_32bit", weight_decay=0.0, beta=BETA, max_length=spec["max_seq_len"],
        precompute_ref_log_probs=False, bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to="none", seed=spec["seed"], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=peft_config)
    tracker = MemoryTracker(module_tensors(trainer.model, [p for p in trainer.model.parameters() if p.requires_grad]))
    t0 = time.perf_counter()
    with tracker:
        out = trainer.train()
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    return {"tokens": int(tokens[-1]) if tokens else None, "train_s": time.perf_counter() - t0,
            "loss": out.training_loss, "tracker_peak_bytes": tracker.peak, "tracker_at_peak": tracker.breakdown().to_dict()}


def worker_main(side: str, spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    result = trl_worker(spec) if side == "trl" else lite_worker(spec, side)
    Path(spec["out"], "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def run_side(side: str, spec: dict) -> dict:
    """One worker process; its peak RSS from wait4, so every side is measured alike."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "QLORA_LITE_CACHE": str(out / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"])}
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", side, str(out / "spec.json")], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{side} run failed; log {out / 'log.txt'}:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    result.update(side=side, seed=spec["seed"], peak_rss_bytes=usage.ru_maxrss * 1024)  # Linux: KiB
    return result


def summarise(results: list[dict]) -> dict:
    """Medians per side, and the ratios as medians of the per-round ratios (each round's three runs
    ran back to back, so a ratio within a round is what the machine's drift disturbs least)."""
    out = {}
    rounds = sorted({r["seed"] for r in results})
    at = {(r["side"], r["seed"]): r for r in results}
    for key, short in (("tracker_peak_bytes", "tracker"), ("peak_rss_bytes", "rss")):
        out[f"median_{key}"] = {s: statistics.median(at[s, k][key] for k in rounds) for s in SIDES}
        for other in ("sft", "trl"):
            out[f"dpo_over_{other}_{short}"] = statistics.median(at["dpo", k][key] / at[other, k][key] for k in rounds)
    return out


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def format_report(report: dict) -> str:
    lines = [(f"pairs: {report['data']['pairs']} ({report['data']['mean']} tokens a sequence on average, longest "
             f"{report['data']['longest']}), {report['spec']['batch']} a step, {report['spec']['steps']} steps, "
             f"{report['spec']['threads']} thread(s)"),
             f"{'side':<5} {'seed':>4} {'tracker GiB':>11} {'peak RSS GiB':>12} {'tokens':>7} {'train s':>8} "
             f"{'loss':>7}"]
    for r in report["runs"]:
        lines.append(f"{r['side']:<5} {r['seed']:>4} {gib(r['tracker_peak_bytes']):>11} {gib(r['peak_rss_bytes']):>12} "
                     f"{r['tokens'] or '-':>7} {r['train_s']:>8.1f} {r['loss']:>7.4f}")
    s = report["summary"]
    for key, short, label in (("tracker_peak_bytes", "tracker", "tracker peak"), ("peak_rss_bytes", "rss", "peak RSS")):
        med = s[f"median_{key}"]
        lines.append(f"median {label}: dpo {gib(med['dpo'])} GiB, sft {gib(med['sft'])} GiB, trl {gib(med['trl'])} "
                     f"GiB; per round, median: dpo / trl {s[f'dpo_over_trl_{short}']:.2f}x (target <= 0.6x), dpo / sft "
                     f"{s[f'dpo_over_sft_{short}']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A model folder (e.g. .cache/models/smollm2-135m-instruct).")
    ap.add_argument("--data", required=True, help="Alpaca rows (e.g. ../shared/data/alpaca_5000.json).")
    ap.add_argument("--pairs", type=int, default=2, help="Alternating rounds (dpo, sft, trl each). Default 2.")
    ap.add_argument("--steps", type=int, default=3, help="Optimizer steps a run. Default 3.")
    ap.add_argument("--batch", type=int, default=1, help="Preference pairs a step. Default 1.")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="Longest sequence (prompt + answer). Default 1024.")
    ap.add_argument("--loss-chunk-size", type=int, default=None,
                    help="qlora-lite's train.loss_chunk_size (logit rows at a time). Default: the recipe default.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=".cache/bench/dpo_memory")
    ap.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = ap.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = write_pairs(args.data, args.model, args.steps * args.batch, args.max_seq_len, work)
    spec = {"model": str(Path(args.model).resolve()), "pairs": str(work / "pairs.jsonl"),
            "rows": str(work / "rows.jsonl"), "steps": args.steps, "batch": args.batch,
            "max_seq_len": args.max_seq_len, "threads": args.threads, "loss_chunk_size": args.loss_chunk_size}
    runs = []
    for k in range(args.pairs):
        for side in SIDES:
            runs.append(run_side(side, dict(spec, seed=k, out=str(work / f"{side}-{k}"))))
            print(f"{side} seed {k}: tracker {gib(runs[-1]['tracker_peak_bytes'])} GiB, peak RSS "
                  f"{gib(runs[-1]['peak_rss_bytes'])} GiB", file=sys.stderr, flush=True)
    report = {"data": data, "spec": spec, "runs": runs, "summary": summarise(runs),
              "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    print(json.dumps(report, indent=1) if args.json else format_report(report))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--worker"]:
        worker_main(*sys.argv[2:4])
    else:
        main()
