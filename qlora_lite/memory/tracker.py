"""Measuring memory: a device-agnostic tracker of live tensor storage, by category.

The tracker is a TorchDispatchMode: every op's output storage is recorded with its size
and freed through a weakref on the storage (torch keeps one Python object per storage,
so the weakref dies exactly when the memory does). Categories are decided from what a
storage turned out to be over its life:

- base_weights / lora_params: storages registered beforehand (parameters, buffers, bnb
  quantization constants);
- gradients: storages that became a parameter's `.grad`;
- optimizer_state: storages found in `optimizer.state` after a step;
- activations: storages saved for backward (a saved_tensors_hooks pack) or made in the
  forward pass and still alive when backward starts (checkpoint boundaries, logits);
- temporaries: everything else (recomputed layers, dequantized weights, loss buffers).

The peak is the maximum over time of total live bytes; `breakdown()` splits the storages
alive at that moment. Storages made inside `model.offload.host_copies()` (the offloaded activation
checkpoints) are host memory: counted apart, with their own peak, never in
the device total, so that on the CPU a run is measured the way a GPU would hold it. torch's own MemTracker is not used: it fails on frozen parameters.
It sees what ops return, not scratch memory an op frees before returning, so an
allocator's peak (CUDA) is a little higher; `measure.py` reports both.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..model.offload import making_host_copies
from ..model.quant import quant_state_tensors

CATEGORIES = ("base_weights", "lora_params", "gradients", "optimizer_state", "activations", "temporaries")
LABELS = {
    "base_weights": "base weights (+ quant constants)",
    "lora_params": "LoRA parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations saved for backward",
    "temporaries": "temporaries",
}
# What `profile` measures and `estimate` predicts, one column each.
MODES = ("qlora", "lora", "full")

# Lower number wins: a parameter saved for backward is still a parameter.
_PRIORITY = {c: i for i, c in enumerate(CATEGORIES)}


@dataclass
class MemoryBreakdown:
    """Live bytes per category at the peak moment.

    Args:
        bytes (dict[str, int]): category -> bytes, keys as in CATEGORIES.
        total (int): sum of `bytes`, the tracker's peak.
        phase (str): the phase the peak happened in ("forward", "backward", "optimizer", ...).
        step (int): the step the peak happened in (0-based).
        host (int): host bytes (offloaded activations) alive at that moment. Default 0.
        host_peak (int): the most host bytes alive at any moment. Default 0.
    """

    bytes: dict = field(default_factory=lambda: {c: 0 for c in CATEGORIES})
    total: int = 0
    phase: str = ""
    step: int = 0
    host: int = 0
    host_peak: int = 0

    def to_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "total": self.total, "phase": self.phase, "step": self.step,
                "host": self.host, "host_peak": self.host_peak}


def module_tensors(model: torch.nn.Module, lora_params=()) -> dict[str, list[torch.Tensor]]:
    """Split a model's parameters and buffers into base_weights and lora_params.

    Args:
        model (nn.Module): the model.
        lora_params (iterable[Tensor]): the adapter parameters; all other parameters,
            buffers and bnb quantization constants count as base weights.
    """
    lora_ids = {id(p) for p in lora_params}
    out = {"base_weights": [], "lora_params": []}
    for p in model.parameters():
        if id(p) in lora_ids:
            out["lora_params"].append(p)
        else:
            out["base_weights"].append(p)
            out["base_weights"] += quant_state_tensors(p)
    out["base_weights"] += list(model.buffers())
    return out


class MemoryTracker(TorchDispatchMode):
    """Track live tensor storage and its peak, by category (see the module docstring).

    Use as a context manager around training steps; call `register` for existing
    tensors first, `watch_optimizer` once, and `set_phase` as the step proceeds.

    Args:
        params (dict[str, list[Tensor]] | None): category -> tensors that already exist
            (as from `module_tensors`). Default None.
    """

    def __init__(self, params: dict | None = None):
        super().__init__()
        self._serial_of = {}  # id(storage) -> serial, for live storages
        self._live = {}  # serial -> nbytes
        self._marks = {}  # serial -> category (strongest seen so far)
        self._born = {}  # serial -> phase it was allocated in, while live
        self._host = {}  # serial -> nbytes, for live host storages (never in _live)
        self.host_total = 0
        self.host_peak = 0
        self._peak_host = 0
        self.total = 0
        self.peak = 0
        self._peak_live = {}
        self._peak_where = ("", 0)
        self.phase = "setup"
        self.step = 0
        self._next = 0
        self._hooks = None
        self._grad_params = weakref.WeakSet()  # held weakly: the tracker must not keep a model alive
        for cat, tensors in (params or {}).items():
            self.register(tensors, cat)

    # ------------------------------------------------------------ bookkeeping

    def _track(self, t: torch.Tensor) -> int | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        # A DTensor (FSDP's shards) is a wrapper without storage: its memory is its local shard.
        t = getattr(t, "_local_tensor", t)
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = id(st)
        serial = self._serial_of.get(key)
        if serial is None:
            if nbytes == 0:
                return None
            serial = self._next
            self._next += 1
            self._serial_of[key] = serial
            # The finalizer holds the tracker weakly: a tracker must never keep a mode's tensors
            # (or itself) alive through the global finalizer registry.
            weakref.finalize(st, _free_weakly, weakref.ref(self), key, serial)
            if making_host_copies():
                self._host[serial] = nbytes
                self.host_total += nbytes
                self.host_peak = max(self.host_peak, self.host_total)
                return serial
            self._live[serial] = nbytes
            self._born[serial] = self.phase
            self.total += nbytes
        elif serial in self._host:
            return serial
        elif self._live[serial] != nbytes:  # resized in place (out= ops)
            self.total += nbytes - self._live[serial]
            self._live[serial] = nbytes
        self._note_peak()
        return serial

    def _storage_resized(self, storage) -> None:
        """A tracked storage changed size outside any op: FSDP frees a layer's gathered weights
        with UntypedStorage.resize_(0) after use and re-grows them for the next gather."""
        serial = self._serial_of.get(id(storage))
        if serial is not None:
            self.total += storage.nbytes() - self._live[serial]
            self._live[serial] = storage.nbytes()
            self._note_peak()

    def _note_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self._peak_live = dict(self._live)
            self._peak_where = (self.phase, self.step)
            self._peak_host = self.host_total

    def _free(self, key: int, serial: int) -> None:
        if self._serial_of.get(key) == serial:
            del self._serial_of[key]
        self.total -= self._live.pop(serial, 0)
        self.host_total -= self._host.pop(serial, 0)
        self._born.pop(serial, None)

    def _mark(self, t, category: str) -> None:
        serial = self._track(t)
        if serial is None or serial in self._host:
            return
        old = self._marks.get(serial)
        if old is None or _PRIORITY[category] < _PRIORITY[old]:
            self._marks[serial] = category

    def register(self, tensors, category: str) -> None:
        """Record existing tensors (parameters, buffers, quant constants) under `category`."""
        if category not in _PRIORITY:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        for t in tensors:
            self._mark(t, category)
            if category in ("base_weights", "lora_params") and getattr(t, "requires_grad", False):
                self._watch_grad(t)

    def _watch_grad(self, p: torch.Tensor) -> None:
        if isinstance(p, torch.nn.Parameter) and p.is_leaf:
            self._grad_params.add(p)
            me = weakref.ref(self)

            def mark_grad(q):
                if me() is not None:  # hooks outlive a finished tracker
                    me()._mark(q.grad, "gradients")

            p.register_post_accumulate_grad_hook(mark_grad)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark the optimizer's state tensors (bnb paged buffers included) after each step."""

        me = weakref.ref(self)

        def post(opt, *_):
            if me() is None:
                return
            for state in opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        me()._mark(v, "optimizer_state")

        optimizer.register_step_post_hook(post)

    def set_phase(self, phase: str, step: int | None = None) -> None:
        """Name the part of the step that follows; entering "backward" turns the forward
        pass's surviving storages into activations."""
        if phase == "backward":
            for serial, born in self._born.items():
                if born == "forward" and serial not in self._marks:
                    self._marks[serial] = "activations"
        self.phase = phase
        if step is not None:
            self.step = step

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = self.total
        self._peak_live = dict(self._live)
        self._peak_where = (self.phase, self.step)
        self._peak_host = self.host_peak = self.host_total

    # ------------------------------------------------------------ results

    def _split(self, live: dict) -> dict:
        out = {c: 0 for c in CATEGORIES}
        for serial, nbytes in live.items():
            out[self._marks.get(serial, "temporaries")] += nbytes
        return out

    def breakdown(self) -> MemoryBreakdown:
        """Bytes per category of the storages alive at the peak."""
        b = self._split(self._peak_live)
        return MemoryBreakdown(bytes=b, total=sum(b.values()), phase=self._peak_where[0], step=self._peak_where[1],
                               host=self._peak_host, host_peak=self.host_peak)

    def current(self) -> MemoryBreakdown:
        """Bytes per category alive now."""
        for p in self._grad_params:  # grads assigned outside backward (e.g. by hand)
            if p.grad is not None:
                self._mark(p.grad, "gradients")
        b = self._split(self._live)
        return MemoryBreakdown(bytes=b, total=sum(b.values()), phase=self.phase, step=self.step,
                               host=self.host_total, host_peak=self.host_peak)

    # ------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _pack(self, t):
        self._mark(t, "activations")
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._resize = torch.UntypedStorage.resize_
        me, resize = weakref.ref(self), self._resize

        def resize_(storage, size):
            out = resize(storage, size)
            if me() is not None:
                me()._storage_resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # storage resizes bypass dispatch; see _storage_resized
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.UntypedStorage.resize_ = self._resize
            self._hooks.__exit__(*exc)
            self._hooks = None


def _free_weakly(tracker_ref, key: int, serial: int) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker._free(key, serial)
