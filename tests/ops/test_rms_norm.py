"""ops/rms_norm.py: transformers' RMSNorm forward bit for bit, its gradient, less saved, and kept in place."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_lite.memory.tracker import MemoryTracker
from qlora_lite.model.loader import load_model
from qlora_lite.ops.rms_norm import RMSNormFunction, use_rms_norm_function
from qlora_lite.recipe import ModelConfig


def norm(width=96):
    torch.manual_seed(0)
    m = LlamaRMSNorm(width, eps=1e-5).bfloat16()
    with torch.no_grad():
        m.weight.copy_(torch.rand(width) + 0.5)
    return m.requires_grad_(False)


def test_the_forward_is_transformers_bit_for_bit_and_the_gradient_agrees():
    m = norm()
    x = (torch.randn(3, 40, 96) * 4).bfloat16().requires_grad_()
    g = torch.randn(3, 40, 96).bfloat16()
    want = m(x)
    (want_grad,) = torch.autograd.grad(want, x, g)
    got = RMSNormFunction.apply(x, m.weight, m.variance_epsilon)
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want)
    # fp32 arithmetic in another order, one rounding to bf16 at the end: a bf16 unit at most
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=8e-3, atol=8e-3)
    x64 = x.detach().double().requires_grad_()
    ref = m.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    (exact,) = torch.autograd.grad(ref, x64, g.double())
    assert (got_grad.double() - exact).norm() <= (want_grad.double() - exact).norm() * 1.05


def test_it_keeps_the_input_and_one_rsqrt_a_token_not_an_fp32_copy():
    saved = {}
    for name in ("transformers", "function"):
        m = norm(128)
        if name == "function":
            use_rms_norm_function(torch.nn.ModuleList([m]))
        x0 = torch.randn(512, 128, dtype=torch.bfloat16, requires_grad=True)
        tracker = MemoryTracker()
        with tracker:
            x = x0 * 1.0
            y = m(x)
            del x
            saved[name] = tracker.current().total / 512
        del y
    assert saved["transformers"] - saved["function"] == pytest.approx(2 * 128, abs=1)  # 4h fp32 copy -> 2h input


def test_a_loaded_model_keeps_it_through_model_train(tiny_llama):
    """transformers re-kernelizes at model.train() where the kernels package is installed; the
    loader turns that off, so the replaced forwards stay."""
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    m.train()
    m.eval()
    m.train()
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    assert type(m.model.layers[0].input_layernorm(x).grad_fn).__name__ == "RMSNormFunctionBackward"
