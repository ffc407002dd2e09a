"""step.train_step: one optimizer step as run, profile and measure_7b execute it; the precision decision."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.errors import QloraError
from qlora_lite.lora.layer import attach_lora, lora_parameters
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import LoraConfig, ModelConfig, QuantizationConfig
from qlora_lite.train.optim import build_optimizer
from qlora_lite.train.step import NonFiniteLoss, grad_scaler, train_step


def adapted(path):
    model = load_model(ModelConfig(name_or_path=path))
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32)
    return model.train()


def batch(seed, n=12):
    ids = torch.randint(3, 320, (2, n), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : n // 2] = -100
    return {"input_ids": ids, "labels": labels}


def test_the_loss_of_a_step_is_normalised_over_all_its_micro_batches(tiny_llama):
    # Two micro-batches of 2 rows accumulate to the gradient of one batch of 4 rows.
    a, b = batch(1), batch(2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    results, phases = [], []
    for batches in ([a, b], [both]):
        model = adapted(tiny_llama)
        params = lora_parameters(model)
        opt = torch.optim.SGD(params, lr=1.0)
        r = train_step(model, batches, params, opt, device="cpu", max_grad_norm=0.0, loss_chunk_size=0,
                       phase=phases.append)
        assert r.trained == 4 * 6  # per row the last 6 of 12 tokens carry labels
        results.append((r.loss, r.grad_norm, torch.cat([p.detach().flatten() for p in params])))
    (loss_a, norm_a, w_a), (loss_b, norm_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    torch.testing.assert_close(w_a, w_b, rtol=1e-4, atol=1e-6)
    assert phases[:5] == ["forward", "backward", "forward", "backward", "optimizer"]


def test_a_non_finite_loss_raises_before_the_optimizer_step(tiny_llama):
    model = adapted(tiny_llama)
    params = lora_parameters(model)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")
    bad = batch(3)
    bad["input_ids"][0, 0] = 5
    opt = build_optimizer("adamw", params, 1e-2, 0.0)
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        train_step(model, [bad], params, opt, device="cpu", max_grad_norm=1.0, loss_chunk_size=0)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    # No NaN gradient is left for the next step: none at all, or zeroed flat buffers.
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_fp16_compute_needs_fp32_adapters_and_gets_a_grad_scaler():
    assert grad_scaler("bfloat16", "bfloat16", "cpu") is None
    assert grad_scaler("float32", "float32", "cpu") is None
    with pytest.raises(QloraError, match="lora.dtype: float32"):
        grad_scaler("float16", "bfloat16", "cpu")
    scaler = grad_scaler("float16", "float32", "cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_fp16_training_steps_with_a_scaler_lower_the_loss(tiny_llama):
    model = load_model(ModelConfig(name_or_path=tiny_llama, quantization=QuantizationConfig(compute_dtype="float16")))
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32)
    params = lora_parameters(model)
    opt = build_optimizer("adamw", params, 1e-2, 0.0)
    scaler = grad_scaler("float16", "float32", "cpu")
    losses = [train_step(model.train(), [batch(4)], params, opt, device="cpu", max_grad_norm=1.0, loss_chunk_size=0,
                         scaler=scaler).loss for _ in range(5)]
    assert all(p.dtype == torch.float32 for p in params)
    assert losses[-1] < losses[0]
    assert scaler.get_scale() > 0


def test_every_optimizer_name_a_recipe_accepts_is_built_and_the_full_baseline_keeps_fp32_state():
    import bitsandbytes as bnb

    from qlora_lite.recipe import OPTIMIZERS
    from qlora_lite.train.optim import optimizer_classes

    assert tuple(optimizer_classes()) == OPTIMIZERS
    p = [torch.nn.Parameter(torch.zeros(8, 8))]
    for name in OPTIMIZERS:
        assert isinstance(build_optimizer(name, p, 1e-3, 0.0), optimizer_classes()[name])
    assert type(build_optimizer("paged_adamw_8bit", p, 1e-3, 0.0, full_precision=True)) is bnb.optim.PagedAdamW32bit
    assert type(build_optimizer("adamw", p, 1e-3, 0.0, full_precision=True)) is bnb.optim.AdamW32bit
