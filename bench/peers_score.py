"""The bench's judge: held-out eval loss of each run's adapter, scored the same way for every side.

    .venv/bin/python bench/peers_score.py --model DIR --data alpaca.json --rows 4000:4064 ADAPTER_DIR ... [--json]

Every adapter (qlora-lite's and the Hugging Face stack's, both PEFT format) is loaded through peft
on one 4-bit base (transformers' BitsAndBytesConfig: NF4, double quant, bf16 compute) and scored on
the same held-out Alpaca rows: BOS and the Alpaca prompt, response + EOS, loss on response tokens only,
token-weighted mean over the rows. The base without an adapter is scored too. Training losses are
not comparable across stacks (docs/performance.md, "Why the training-loss windows are not comparable across stacks"); this is.
peft is imported here only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BATCH = 8  # rows per forward: small enough for CPU memory, large enough to amortise dequantization


def eval_batches(tokenizer, rows: list[dict], max_seq_len: int):
    """Padded (input_ids, attention_mask, labels) batches of the rows, in order."""
    import torch

    from qlora_lite.data.templates import alpaca_prompt

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # as qlora-lite renders Alpaca
    samples = []
    for r in rows:
        prompt = bos + tokenizer(alpaca_prompt(r["instruction"], r.get("input") or ""), add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_seq_len]
        samples.append((ids, ([-100] * len(prompt) + answer)[:max_seq_len]))
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        yield ids, mask, labels


def score(model, batches) -> float:
    """Token-weighted mean next-token loss over the labelled tokens of `batches`."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1)


def score_adapters(model_dir: str, rows: list[dict], adapters: list[str], max_seq_len: int = 512) -> dict:
    """{"base": loss, <adapter dir>: loss, ...} on `rows`, every adapter on the same 4-bit base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_lite.model.loader import disable_cpu_weight_packing

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = list(eval_batches(tokenizer, rows, max_seq_len))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": "cpu"}).eval()
    disable_cpu_weight_packing(base)  # both sides were trained on the unpacked 4-bit weights
    out = {"base": score(base, batches)}
    model = None
    for i, path in enumerate(adapters):
        name = f"a{i}"
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
        else:
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        out[path] = score(model, batches)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", default="4000:4064", help="held-out rows, START:END of the data file")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("adapters", nargs="*")
    args = ap.parse_args()
    start, end = (int(x) for x in args.rows.split(":"))
    rows = json.loads(Path(args.data).read_text())[start:end]
    print(json.dumps(score_adapters(args.model, rows, args.adapters, args.max_seq_len), indent=1))


if __name__ == "__main__":
    main()
