"""The quantized base + LoRA layer, checked against bitsandbytes and peft."""

from __future__ import annotations

import hashlib

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from conftest import ARCHS
from safetensors.torch import load_file

from qlora_lite.errors import QloraError
from qlora_lite.lora.layer import (
    LoRALinear,
    attach_lora,
    count_parameters,
    expected_lora_params,
    lora_modules,
    lora_parameters,
    merged_weight,
    trainable_summary,
)
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import LoraConfig, ModelConfig, QuantizationConfig


def qlora_model(path, gc=False, bits=4, lora=LoraConfig(r=8, alpha=16, dropout=0.0)):
    m = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=gc, quantization=QuantizationConfig(bits=bits)))
    torch.manual_seed(0)
    attach_lora(m, lora)
    return m


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def tokens(n=12, vocab=320, seed=0):
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_head_is_nf4_and_frozen(tiny_dirs, arch):
    m = load_model(ModelConfig(name_or_path=tiny_dirs[arch]))
    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1
    for n, mod in linears:
        if n == "lm_head":
            assert not isinstance(mod, bnb.nn.Linear4bit) and mod.weight.dtype == torch.bfloat16
        else:
            assert isinstance(mod, bnb.nn.Linear4bit), n
            qs = mod.weight.quant_state
            assert (qs.quant_type, qs.blocksize, qs.nested, qs.dtype) == ("nf4", 64, True, torch.bfloat16)
    assert m.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in m.parameters())


