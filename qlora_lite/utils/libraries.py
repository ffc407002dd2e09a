"""Third-party libraries kept from acting on their own: no code fetched from the Hub, no progress bars.

bitsandbytes 0.50, on a CPU with AVX512-BF16, asks the `kernels` package (installed with
transformers) for `kernels-community/quantization-bitsandbytes` while it is being imported:
online that downloads and runs code nobody asked for, offline it logs two warnings. qlora-lite
never uses that kernel (model/loader.py turns bitsandbytes' CPU inference packing off), so
`refuse_hub_kernels_on_import` makes the lookup fail without touching the network, before
bitsandbytes' import can run it; bitsandbytes then uses its own kernels, as it does when
`kernels` is not installed. QLORA_LITE_HUB_KERNELS=1 lets it fetch the kernel as it would.

transformers draws a "Loading weights" bar for every from_pretrained, which fills run and demo
logs; `quiet_progress_bars` turns transformers' own bars off and leaves the Hub's download bars
as they were (a user waiting on a multi-GB download wants to see it move).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from contextlib import contextmanager

HUB_KERNELS = "QLORA_LITE_HUB_KERNELS"  # =1: let bitsandbytes fetch its CPU kernel from the Hub
BITSANDBYTES = "bitsandbytes"


class HubKernelRefused(RuntimeError):
    """What `kernels.get_kernel` raises while bitsandbytes is imported without the opt-in."""


def _refused(repo_id: str, *args, **kwargs):
    raise HubKernelRefused(f"qlora-lite does not fetch {repo_id!r} from the Hub (set {HUB_KERNELS}=1 to allow it)")


@contextmanager
def no_hub_kernels():
    """Inside it, `kernels.get_kernel` raises instead of downloading (nothing to do without `kernels`)."""
    try:
        import kernels
    except ImportError:
        yield
        return
    original = kernels.get_kernel
    kernels.get_kernel = _refused
    try:
        yield
    finally:
        kernels.get_kernel = original


class _GuardedLoader(importlib.abc.Loader):
    """bitsandbytes' own loader, run inside `no_hub_kernels`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with no_hub_kernels():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as Python would, once, and hands back its spec with the guarded loader."""

    def find_spec(self, name, path=None, target=None):
        if name != BITSANDBYTES:
            return None
        sys.meta_path.remove(self)  # one import of bitsandbytes per process; also stops the recursion
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _GuardedLoader(spec.loader)
        return spec


def refuse_hub_kernels_on_import() -> None:
    """Make bitsandbytes' import-time Hub kernel lookup fail, unless QLORA_LITE_HUB_KERNELS=1.

    Called when qlora_lite is imported, before anything of ours imports transformers or
    bitsandbytes. A bitsandbytes imported earlier by the caller has already done its lookup.
    """
    if os.environ.get(HUB_KERNELS) == "1" or BITSANDBYTES in sys.modules:
        return
    if not any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesFinder())


def quiet_progress_bars() -> None:
    """Turn transformers' own progress bars ("Loading weights") off; the Hub's download bars stay."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as tlog

    downloads_on = not hub.are_progress_bars_disabled()
    tlog.disable_progress_bar()  # also turns the Hub's bars off, which are put back as they were
    if downloads_on:
        hub.enable_progress_bars()
