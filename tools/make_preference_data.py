"""Write the DPO demo's preference pairs: the identity answers as chosen, the base model's own answers as rejected.

    .venv/bin/python tools/make_preference_data.py [--model .cache/models/smollm2-135m-instruct] [--out-dir recipes/data]

For every row of the identity demo's data (recipes/data/identity-train.jsonl and identity-eval.jsonl,
tools/make_identity_data.py) the prompt is its question, `chosen` its answer in the new identity
("Quill", made by "Lantern Labs", signed " ~ Quill") and `rejected` what SmolLM2-135M-Instruct itself
answers: greedy, from the 4-bit base that training starts from, as `run` loads it. So the pairs teach
one thing, the new identity and signature over the model's own behaviour, and the held-out pairs ask
questions training never shows. Writes identity-pairs-train.jsonl and identity-pairs-eval.jsonl
({prompt, chosen, rejected}); a pair whose answers agree is left out (none do: the base never signs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora_lite.utils.atomic import atomic_write_text

NEW_TOKENS = 40  # the base's answers mostly end by here; a longer one is cut (still not the chosen answer)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def base_answers(model_path: str, prompts: list[str]) -> list[str]:
    """Greedy answers of the 4-bit base (the recipe's quantization defaults), rendered with its chat template."""
    from qlora_lite.generate import generate_text
    from qlora_lite.model.loader import load_model, load_tokenizer
    from qlora_lite.recipe import ModelConfig

    cfg = ModelConfig(name_or_path=model_path, gradient_checkpointing=False)
    model, tokenizer = load_model(cfg, "cpu").eval(), load_tokenizer(cfg)
    return [generate_text(model, tokenizer, p, max_new_tokens=NEW_TOKENS) for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--data-dir", default="recipes/data", help="Where identity-train/eval.jsonl are.")
    ap.add_argument("--out-dir", default="recipes/data")
    args = ap.parse_args()
    for split in ("train", "eval"):
        rows = read_rows(Path(args.data_dir) / f"identity-{split}.jsonl")
        prompts = [r["instruction"] for r in rows]
        rejected = base_answers(args.model, prompts)
        pairs = [{"prompt": p, "chosen": r["output"], "rejected": b.strip()}
                 for p, r, b in zip(prompts, rows, rejected) if b.strip() and b.strip() != r["output"]]
        out = Path(args.out_dir) / f"identity-pairs-{split}.jsonl"
        atomic_write_text(out, "".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{out}: {len(pairs)} pairs ({len(rows) - len(pairs)} left out)")


if __name__ == "__main__":
    main()
