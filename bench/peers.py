"""Side-by-side benchmark: qlora-lite against the Hugging Face QLoRA stack (transformers + peft + TRL).

    .venv/bin/python bench/peers.py --data ../shared/data/alpaca_5000.json [--pairs 3] [--json > run.json]
    .venv/bin/python bench/peers.py --show run.json      # the table of a saved --json run

Both stacks train the same random-init Llama (~58M parameters: hidden 512, 8 layers, vocab
32000, written with a BPE tokenizer trained on the data into `--work-dir`) on the same rows,
with the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers), NF4 + double-quant base,
paged_adamw_32bit at a constant 2e-4, max_seq_len truncation and loss on the responses only.
Each run is its own process; runs alternate reference, qlora-lite, reference, ... and pair k
uses seed k on both sides.

Reported per run and as medians: trained tokens per second (non-padding tokens over the
training loop's time, model loading excluded on both sides; `steady`: the same from the second
optimizer step on, leaving out the first step's warm-up), peak memory (the process's peak RSS from `wait4`, and on CUDA
`torch.cuda.max_memory_allocated`), and the loss after the same trained tokens: both sides see
every selected row exactly once, so they train the same tokens; the loss compared is the
response-token-weighted mean of the per-step training loss over the last quarter of them.
Each side shuffles the rows with its own seeded sampler (qlora-lite packs them, so a shared
order is not possible); the spread over seeds says how much that moves the loss.

With `--model DIR` both sides train that model instead (e.g. SmolLM2-135M-Instruct from
`make smollm2`), and every run's adapter is also scored on held-out rows (`--eval-rows`, default
4000:4064) by bench/peers_score.py: the judge on a pretrained model, where training-loss windows
over different rows do not compare. `--reference tuned` sets the HF side up as an expert would
(bench/peers_reference.py).

peft and trl are imported only by the reference worker and the scorer (the `bench` extra).
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

SIDES = ("reference", "qlora-lite")
from peers_reference import REFERENCES

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
# The share of the token budget, at its end, over which the training loss is averaged:
# one step's loss is too noisy to compare, a quarter of the run is not.
LOSS_WINDOW = 0.25


# ---------------------------------------------------------------- the shared model and rows


def prepare(args) -> tuple[Path, Path]:
    """Write (once per settings) the model folder and the rows file under --work-dir."""
    import torch
    import transformers

    from qlora_lite.data.templates import alpaca_prompt
    from qlora_lite.model.tiny import train_bpe_tokenizer
    from qlora_lite.utils.atomic import atomic_dir, atomic_write_json

    rows = json.loads(Path(args.data).read_text())
    work = Path(args.work_dir)
    rows_file = work / f"rows-{args.rows}.json"
    if not rows_file.exists():
        atomic_write_json(rows_file, rows[: args.rows])
    if args.model:
        return Path(args.model), rows_file
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


def lite_worker(spec: dict) -> dict:
    """qlora-lite through its public API: a recipe dict, `recipe_from_dict`, `train`."""
    from qlora_lite.recipe import parse_override, recipe_from_dict
    from qlora_lite.train.loop import train
    from qlora_lite.utils.readers import read_json, read_log

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
    records = [r for r in read_log(out / "metrics.jsonl") if "loss" in r]
    trained = [r["trained_tokens"] for r in records]
    per_step = [[b - a, r["loss"]] for a, b, r in zip([0] + trained, trained, records)]
    data = read_json(out / "data_summary.json", "run the benchmark again")
    # summary["tokens"] counts a packed row's tail padding; the data summary counts only real tokens,
    # and one epoch trains each of them once.
    tokens = [r["tokens"] for r in records]  # running totals, padding excluded; one record per step
    step_clock = [[b - a, (b - a) / r["tokens_per_s"]] for a, b, r in zip([0] + tokens, tokens, records)]
    return {"tokens": data["tokens"], "trained_tokens": summary["trained_tokens"],
            "train_s": summary["wall_time_s"], "steps": per_step, "step_clock": step_clock}


def worker_main(side: str, spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    if side == "reference":
        from peers_reference import reference_worker

        result = reference_worker(spec, LORA)
    else:
        result = lite_worker(spec)
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
    # CPU seconds of the whole worker (loading included): on a machine other processes load, the
    # work done, where wall-clock tokens/s measures the neighbours too.
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["side"], result["seed"], result["out"] = side, spec["seed"], spec["out"]
    result["tokens_per_s"] = result["tokens"] / result["train_s"]
    result["steady_tokens_per_s"] = steady_rate(result.get("step_clock", []))
    result["loss_at_tokens"] = windowed_loss(result["steps"], result["trained_tokens"])
    if not quiet:
        print(format_row(result), flush=True)
    return result


def score_runs(results: list[dict], base: dict, data: str, eval_rows: str, max_seq_len: int) -> None:
    """Held-out eval loss of every run's adapter, all scored in one process on the same 4-bit base."""
    adapters = [str(Path(r["out"]) / ("adapter" if r["side"] == "reference" else "run/adapter")) for r in results]
    cmd = [sys.executable, str(ROOT / "bench" / "peers_score.py"), "--model", base["model"], "--data", data,
           "--rows", eval_rows, "--max-seq-len", str(max_seq_len), *adapters]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if base["threads"]:
        env["OMP_NUM_THREADS"] = str(base["threads"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"scoring failed:\n{out.stderr[-3000:]}")
    scores = json.loads(out.stdout)
    for r, path in zip(results, adapters):
        r["eval_loss"], r["base_eval_loss"] = scores[path], scores["base"]


def steady_rate(step_clock: list[list]) -> float | None:
    """Tokens per second from the second optimizer step on: the first pays the warm-up (CUDA
    context, kernel selection, allocator growth). Both sides' `train_s` starts after the model
    is loaded (qlora-lite: the sum of its step times; the reference: on_train_begin to
    on_train_end) and includes the first step; this figure leaves it out on both.

    Args:
        step_clock (list[list]): per step, [tokens, seconds]. None with fewer than 2 steps.
    """
    rest = step_clock[1:]
    seconds = sum(s for _, s in rest)
    return sum(n for n, _ in rest) / seconds if rest and seconds > 0 else None


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


HEADER = f"{'side':<11}{'seed':>5}{'steps':>7}{'tokens':>9}{'tok/s':>9}{'steady':>9}{'peak RSS MB':>13}{'CUDA MB':>9}{'loss@T':>9}{'eval':>9}"


def format_row(r: dict) -> str:
    cuda = f"{r['cuda_peak_bytes'] / 2**20:.0f}" if r.get("cuda_peak_bytes") else "-"
    return (f"{r['side']:<11}{r['seed']:>5}{len(r['steps']):>7}{r['tokens']:>9}{r['tokens_per_s']:>9.1f}"
            f"{_rate(r.get('steady_tokens_per_s')):>9}"
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}{cuda:>9}{r['loss_at_tokens']:>9.4f}{_eval(r.get('eval_loss')):>9}")


def _eval(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _rate(x) -> str:
    return "-" if x is None else f"{x:.1f}"


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
        steady = [r.get("steady_tokens_per_s") for r in rs]
        out[side]["steady_tokens_per_s"] = statistics.median(steady) if None not in steady else None
        evals = [r["eval_loss"] for r in rs if r.get("eval_loss") is not None]
        if evals:
            out[side].update(eval_loss=statistics.median(evals), eval_spread=max(evals) - min(evals),
                             base_eval_loss=rs[0]["base_eval_loss"])
    ref, lite = out["reference"], out["qlora-lite"]
    out["ratios"] = {
        "tokens_per_s": lite["tokens_per_s"] / ref["tokens_per_s"],
        "peak_memory": lite["peak_memory_bytes"] / ref["peak_memory_bytes"],
        "loss_delta": lite["loss_at_tokens"] - ref["loss_at_tokens"],
    }
    if lite["steady_tokens_per_s"] and ref["steady_tokens_per_s"]:
        out["ratios"]["steady_tokens_per_s"] = lite["steady_tokens_per_s"] / ref["steady_tokens_per_s"]
    if "eval_loss" in lite and "eval_loss" in ref:
        out["ratios"]["eval_delta"] = lite["eval_loss"] - ref["eval_loss"]
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
    ap.add_argument("--model", default=None,
                    help="A model folder (e.g. .cache/models/smollm2-135m-instruct) instead of the random Llama.")
    ap.add_argument("--reference", choices=REFERENCES, default="default",
                    help="default: the documented PEFT/TRL recipe; tuned: packing, bf16, non-reentrant checkpointing.")
    ap.add_argument("--eval-rows", default=None, metavar="START:END",
                    help="Held-out rows of --data to score every run's adapter on (bench/peers_score.py); "
                         "default 4000:4064 with --model, none on the random model.")
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
            "lr": args.lr, "device": device, "work_dir": str(args.work_dir), "threads": args.threads,
            "reference": args.reference}
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
    eval_rows = args.eval_rows or ("4000:4064" if args.model else None)
    if eval_rows:
        score_runs(results, base, args.data, eval_rows, args.max_seq_len)
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
        lines.append(f"{'median ' + side:<23}{m['tokens']:>9}{m['tokens_per_s']:>9.1f}{_rate(m.get('steady_tokens_per_s')):>9}"
                     f"{m['peak_rss_bytes'] / 2**20:>13.0f}{cuda:>9}{m['loss_at_tokens']:>9.4f}"
                     f"{_eval(m.get('eval_loss')):>9}  (spread over seeds: loss {m['loss_spread']:.4f}"
                     + (f", eval {m['eval_spread']:.4f}; base eval {m['base_eval_loss']:.4f})" if "eval_loss" in m else ")"))
    threads = report.get("threads") or report["args"].get("threads")
    lines.append(f"device {report['device']}, threads {threads}, 1-min load average "
                 f"{s['load_average'][0]:.1f} at start, {s['load_average'][1]:.1f} at end")
    r = s["ratios"]
    reference = report["args"].get("reference", "default")
    lines.append(f"qlora-lite/reference ({reference}): tokens/s {r['tokens_per_s']:.2f}x, "
                 f"peak memory {r['peak_memory']:.2f}x, loss@T {r['loss_delta']:+.4f}"
                 + (f", eval {r['eval_delta']:+.4f}" if "eval_delta" in r else "")
                 + (f", steady tokens/s (from step 2) {r['steady_tokens_per_s']:.2f}x" if "steady_tokens_per_s" in r
                    else ""))
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
