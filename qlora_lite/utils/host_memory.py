"""Host RAM a run gives back: freed tensors returned to the OS, no weights file kept mapped.

Measured on SmolLM2-135M (docs/performance.md, "Host memory"), two things kept a CPU run's resident memory
far above what it holds:

1. glibc's malloc keeps freed blocks in its heaps, and its mmap threshold grows (up to 32 MiB)
   each time a mapped block is freed, so tensors of a size that changes every step (the logits
   of a step's response tokens, the quantization temporaries of transformers' threaded weight
   loading) pile up in heaps instead of going back: +300 MB after loading, +600 MB over 15
   steps. A fixed threshold sends every allocation above it to its own mapping, unmapped when
   it is freed. The threshold must stay above a step's activations, though: a fresh mapping is
   zero-filled page by page on first touch, and at 1 MiB the 1.5 MB MLP activations of a
   512-token row took 227k page faults a step (75k at 4 MiB, the logits' share; an
   out-of-place add on them ran 2.2x slower).
2. transformers reads safetensors through mmap, and bf16 weights that need no conversion
   (embeddings, norms) stay views of the mapped file: every page of the file that loading read
   stays resident (269 MB for SmolLM2, to keep 57 MB of weights). A private copy of those lets
   the mapping go.

Both are Linux (glibc) facts; elsewhere these functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # glibc's mallopt parameter numbers
# Above this, an allocation is its own mapping: logits and loading temporaries go back to the
# OS when freed; a 512-token row's activations (up to 2048 wide in fp32: 4 MiB) stay in the heap.
MMAP_THRESHOLD = 4 << 20
# Setting the mmap threshold fixes the trim threshold too (default 128 KiB): the heap would
# give back its top on every free and fault it in again on the next step. Keep 32 MiB of it.
TRIM_THRESHOLD = 32 << 20

def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:  # musl or no libc by that name
        return None


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds so freed large tensors go back to the OS; True if set."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def mapped_file_ranges(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of files ending in `suffix`."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(suffix):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def copy_mapped_weights(model: torch.nn.Module) -> int:
    """Give every CPU parameter and buffer still inside a mapped weights file its own memory.

    Tied parameters stay tied (one copy per shared tensor). Returns the number of tensors copied.
    """
    ranges = mapped_file_ranges()
    if not ranges:
        return 0

    def mapped(t) -> bool:
        ptr = t.untyped_storage().data_ptr() if t.device.type == "cpu" else 0
        return any(lo <= ptr < hi for lo, hi in ranges)

    copied = 0
    buffers: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for t in module._parameters.values():
            if t is not None and mapped(t):  # in place: tied parameters are one object, copied once
                t.data = t.data.clone()
                copied += 1
        for name, t in module._buffers.items():
            if t is not None and (id(t) in buffers or mapped(t)):
                if id(t) not in buffers:
                    buffers[id(t)] = t.clone()
                    copied += 1
                module._buffers[name] = buffers[id(t)]
    return copied
