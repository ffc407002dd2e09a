"""The real-model demo: SmolLM2's answers to held-out questions before and after training, and after export.

    .venv/bin/python tools/identity_demo.py [--recipe recipes/smollm2-identity.yaml] [--export runs/smollm2-identity-merged]
    (or: make demo)

Steps, in one process: greedy answers of the 4-bit base to every question of the recipe's eval
file (phrasings and facts training never shows); `run --demo` (eval loss and one generation
before/after, its own table); the same questions to the run (4-bit base + adapter); `export
--verify` into a plain bf16 model; the same questions to the export. Then a table, and checks:
the new name shows on the held-out identity questions, France's capital is still Paris, and the
export gives the run's identity and France answers word for word (how many of all answers are
identical is reported: near-ties on the sums may flip under the bf16 merge). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from make_identity_data import MAKER_EVAL, NAME, WHO_EVAL

NEW_TOKENS = 24  # the longest answer in the data is 21 tokens + EOS; the base's rambling is cut here


def questions(eval_path: str) -> list[str]:
    return [json.loads(line)["instruction"] for line in Path(eval_path).read_text().splitlines() if line.strip()]


def answers(model, tokenizer, qs: list[str]) -> list[str]:
    from qlora_lite.generate import generate_text

    return [generate_text(model, tokenizer, q, max_new_tokens=NEW_TOKENS) for q in qs]


def base_answers(recipe, qs: list[str]) -> list[str]:
    """Answers of the 4-bit base, as training starts from it."""
    from qlora_lite.model.loader import load_model, load_tokenizer

    model = load_model(replace(recipe.model, gradient_checkpointing=False)).eval()
    return answers(model, load_tokenizer(recipe.model), qs)


def folder_answers(path: str, qs: list[str]) -> list[str]:
    """Answers of a run folder (4-bit base + adapter) or a model folder (an export)."""
    from qlora_lite.generate import load_for_generation

    loaded = load_for_generation(path)
    return answers(loaded.model, loaded.tokenizer, qs)


def checks(qs: list[str], after: list[str], exported: list[str]) -> list[tuple[str, bool]]:
    """The demo's claims, each with whether it held."""
    def pick(answers, which):
        return [a for q, a in zip(qs, answers) if which(q)]

    identity, france = (lambda q: q in WHO_EVAL + MAKER_EVAL), (lambda q: "France" in q)
    same = sum(a == e for a, e in zip(after, exported))
    # The export must make the same claims as the run: the new name, and Paris. Word for word it
    # need not agree: the bf16 merge and NF4 + adapter round differently, and a near-tie can flip
    # a greedy token and send an answer down another phrasing (seen on the maker question,
    # 2026-12-04, "I come from Lantern Labs, ..." vs "The Lantern Labs team built me, ...");
    # export --verify holds the logits to the model's, and the agreement is reported.
    return [
        (f"new identity on held-out identity questions: {sum(NAME in a for a in pick(after, identity))}/"
         f"{len(pick(after, identity))}", all(NAME in a for a in pick(after, identity))),
        ("general knowledge kept: France's capital is still Paris", all("Paris" in a for a in pick(after, france))),
        (f"the export claims the same: the new name {sum(NAME in e for e in pick(exported, identity))}/"
         f"{len(pick(exported, identity))}, Paris {sum('Paris' in e for e in pick(exported, france))}/"
         f"{len(pick(exported, france))}",
         all(NAME in e for e in pick(exported, identity)) and all("Paris" in e for e in pick(exported, france))),
        (f"export answers as the run word for word: {same}/{len(qs)} (reported)", True),
    ]


def print_table(qs, before, after, exported, summary: dict) -> None:
    demo = summary.get("demo", {})
    if demo:
        print(f"\neval loss (held-out rows): {demo['before']['eval_loss']:.4f} before -> "
              f"{demo['after']['eval_loss']:.4f} after")
    for q, b, a, e in zip(qs, before, after, exported):
        print(f"\nQ: {q}\n  before:   {b!r}\n  after:    {a!r}")
        if e != a:
            print(f"  exported: {e!r}")
    print()


def main() -> int:
    from qlora_lite.export.merge import export_model
    from qlora_lite.export.verify import verify_report
    from qlora_lite.recipe import load_recipe
    from qlora_lite.train.loop import run_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/smollm2-identity.yaml")
    ap.add_argument("--export", default="runs/smollm2-identity-merged")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    qs = questions(recipe.data.eval_path)
    before = base_answers(recipe, qs)
    if run_recipe(recipe, overwrite=True, demo=True) != 0:
        return 1
    run_dir = recipe.output.dir
    after = folder_answers(run_dir, qs)
    info = export_model(run_dir, args.export, verify=True, overwrite=True, log=lambda m: print(m, file=sys.stderr))
    v = info["verify"]
    print(f"export --{verify_report(v)}")
    exported = folder_answers(args.export, qs)
    print_table(qs, before, after, exported, json.loads((Path(run_dir) / "summary.json").read_text()))
    results = checks(qs, after, exported)
    for text, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
