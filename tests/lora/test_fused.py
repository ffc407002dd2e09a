"""lora/fused.py: the fused LoRA linears against the unfused path, PEFT's formula and fp32."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import ARCHS

from qlora_lite.lora.fused import SharedInput, lora_forward
from qlora_lite.lora.layer import attach_lora, lora_modules, lora_parameters, use_fused
from qlora_lite.model.loader import load_model
from qlora_lite.ops.loss import causal_lm_loss
from qlora_lite.recipe import LoraConfig, ModelConfig, QuantizationConfig


def adapted(path, dtype="bfloat16", gc=True, dropout=0.0, bits=4):
    m = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=gc,
                               quantization=QuantizationConfig(bits=bits, compute_dtype=dtype)))
    attach_lora(m, LoraConfig(r=8, alpha=16, dropout=dropout, dtype=dtype))
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init: give the adapters values so every gradient path is live
        for p in lora_parameters(m):
            p.copy_(torch.randn(p.shape).mul_(0.05).bfloat16())
    return m.train()


def loss_and_grads(model, seed=0):
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(seed))
    for p in lora_parameters(model):
        p.grad = None
    loss, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, 0)
    (loss / n).backward()
    return float(loss / n), [p.grad.double().clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("checkpointing", [True, False])
def test_in_fp32_the_fused_path_computes_the_unfused_loss_and_gradients(tiny_dirs, arch, checkpointing):
    """fp32 compute and adapters: no rounding to hide a wrong formula (Qwen2 adds q/k/v biases)."""
    m = adapted(tiny_dirs[arch], "float32", gc=checkpointing)
    assert sum(mod.shared_input is not None for mod in lora_modules(m).values()) == 2 * 5  # q,k,v + gate,up a layer
    fused = loss_and_grads(m)
    use_fused(m, False)
    plain = loss_and_grads(m)
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 16])
def test_in_bf16_the_fused_path_is_as_close_to_fp32_as_the_unfused_one(tiny_llama, bits):
    """bf16 rounds elsewhere in the fused path (one matmul accumulation adds the adapter to the base
    output); measured against an fp32 model with the same values, it is no further off."""
    ref = loss_and_grads(adapted(tiny_llama, "float32", bits=bits))
    m = adapted(tiny_llama, "bfloat16", bits=bits)
    errors = {}
    for on in (True, False):
        use_fused(m, on)
        loss, grads = loss_and_grads(m)
        errors[on] = (abs(loss - ref[0]), sum(float((g - r).norm() / r.norm()) for g, r in zip(grads, ref[1])))
    assert errors[True][0] <= 2 * errors[False][0] + 1e-3
    assert errors[True][1] <= 1.1 * errors[False][1]


def test_dropout_is_one_mask_per_shared_input_and_the_formula_is_peft_s(tiny_llama):
    m = adapted(tiny_llama, "float32", gc=False, dropout=0.25)
    mods = lora_modules(m)
    q, k, v = (mods[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert q.shared_input is k.shared_input is v.shared_input
    x = torch.randn(2, 5, q.in_features)
    masks = []
    for mod in (q, k, v):
        mod.dropout_mask = lambda t: masks.append((t > 0).float()) or masks[-1]
    outs = [q(x), k(x), v(x)]
    assert len(masks) == 1  # one mask drawn for the three
    xd = x * masks[0]
    for mod, out in zip((q, k, v), outs):
        want = mod.base(x) + mod.lora_B(mod.lora_A(xd)) * (mod.scale / 0.75)  # PEFT: B(A(dropout(x))) * scale
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_member_called_on_another_input_gets_its_output_for_that_input_and_nothing_is_held(tiny_llama):
    m = adapted(tiny_llama, "float32", gc=False)
    mods = lora_modules(m)
    q, k, v = (mods[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    group: SharedInput = q.shared_input
    x, other = torch.randn(1, 3, q.in_features), torch.randn(1, 3, q.in_features)
    q(x)
    assert len(group._pending) == 2  # k's and v's outputs wait for their calls
    torch.testing.assert_close(k(other), lora_forward([k], other, None)[0])  # not x's output
    torch.testing.assert_close(v(other), lora_forward([v], other, None)[0])
    q(other)  # the last of the three taken: nothing waits, nothing is referenced
    assert not group._pending and group._input is None
    k(x)
    held = group._input
    del x
    gc.collect()
    assert len(group._pending) == 2 and held() is not None  # x lives on in the waiting outputs' graph
    group._pending.clear()
    gc.collect()
    assert held() is None  # the group itself holds the input only weakly


def test_dora_and_fp32_adapters_on_a_bf16_base_take_the_unfused_path(tiny_llama):
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    attach_lora(m, LoraConfig(r=4, alpha=8, use_dora=True))
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    assert all(not mod.fusable(x) for mod in lora_modules(m).values())
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    attach_lora(m, LoraConfig(r=4, alpha=8, dtype="float32"))
    assert all(not mod.fusable(x) for mod in lora_modules(m).values())
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    attach_lora(m, LoraConfig(r=4, alpha=8))
    assert all(mod.fusable(x) for mod in lora_modules(m).values())


def test_under_checkpointing_each_nf4_weight_is_dequantized_twice_a_step_and_the_first_input_needs_no_gradient(
        tiny_llama, monkeypatch):
    """Forward and recompute dequantize, the backward reuses the recompute's weight (CPU rule); the
    first layer's q/k/v input (embeddings through a frozen norm) needs no gradient."""
    from qlora_lite.lora import fused

    m = adapted(tiny_llama, "bfloat16", gc=True)
    calls = []
    real = fused.dequantize_4bit
    monkeypatch.setattr(fused, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    loss_and_grads(m)
    assert len(calls) == 2 * len(lora_modules(m))
