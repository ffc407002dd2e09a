"""Write the demo data set recipes/data/tiny-instructions.jsonl (deterministic).

    .venv/bin/python tools/make_demo_data.py [--rows 1200] [--seed 0] [--out recipes/data/tiny-instructions.jsonl]

The rows come from `qlora_lite.tiny.demo_rows`, which also trains the tiny tokenizer, so the
file and the tokenizer always agree.
"""

from __future__ import annotations

import argparse
import json

from qlora_lite.data.demo_rows import demo_rows
from qlora_lite.utils.atomic import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="recipes/data/tiny-instructions.jsonl")
    args = ap.parse_args()
    rows = demo_rows(args.rows, args.seed)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
