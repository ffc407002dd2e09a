"""Environment switches that put a faster path back to the plain one, for comparisons and debugging.

QLORA_LITE_FUSED=0: LoRA linears and RMSNorms run unfused (PEFT's and transformers' own ops);
QLORA_LITE_FLAT=0: the optimizer steps every adapter tensor on its own. The benchmarks and the op
counts of bench/profile_step.py set them to measure what each path costs.
"""

from __future__ import annotations

import os

FUSED = "QLORA_LITE_FUSED"
FLAT = "QLORA_LITE_FLAT"


def enabled(name: str) -> bool:
    """Whether the switch `name` is on (it is unless set to 0)."""
    return os.environ.get(name, "1") != "0"
