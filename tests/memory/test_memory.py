"""MemoryTracker on hand-computable cases: exact bytes per category."""

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_lite.memory.estimate_inputs import nf4_bytes
from qlora_lite.memory.tracker import MemoryTracker, module_tensors

B, D_IN, D_OUT = 8, 64, 32
PARAM_BYTES = (D_OUT * D_IN + D_OUT) * 4  # fp32 weight + bias


def _linear_run():
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    # foreach=False: the single-tensor Adam keeps no multi-tensor scratch between ops.
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, foreach=False)
    tracker = MemoryTracker(module_tensors(lin))
    tracker.watch_optimizer(opt)
    seen = {}
    with tracker:
        for step in range(2):
            tracker.set_phase("forward", step)
            x = torch.randn(B, D_IN)
            loss = lin(x).sum()
            tracker.set_phase("backward")
            seen[f"fwd{step}"] = tracker.current().bytes
            loss.backward()
            del loss, x
            seen[f"bwd{step}"] = tracker.current().bytes
            tracker.set_phase("optimizer")
            opt.step()
            seen[f"opt{step}"] = tracker.current().bytes
            opt.zero_grad(set_to_none=True)
            seen[f"end{step}"] = tracker.current().bytes
    return tracker, seen


def test_linear_adam_exact_bytes():
    tracker, seen = _linear_run()
    # Forward: the input is saved for the weight gradient; the scalar loss survives too.
    assert seen["fwd0"] == {"base_weights": PARAM_BYTES, "lora_params": 0, "gradients": 0, "optimizer_state": 0,
                            "activations": B * D_IN * 4 + 4, "temporaries": 0}
    # Backward frees the saved input and leaves one gradient per parameter.
    assert seen["bwd0"]["gradients"] == PARAM_BYTES
    assert seen["bwd0"]["activations"] == 0 and seen["bwd0"]["temporaries"] == 0
    # Adam: exp_avg + exp_avg_sq per parameter plus a fp32 step scalar per tensor.
    assert seen["opt0"]["optimizer_state"] == 2 * PARAM_BYTES + 2 * 4
    assert seen["end1"]["gradients"] == 0 and seen["end1"]["optimizer_state"] == 2 * PARAM_BYTES + 8
    peak = tracker.breakdown()
    assert peak.total == sum(peak.bytes.values()) == tracker.peak
    assert peak.total >= sum(seen["opt1"].values())


def test_lora_and_4bit_base_categories():
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(D_IN, D_OUT, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(D_OUT, D_IN, dtype=torch.bfloat16), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    base = base.to("cpu")  # quantizes
    a = nn.Linear(D_IN, 4, bias=False, dtype=torch.bfloat16)
    model = nn.ModuleDict({"base": base, "a": a})
    tracker = MemoryTracker(module_tensors(model, [a.weight]))
    with tracker:
        tracker.set_phase("forward")
        x = torch.randn(B, D_IN, dtype=torch.bfloat16)
        loss = (model["base"](x).sum() + model["a"](x).sum()).float()
        tracker.set_phase("backward")
        loss.backward()
        now = tracker.current().bytes
    # Packed 4-bit weight + absmax + nested absmax and codes: the estimate's formula.
    assert now["base_weights"] == nf4_bytes(D_OUT * D_IN)
    assert now["lora_params"] == now["gradients"] == 4 * D_IN * 2


def test_freed_storage_leaves_the_total():
    tracker = MemoryTracker()
    with tracker:
        t = torch.empty(1000, dtype=torch.float32)
        view = t[10:]
        assert tracker.total == 4000
        del t
        assert tracker.total == 4000  # the view keeps the storage alive
        del view
        assert tracker.total == 0
    assert tracker.peak == 4000


def test_a_finished_tracker_neither_keeps_a_model_alive_nor_breaks_its_next_backward():
    import gc
    import weakref

    lin = torch.nn.Linear(8, 8)
    for _ in range(2):  # the first tracker's hooks are still on the weights when the second one runs
        tracker = MemoryTracker({"lora_params": list(lin.parameters())})
        with tracker:
            lin(torch.randn(2, 8)).sum().backward()
        assert tracker.current().bytes["gradients"] > 0
        del tracker
        gc.collect()
    ref = weakref.ref(lin.weight)
    del lin
    gc.collect()
    assert ref() is None