def test_quantized_bytes_equal_bitsandbytes_quantize_4bit(tiny_llama):
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    raw = load_file(f"{tiny_llama}/model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = raw[f"{name}.weight"].to(torch.bfloat16)
        ref, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.uint8)
        ours = m.get_submodule(name).weight
        assert torch.equal(ours.data, ref), name
        qs = ours.quant_state
        assert torch.equal(qs.absmax, ref_state.absmax)
        assert torch.equal(qs.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(qs.code, ref_state.code)
        assert qs.offset.item() == ref_state.offset.item()


def test_lora_layer_shapes_init_and_formula():
    base = torch.nn.Linear(48, 80, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.weight.shape == (4, 48) and layer.lora_B.weight.shape == (80, 4)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scale == 2.0 and LoRALinear(base, r=4, alpha=8, rslora=True).scale == 4.0
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))  # B = 0: starts as the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    want = x.float() @ merged_weight(base.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scale).T
    torch.testing.assert_close(layer(x).float(), want, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_is_r_times_din_plus_dout(tiny_dirs, arch):
    m = qlora_model(tiny_dirs[arch])
    # hidden 64, kv dim 32, mlp 128; per layer q,o: 64+64; k,v: 64+32; gate,up,down: 64+128.
    per_layer = 8 * (2 * 128 + 2 * 96 + 3 * 192)
    n, total = count_parameters(m)
    assert n == expected_lora_params(m) == 2 * per_layer
    assert sum(p.numel() for p in lora_parameters(m)) == n
    base_params = 320 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 64 * 5
    bias = sum(mod.bias.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.bias is not None)
    assert total == n + base_params + bias
    assert trainable_summary(m) == f"trainable {n:,} of {total:,} ({100 * n / total:.2f}%)"


def test_target_list_and_unknown_target_error(tiny_llama):
    m = load_model(ModelConfig(name_or_path=tiny_llama))
    adapted = attach_lora(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    m2 = load_model(ModelConfig(name_or_path=tiny_llama))
    with pytest.raises(QloraError) as e:
        attach_lora(m2, LoraConfig(r=4, target_modules=["q_proj", "query"]))
    msg = str(e.value)
    assert "'query'" in msg and "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in msg
    assert "lm_head" not in msg


def peft_model(path, lora: LoraConfig):
    """The reference: transformers 4-bit model + peft LoRA, adapters cast to bf16 like ours."""
    import peft
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loader import bnb_config, disable_cpu_weight_packing

    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig()),
                                                device_map="cpu", dtype=torch.bfloat16)
    disable_cpu_weight_packing(base)  # both sides on bitsandbytes' training kernel
    pm = peft.get_peft_model(base, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    return pm


def copy_ours_into_peft(ours, pm):
    sd = pm.state_dict()
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            for ab in ("lora_A", "lora_B"):
                sd[f"base_model.model.{name}.{ab}.default.weight"].copy_(getattr(m, ab).weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_peft_on_4bit_model(tiny_dirs, arch):
    lora = LoraConfig(r=8, alpha=16, dropout=0.0)
    ours = qlora_model(tiny_dirs[arch], lora=lora)
    randomize_b(ours)
    pm = peft_model(tiny_dirs[arch], lora)
    copy_ours_into_peft(ours, pm)
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).logits.float(), pm(input_ids=x).logits.float()
    # peft runs the adapter in fp32 (it upcasts adapter weights), we run it in bf16:
    # a few bf16 ulps of the logits' scale is the expected gap.
    diff = (a - b).abs().max().item()
    assert diff < 2e-2 * a.abs().max().item(), diff
    with pm.disable_adapter(), torch.no_grad():
        assert (pm(input_ids=x).logits.float() - a).abs().max() > 10 * diff  # the adapter matters


def test_one_step_changes_only_lora_and_base_bytes_hash_same(tiny_llama):
    m = qlora_model(tiny_llama, gc=True)
    randomize_b(m)  # with B = 0, A gets no gradient on the first step

    def base_hash():
        h = hashlib.sha256()
        for n, p in m.named_parameters():
            if not p.requires_grad:
                h.update(n.encode()); h.update(p.data.contiguous().view(torch.uint8).numpy().tobytes())
        for n, b in m.named_buffers():
            h.update(b.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    before = base_hash()
    lora_before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = bnb.optim.PagedAdamW8bit(lora_parameters(m), lr=1e-2)
    x = tokens()
    loss = m(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    assert base_hash() == before
    changed = [n for n, p in m.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in changed)
    assert len(changed) == len(lora_before)


def test_gradient_checkpointing_gives_same_lora_grads(tiny_llama):
    grads = []
    for gc in (False, True):
        m = qlora_model(tiny_llama, gc=gc)
        randomize_b(m)
        m.train()
        x = tokens()
        m(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0, msg=n)


def test_gradient_checkpointing_emits_no_warnings(tiny_llama, recwarn):
    m = qlora_model(tiny_llama, gc=True)
    m.train()
    x = tokens()
    m(input_ids=x, labels=x).loss.backward()
    msgs = [str(w.message) for w in recwarn if "requires_grad" in str(w.message) or "checkpoint" in str(w.message)]
    assert not msgs


def test_bf16_lora_mode_wraps_plain_linear(tiny_llama):
    m = qlora_model(tiny_llama, bits=16)
    layer = m.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, LoRALinear) and type(layer.base) is torch.nn.Linear
    assert layer.base.weight.dtype == torch.bfloat16


def test_lora_dropout_on_cpu_drops_p_and_rescales_like_nn_dropout():
    from qlora_lite.lora.layer import LoRADropout

    d = LoRADropout(0.05).train()
    x = torch.ones(2_000_000, dtype=torch.bfloat16, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 1e-3  # binomial sd is 1.5e-4
    assert torch.equal(y[y != 0].unique(), torch.nn.Dropout(0.05).train()(torch.ones(100, dtype=torch.bfloat16)).max()[None])
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # grad = mask / (1 - p)
    torch.manual_seed(3)
    a = d(x[:1000])
    torch.manual_seed(3)
    assert torch.equal(a, d(x[:1000]))  # the recompute under checkpointing sees the same mask
    assert torch.equal(d.eval()(x), x)


def test_eval_forward_does_not_repack_the_trained_weights(tiny_llama):
    """bitsandbytes repacks 4-bit weights on a CPU eval forward (AVX512-BF16 machines), after
    which backward gives wrong grads; load_model must keep the trained layout."""
    m = qlora_model(tiny_llama)
    randomize_b(m)
    layer = m.get_submodule("model.layers.0.self_attn.q_proj").base
    before = layer.weight.data.clone()
    x = tokens()
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    m.eval()
    with torch.no_grad():
        m(input_ids=x)
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    assert torch.equal(layer.weight.data, before)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, g0[n]), n


def test_with_fp32_adapters_our_logits_equal_peft_exactly(tiny_llama):
    """peft keeps adapters in fp32 by default; given fp32 adapters we compute bit for bit what it
    computes, so the bf16-tolerance gap above is the adapter dtype alone, not the math."""
    lora = LoraConfig(r=8, alpha=16, dropout=0.0)
    ours = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False))
    attach_lora(ours, lora, dtype=torch.float32)
    randomize_b(ours)
    pm = peft_model(tiny_llama, lora)
    copy_ours_into_peft(ours, pm)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, pm(input_ids=x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("alpha,dropout", [(16, 0.0), (10, 0.0), (16, 0.1), (10, 0.1)])
def test_scale_on_the_rank_side_is_peft_formula(alpha, dropout):
    """LoRALinear multiplies the r-wide activations by alpha/r (and dropout's 1/(1-p)); PEFT
    multiplies B's d_out-wide output. Same mask, fp32: equal to rounding; alpha/r = 2: exact."""
    from qlora_lite.lora.layer import LoRADropout

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 96, bias=False), r=8, alpha=alpha, dropout=dropout,
                       dtype=torch.float32).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 33, 64)
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)
    kept = layer.dropout.drop(x) if dropout else x  # the same mask, drawn from the same seed
    peft_formula = layer.base(x) + layer.lora_B(layer.lora_A(kept / (1 - dropout))) * layer.scale
    if alpha == 16 and not dropout:
        assert torch.equal(ours, peft_formula)
    torch.testing.assert_close(ours, peft_formula, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.dropout, LoRADropout if dropout else torch.nn.Identity)
    torch.testing.assert_close(layer.eval()(x), layer.base(x) + layer.lora_B(layer.lora_A(x)) * layer.scale,
                               rtol=1e-5, atol=1e-5)  # eval: no dropout, no 1/(1-p)


