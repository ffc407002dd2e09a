"""qlora-lite: QLoRA fine-tuning for one consumer GPU."""

import logging

from . import _moved

__version__ = "0.2.0"

_moved.install()  # old module paths name their new ones (_moved.py)
__getattr__ = _moved.moved_attribute

# bitsandbytes' CPU backend looks for an optional inference kernel (the `kernels` package, which
# would download it) and warns when it is missing. We never use that kernel: qlora-lite turns
# bitsandbytes' CPU inference repacking off (see model/loader.py, disable_cpu_weight_packing).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
