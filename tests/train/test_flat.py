"""train/flat.py: adapters stepped as flat buffers update, save and load exactly as per tensor."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.recipe import OPTIMIZERS
from qlora_lite.train.flat import OPT8_BLOCK, buffer_numels
from qlora_lite.train.optim import build_optimizer, optimizer_classes, optimizer_params

# >= 4096 elements (8-bit state), one of them not a multiple of 256; and small ones (32-bit state).
SHAPES = [(16, 300), (300, 16), (8, 64), (64, 8), (16, 520), (5, 7)]


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in SHAPES]


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).bfloat16() for s in SHAPES]


def per_tensor(name, params):
    return optimizer_classes()[name](params, lr=1e-2, weight_decay=0.01)


def step(opt, params, gs):
    for p, g in zip(params, gs):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # a flat optimizer's gradients are views: written in place, as autograd does
    opt.step()
    opt.zero_grad(set_to_none=True)


def assert_same_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys()
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, dict):  # bitsandbytes' wrapped quantization state
                assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
            else:
                assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (i, key)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flat_buffers_step_every_tensor_exactly_as_the_per_tensor_optimizer(name):
    flat_params, plain_params = tensors(), tensors()
    flat, plain = build_optimizer(name, flat_params, 1e-2, 0.01), per_tensor(name, plain_params)
    assert len(optimizer_params(flat)) <= 2 < len(SHAPES)  # an 8-bit buffer and a 32-bit one at most
    for k in range(3):
        step(flat, flat_params, grads(k))
        step(plain, plain_params, grads(k))
        assert all(torch.equal(a, b) for a, b in zip(flat_params, plain_params)), (name, k)
    assert_same_state(flat.state_dict(), plain.state_dict())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_per_tensor_checkpoint_loads_into_flat_buffers_and_training_continues_identically(name):
    plain_params = tensors()
    plain = per_tensor(name, plain_params)
    for k in range(2):
        step(plain, plain_params, grads(k))
    saved = plain.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    flat = build_optimizer(name, resumed, 1e-2, 0.01)
    flat.load_state_dict(saved)
    assert_same_state(flat.state_dict(), saved)
    for k in range(2, 4):
        step(flat, resumed, grads(k))
        step(plain, plain_params, grads(k))
    assert all(torch.equal(a, b) for a, b in zip(resumed, plain_params))


def test_parameters_and_gradients_are_views_and_a_replaced_gradient_is_not_lost():
    params = tensors()
    opt = build_optimizer("paged_adamw_8bit", params, 1e-2, 0.01)
    buffers = {p.untyped_storage().data_ptr() for p in params}
    assert len(buffers) == len(optimizer_params(opt))  # every tensor lives in a buffer
    big = next(b for b in opt.flat if not b.fp32_state)
    assert all(s.start % OPT8_BLOCK == 0 for s in big.slots)  # no 8-bit block straddles two tensors
    assert buffer_numels([p.numel() for p in params], eight_bit=True) == {
        b.fp32_state: b.param.numel() for b in opt.flat}  # what the estimate counts
    plain_params = tensors()
    plain = per_tensor("paged_adamw_8bit", plain_params)
    params[0].grad = None  # code that clears a gradient, then sets a new one
    params[0].grad = grads(0)[0].clone()
    for p, g in zip(params[1:], grads(0)[1:]):
        p.grad.copy_(g)
    opt.step()
    step(plain, plain_params, grads(0))
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert params[0].grad.untyped_storage().data_ptr() == big.param.grad.untyped_storage().data_ptr()
