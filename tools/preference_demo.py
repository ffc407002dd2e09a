"""The DPO demo on a real model: SFT, then DPO against the SFT adapter, held-out pairs and answers, export.

    .venv/bin/python tools/preference_demo.py [--sft recipes/smollm2-identity.yaml]
        [--dpo recipes/smollm2-dpo.yaml] [--export runs/smollm2-dpo-merged]
    (or: make demo-dpo)

Steps, in one process: the SFT recipe (SmolLM2-135M-Instruct learns the identity demo's answers); the DPO
recipe from that adapter (`lora.init_from`: the starting point and, frozen, the reference), with the
held-out pairs evaluated before and after (`run --demo`); `export --verify` of the DPO run into a plain
bf16 model; the held-out prompts answered by the SFT run, the DPO run and the export. Checks: the
held-out pair accuracy (rewards/accuracies: the policy prefers the chosen answer over the rejected one
more than its reference does) rises to at least 0.9 and the held-out margin rises; the export answers the
held-out identity questions with the new name and France's capital with Paris. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from identity_demo import folder_answers
from make_identity_data import MAKER_EVAL, NAME, WHO_EVAL

MIN_ACCURACY = 0.9


def prompts(eval_path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(eval_path).read_text().splitlines() if line.strip()]


def checks(qs: list[str], exported: list[str], demo: dict) -> list[tuple[str, bool]]:
    """The demo's claims, each with whether it held."""
    before, after = demo["before"]["eval"], demo["after"]["eval"]
    identity = [e for q, e in zip(qs, exported) if q in WHO_EVAL + MAKER_EVAL]
    france = [e for q, e in zip(qs, exported) if "France" in q]
    acc = (before["rewards/accuracies"], after["rewards/accuracies"])
    margin = (before["rewards/margins"], after["rewards/margins"])
    return [
        (f"held-out pair accuracy {acc[0]:.2f} -> {acc[1]:.2f} (at least {MIN_ACCURACY})", acc[1] >= MIN_ACCURACY),
        (f"held-out reward margin {margin[0]:.4f} -> {margin[1]:.4f} (up)", margin[1] > margin[0]),
        (f"the export answers with the chosen behaviour: the new name {sum(NAME in e for e in identity)}/"
         f"{len(identity)} identity questions, Paris {sum('Paris' in e for e in france)}/{len(france)}",
         all(NAME in e for e in identity) and all("Paris" in e for e in france)),
    ]


def print_table(qs, sft, dpo, exported, demo: dict) -> None:
    b, a = demo["before"]["eval"], demo["after"]["eval"]
    print("\nheld-out pairs      before DPO -> after")
    for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "logps/chosen", "logps/rejected"):
        print(f"  {k:<18} {b[k]:>10.4f} -> {a[k]:.4f}")
    for q, s, d, e in zip(qs, sft, dpo, exported):
        print(f"\nQ: {q}\n  SFT:      {s!r}\n  SFT+DPO:  {d!r}")
        if e != d:
            print(f"  exported: {e!r}")
    print()


def main() -> int:
    from qlora_lite.export.merge import export_model
    from qlora_lite.export.verify import verify_report
    from qlora_lite.recipe import load_recipe
    from qlora_lite.train.loop import run_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="recipes/smollm2-identity.yaml")
    ap.add_argument("--dpo", default="recipes/smollm2-dpo.yaml")
    ap.add_argument("--export", default="runs/smollm2-dpo-merged")
    args = ap.parse_args()
    sft, dpo = load_recipe(args.sft), load_recipe(args.dpo)
    if Path(dpo.lora.init_from or "").resolve() != Path(sft.output.dir).resolve():
        print(f"error: {args.dpo} starts from lora.init_from {dpo.lora.init_from!r}, not the SFT run "
              f"{sft.output.dir!r}", file=sys.stderr)
        return 1
    qs = prompts(dpo.data.eval_path)
    if run_recipe(sft, overwrite=True) != 0 or run_recipe(dpo, overwrite=True, demo=True) != 0:
        return 1
    info = export_model(dpo.output.dir, args.export, verify=True, overwrite=True,
                        log=lambda m: print(m, file=sys.stderr))
    v = info["verify"]
    print(f"export --{verify_report(v)}")
    answers = [folder_answers(path, qs) for path in (sft.output.dir, dpo.output.dir, args.export)]
    demo = json.loads((Path(dpo.output.dir) / "summary.json").read_text())["demo"]
    print_table(qs, *answers, demo)
    results = checks(qs, answers[2], demo)
    for text, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
