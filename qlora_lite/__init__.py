"""qlora-lite: QLoRA fine-tuning for one consumer GPU."""

import logging

from . import _moved
from .utils.libraries import refuse_hub_kernels_on_import

__version__ = "0.2.0"

_moved.install()  # old module paths name their new ones (_moved.py)
__getattr__ = _moved.moved_attribute

# bitsandbytes' CPU backend asks the `kernels` package for an optional inference kernel from the
# Hub when it is imported, and warns when it cannot have it. We never use that kernel (qlora-lite
# turns bitsandbytes' CPU inference repacking off, see model/loader.py): the lookup is refused
# before it reaches the network (utils/libraries.py) and bitsandbytes' warning about it is hidden.
refuse_hub_kernels_on_import()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
