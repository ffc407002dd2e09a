"""Module paths from before the one-folder-per-layer layout (qlora-lite 0.1), for code that imported them.

A module that moved fails to import with an ImportError that names its new path. A module whose
name is now a folder (qlora_lite.train, .lora, .data, .model, .memory, .export) still hands out
the names the old module had, from the modules that hold them now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from pathlib import Path

MOVED = {
    "qlora_lite.adapter": "qlora_lite.lora.files",
    "qlora_lite.atomic": "qlora_lite.utils.atomic",
    "qlora_lite.attention": "qlora_lite.ops.attention",
    "qlora_lite.batching": "qlora_lite.data.batching",
    "qlora_lite.checkpoint": "qlora_lite.runs.checkpoint",
    "qlora_lite.demo": "qlora_lite.train.demo",
    "qlora_lite.distributed": "qlora_lite.parallel.distributed",
    "qlora_lite.dora": "qlora_lite.lora.dora",
    "qlora_lite.dtypes": "qlora_lite.utils.dtypes",
    "qlora_lite.estimate": "qlora_lite.memory.estimate",
    "qlora_lite.estimate_inputs": "qlora_lite.memory.estimate_inputs",
    "qlora_lite.estimate_parallel": "qlora_lite.memory.estimate_parallel",
    "qlora_lite.fsdp": "qlora_lite.parallel.fsdp",
    "qlora_lite.gguf_export": "qlora_lite.export.gguf",
    "qlora_lite.host_memory": "qlora_lite.utils.host_memory",
    "qlora_lite.loss": "qlora_lite.ops.loss",
    "qlora_lite.metrics": "qlora_lite.train.metrics",
    "qlora_lite.offload": "qlora_lite.model.offload",
    "qlora_lite.optim": "qlora_lite.train.optim",
    "qlora_lite.packed_kernels": "qlora_lite.ops.packed_kernels",
    "qlora_lite.parallel_memory": "qlora_lite.memory.measure_parallel",
    "qlora_lite.parallel_run": "qlora_lite.train.parallel_run",
    "qlora_lite.profile": "qlora_lite.memory.measure",
    "qlora_lite.quant": "qlora_lite.model.quant",
    "qlora_lite.readers": "qlora_lite.utils.readers",
    "qlora_lite.runfolder": "qlora_lite.runs.folder",
    "qlora_lite.runlock": "qlora_lite.runs.lock",
    "qlora_lite.sources": "qlora_lite.data.sources",
    "qlora_lite.step": "qlora_lite.train.step",
    "qlora_lite.templates": "qlora_lite.data.templates",
    "qlora_lite.tiled_mlp": "qlora_lite.model.tiled_mlp",
    "qlora_lite.tiny": "qlora_lite.model.tiny",
    "qlora_lite.tracking": "qlora_lite.train.tracking",
    "qlora_lite.units": "qlora_lite.utils.units",
    "qlora_lite.verify": "qlora_lite.export.verify",
}
# The old module that a folder replaced -> where its names live now.
FORWARDED = {
    "qlora_lite.data": ("qlora_lite.data.dataset",),
    "qlora_lite.export": ("qlora_lite.export.merge",),
    "qlora_lite.lora": ("qlora_lite.lora.layer",),
    "qlora_lite.memory": ("qlora_lite.memory.tracker",),
    "qlora_lite.model": ("qlora_lite.model.loader",),
    "qlora_lite.train": ("qlora_lite.train.loop", "qlora_lite.train.setup", "qlora_lite.train.batches",
                         "qlora_lite.train.evaluate", "qlora_lite.runs.folder", "qlora_lite.train.metrics",
                         "qlora_lite.train.step"),
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Asked last: a name no finder knows that is a moved module raises ImportError naming the new one."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is not None:
            raise ModuleNotFoundError(f"{fullname} moved to {new} in qlora-lite 0.2; import it from there.",
                                      name=fullname)
        return None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def moved_attribute(name: str):
    """The top package's `__getattr__`: `from qlora_lite import step` names the new path too."""
    new = MOVED.get(f"qlora_lite.{name}")
    if new is not None:
        raise ImportError(f"qlora_lite.{name} moved to {new} in qlora-lite 0.2; import it from there.",
                          name=f"qlora_lite.{name}")
    raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")


def forward(package: str, folder: str):
    """A module `__getattr__` for `package` (a folder at `folder`) that finds the old module's names."""

    def __getattr__(name: str):
        # Submodules are the import system's to find (it asks here first when one is not loaded yet).
        if not name.startswith("_") and not (Path(folder) / f"{name}.py").exists():
            for module in FORWARDED[package]:
                found = getattr(importlib.import_module(module), name, _MISSING)
                if found is not _MISSING:
                    return found
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_MISSING = object()
