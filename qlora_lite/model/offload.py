"""Offloaded activation checkpoints: each decoder layer's checkpointed input waits in host memory.

Under non-reentrant gradient checkpointing the only tensor a decoder layer keeps from its
forward pass is its input (B x L x d; cos/sin and masks stay in the checkpoint's closure).
At long context those inputs are what grows with the layer count: 8 KiB per token per layer
for Llama-3-8B, 31 GiB at 128k tokens over 32 layers. `offload_checkpoints` moves each of them
to host memory as the forward pass makes it and brings it back when backward recomputes that
layer, prefetching the layer below so the copy overlaps the compute.

The copy is a `saved_tensors_hooks` pair around `torch.utils.checkpoint`: the checkpoint
saves its inputs with whatever hooks are active outside it, and everything inside the layer
goes through the checkpoint's own hooks, so exactly the layer inputs are offloaded.

On CUDA the host copy is pinned and both copies run on a side stream: the forward copy waits
for the compute stream (events), `record_stream` keeps the allocator from reusing the device
block before the copy has read it, and backward waits for the prefetch's event before use.
On CPU the same code runs with a plain host clone and no streams, and the clone is made
inside `host_copies()`, which memory.tracker reads to count it as host bytes.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import QloraError

# > 0 while this module makes a host copy: a measuring tool (memory.tracker) counts the storages
# made then as host memory. The technique says what its copies are; it never imports the tracker.
_host_copy_depth = 0


@contextlib.contextmanager
def host_copies():
    """Storages made inside are host copies of device tensors (offloaded checkpoints)."""
    global _host_copy_depth
    _host_copy_depth += 1
    try:
        yield
    finally:
        _host_copy_depth -= 1


def making_host_copies() -> bool:
    """Whether a host copy is being made now (see host_copies)."""
    return _host_copy_depth > 0


class Copier:
    """Host <-> device copies: on CUDA pinned memory on a side stream, on CPU plain clones.

    Args:
        device (torch.device): the device the activations live on.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Start copying `t` to host memory; `t` may be dropped right after."""
        with host_copies():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            return host.copy_(t)
        # The side stream must see `t` finished; the allocator must not hand `t`'s block to
        # anyone else until the side stream has read it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)
        return host

    def to_device(self, host: torch.Tensor):
        """Start copying `host` back; returns (device tensor, event to wait for or None)."""
        if self.stream is None:
            return host.clone(), None
        compute = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, whose pool it returns to; written on the side stream
        # once the compute stream's earlier users of that block are done.
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            dev.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        dev.record_stream(self.stream)
        return dev, ready

    def wait(self, ready) -> None:
        """Make the compute stream wait for a `to_device` copy."""
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)


class Offloaded:
    """One packed layer input: its host copy, and its device copy once prefetched."""

    __slots__ = ("host", "prev", "dev", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, prev):
        self.host = host
        self.prev = prev  # weakref to the layer below's Offloaded, the next one backward needs
        self.dev = None
        self.ready = None


class Offloader:
    """The pack/unpack pair for checkpointed layer inputs, with a prefetch of the layer below.

    Args:
        copier (Copier): how copies are made on this device.
    """

    def __init__(self, copier: Copier):
        self.copier = copier
        self.last = None  # weakref to the newest Offloaded of the current forward pass

    def new_pass(self, *_args, **_kwargs) -> None:
        """A forward pass starts: its first layer has no layer below to prefetch."""
        self.last = None

    def pack(self, t: torch.Tensor):
        if t.requires_grad and t.grad_fn is None:
            return t  # a leaf autograd holds anyway: a host copy would free nothing
        item = Offloaded(self.copier.to_host(t), self.last)
        self.last = weakref.ref(item)
        return item

    def fetch(self, item: Offloaded) -> None:
        if item.dev is None:
            if item.host is None:
                raise QloraError("An offloaded activation checkpoint was unpacked after it was freed; "
                                 "backward through a model with model.offload_activations runs once per "
                                 "forward (no retain_graph).")
            item.dev, item.ready = self.copier.to_device(item.host)

    def unpack(self, item) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        self.fetch(item)
        below = item.prev() if item.prev is not None else None
        if below is not None:
            self.fetch(below)  # overlaps this layer's recompute and backward
        self.copier.wait(item.ready)
        dev, item.dev, item.ready = item.dev, None, None
        return dev

    def checkpoint(self, function, *args, **kwargs):
        """`torch.utils.checkpoint.checkpoint` whose saved inputs wait in host memory."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, **kwargs)


def offload_checkpoints(model) -> Offloader:
    """Offload the checkpointed input of every decoder layer of `model` (checkpointing on).

    Args:
        model: a transformers causal LM after `model.enable_gradient_checkpointing`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise QloraError("model.offload_activations needs gradient checkpointing on decoder layers; set "
                         "model.gradient_checkpointing: true (or offload_activations: false).")
    # transformers makes the embedding output a leaf that requires grad (for reentrant
    # checkpointing); autograd would then hold the first layer's input and give it a .grad.
    # Non-reentrant checkpointing reaches the adapters without it.
    model.disable_input_require_grads()
    device = next(model.parameters()).device
    offloader = Offloader(Copier(device))
    for layer in layers:
        kwargs = getattr(layer._gradient_checkpointing_func, "keywords", {})
        layer._gradient_checkpointing_func = functools.partial(offloader.checkpoint, **kwargs)
    model.get_decoder().register_forward_pre_hook(offloader.new_pass)
    return offloader
