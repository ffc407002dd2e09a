"""qlora-lite: QLoRA fine-tuning for one consumer GPU."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend looks for an optional inference kernel (the `kernels` package, which
# would download it) and warns when it is missing. We never use that kernel: qlora-lite turns
# bitsandbytes' CPU inference repacking off (see model.disable_cpu_weight_packing).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
