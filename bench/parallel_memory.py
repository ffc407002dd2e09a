"""Measure each rank's peak memory of a data-parallel QLoRA step and set it against the estimate.

    # the single-process reference, then 2 FSDP ranks on the CPU (gloo):
    python bench/parallel_memory.py RECIPE --out runs/mem-1
    torchrun --nproc-per-node 2 bench/parallel_memory.py RECIPE --strategy fsdp --out runs/mem-2

Writes OUT/memory.json (every rank's breakdown and the estimate) and prints a table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def main(argv=None) -> int:
    from qlora_lite.memory.estimate import estimate_mode
    from qlora_lite.memory.estimate_inputs import load_arch, settings_from_recipe
    from qlora_lite.memory.measure_parallel import measure_rank
    from qlora_lite.model.loader import resolve_model_path
    from qlora_lite.parallel.distributed import close_world, init_world
    from qlora_lite.recipe import load_recipe
    from qlora_lite.utils.atomic import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)
    world = init_world(args.strategy, "cpu")
    mine = measure_rank(recipe, world, steps=args.steps, seq_len=args.seq_len)
    ranks = world.gather_objects(mine)
    close_world(world)
    if not world.main:
        return 0
    s = replace(settings_from_recipe(recipe, args.seq_len, "cpu", nproc=world.size),
                distributed=world.strategy if world.parallel else "ddp")
    predicted = estimate_mode(load_arch(resolve_model_path(recipe.model.name_or_path)), s, "qlora")
    worst = max(ranks, key=lambda r: r["peak"]["total"])
    out = {"recipe": args.recipe, "seq_len": args.seq_len, "world_size": world.size, "strategy": s.distributed,
           "ranks": ranks, "largest_rank": worst["rank"], "estimate": predicted,
           "estimate_error": predicted["total"] / worst["peak"]["total"] - 1}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out) / "memory.json", out)
    cats = list(predicted["bytes"])
    print("| | " + " | ".join(f"rank {r['rank']}" for r in ranks) + " | estimate |")
    print("|---|" + "---:|" * (len(ranks) + 1))
    for c in cats + ["total"]:
        got = [r["peak"]["bytes"][c] if c != "total" else r["peak"]["total"] for r in ranks]
        want = predicted["bytes"][c] if c != "total" else predicted["total"]
        print(f"| {c} | " + " | ".join(f"{v / 2**20:.3f} MiB" for v in got) + f" | {want / 2**20:.3f} MiB |")
    print(f"estimate vs largest rank ({worst['rank']}): {out['estimate_error']:+.1%}")
    return 0


if __name__ == "__main__":
    from qlora_lite.parallel.distributed import exit_process

    exit_process(main())