def test_dropout_masks_in_bf16_are_exact_zeros_and_ones():
    from qlora_lite.lora.layer import LoRADropout

    x = torch.randn(1000, 77, dtype=torch.bfloat16)
    y = LoRADropout(0.3).train().drop(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept]) and abs(1 - kept.float().mean().item() - 0.3) < 0.01


def test_kept_dequantized_weights_give_bnbs_gradients_with_a_third_fewer_dequantizations(tmp_path):
    """Under checkpointing on CPU each NF4 weight is dequantized twice a step, not three times
    (quant.keeps_dequantized_weights), and loss and adapter gradients are bit for bit bnb's."""
    from conftest import build_tiny

    from qlora_lite.lora.layer import keep_dequantized_weights

    model = load_model(ModelConfig(name_or_path=build_tiny(tmp_path / "m"), gradient_checkpointing=True))
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    assert all(m.keep_dequantized for m in lora_modules(model).values())  # CPU + checkpointing: on
    for m in lora_modules(model).values():  # a nonzero B, so the adapters' input gradients matter too
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.train()
    ids = torch.randint(3, 320, (2, 24))

    def step(keep: bool):
        keep_dequantized_weights(model, "cpu" if keep else "cuda", gradient_checkpointing=True)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        calls = sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_4bit")
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls

    loss_bnb, grads_bnb, calls_bnb = step(keep=False)
    loss_kept, grads_kept, calls_kept = step(keep=True)
    assert all(m.keep_dequantized for m in lora_modules(model).values())
    n_weights = len(lora_modules(model))
    assert (calls_bnb, calls_kept) == (3 * n_weights, 2 * n_weights)
    assert torch.equal(loss_bnb, loss_kept)
    for name in grads_bnb:
        assert torch.equal(grads_bnb[name], grads_kept[name]), name
    # Without checkpointing nothing is kept: the copies would pile up over every layer.
    keep_dequantized_weights(model, "cpu", gradient_checkpointing=False)
    assert not any(m.keep_dequantized for m in lora_modules(model).values())
