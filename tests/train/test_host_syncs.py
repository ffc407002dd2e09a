"""No host sync in the hot loop: a packed training step's forward and backward read nothing back.

On CUDA a value read back to the host (`.item()`, a boolean-mask index, `.tolist()`) waits for
every queued kernel. The CPU runs the same code, so the profiler's ops, and a function mode for
the Python-level reads it cannot see on a CPU tensor, show where CUDA would wait.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from qlora_lite.data.batching import collate
from qlora_lite.lora.layer import attach_lora, lora_parameters
from qlora_lite.model.loader import load_model
from qlora_lite.ops.attention import use_packed_attention
from qlora_lite.recipe import LoraConfig, ModelConfig
from qlora_lite.train.optim import build_optimizer
from qlora_lite.train.step import train_step

# The aten ops that read a device value back to the host (or size an output by one).
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
            "aten::masked_select", "aten::_unique2", "aten::unique_consecutive"}
# Tensor methods that copy to the host; on a CPU tensor the profiler records no op for them.
SYNC_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"}


class HostReads(TorchFunctionMode):
    """Records the Tensor methods of SYNC_METHODS called while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class Phases:
    """train_step's phase hook: a profiler range per phase; HostReads from the first forward to
    the optimizer."""

    def __init__(self):
        self.range, self.reads, self.reading = None, HostReads(), False
        self.optimizer_reads = HostReads()

    def __call__(self, name: str) -> None:
        self.close()
        if name == "forward" and not self.reading:
            self.reads.__enter__()
            self.reading = True
        if name == "optimizer":
            self.stop_reading()
            self.optimizer_reads.__enter__()
        self.range = torch.profiler.record_function(f"phase:{name}")
        self.range.__enter__()

    def stop_reading(self) -> None:
        if self.reading:
            self.reads.__exit__(None, None, None)
            self.reading = False

    def close(self) -> None:
        if self.optimizer_reads in torch.overrides._get_current_function_mode_stack():
            self.optimizer_reads.__exit__(None, None, None)
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None


def sample(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]}


def test_a_packed_training_step_reads_nothing_back_before_the_optimizer(tiny_llama):
    model = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=True))
    attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    use_packed_attention(model)
    params = lora_parameters(model)
    optimizer = build_optimizer("adamw", params, 1e-3, 0.0)
    batch = collate([[sample(20, 0), sample(33, 1), sample(9, 2)], [sample(40, 3), sample(15, 4)]], 0,
                    packed_mask="position_ids")
    phases = Phases()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(model.train(), [batch], params, optimizer, device="cpu", max_grad_norm=1.0,
                   loss_chunk_size=16, phase=phases)
        phases.close()
        phases.stop_reading()
    events = prof.events()
    ranges = {e.name: e.time_range for e in events if e.name.startswith("phase:")}
    assert set(ranges) == {"phase:forward", "phase:backward", "phase:optimizer"}
    hot = (ranges["phase:forward"].start, ranges["phase:optimizer"].start)
    syncs = [e.name for e in events if e.name in SYNC_OPS and hot[0] <= e.time_range.start < hot[1]]
    assert syncs == []
    assert phases.reads.seen == []
    # One read of the step's results, after the backward passes: loss and gradient norm together.
    # (torch's AdamW then reads its step counts with .item(): host tensors, no device sync.)
    reads = phases.optimizer_reads.seen
    assert reads[0] == "tolist" and reads.count("tolist") == 1 and set(reads) <= {"tolist", "item"}, reads
