"""`python -m qlora_lite` is the `qlora-lite` command (what torchrun's `-m qlora_lite` runs on each rank)."""

from .cli import main

main()
