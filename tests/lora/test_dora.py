"""DoRA on the 4-bit base (QDoRA), checked against PEFT's DoRA on a transformers 4-bit model."""

from __future__ import annotations

import pytest
import torch
from test_lora import tokens

from qlora_lite.lora.files import load_adapter, save_adapter
from qlora_lite.lora.layer import attach_lora, count_parameters, expected_lora_params, lora_modules, lora_parameters
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import LoraConfig, ModelConfig

DORA = LoraConfig(r=8, alpha=16, dropout=0.0, use_dora=True, dtype="float32")


def dora_model(path, lora=DORA, gc=False, dtype=torch.float32):
    m = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=gc))
    torch.manual_seed(0)
    attach_lora(m, lora, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 and m != ||W0||, so every DoRA term matters
        for mod in lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)
            mod.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(mod.lora_magnitude_vector.shape, generator=g))
    return m


def bnb_base(path):
    """A transformers 4-bit model, as PEFT users load it."""
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loader import bnb_config, disable_cpu_weight_packing
    from qlora_lite.recipe import QuantizationConfig

    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig()),
                                                device_map="cpu", dtype=torch.bfloat16)
    disable_cpu_weight_packing(base)  # both sides on bitsandbytes' training kernel
    return base


def peft_dora(path, lora=DORA):
    """The reference: transformers 4-bit model + PEFT DoRA (fp32 adapters, PEFT's default)."""
    import peft

    return peft.get_peft_model(bnb_base(path), peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                               target_modules="all-linear", use_dora=True,
                                                               task_type="CAUSAL_LM"))


def copy_into_peft(ours, pm):
    sd = pm.state_dict()
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            for ab in ("lora_A", "lora_B"):
                sd[f"base_model.model.{name}.{ab}.default.weight"].copy_(getattr(m, ab).weight)
            sd[f"base_model.model.{name}.lora_magnitude_vector.default.weight"].copy_(m.lora_magnitude_vector)


def test_magnitude_starts_at_the_row_norms_of_the_dequantized_weight(tiny_llama):
    m = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False))
    attach_lora(m, DORA, dtype=torch.float32)
    pm = peft_dora(tiny_llama)
    sd = pm.state_dict()
    for name, mod in lora_modules(m).items():
        assert torch.equal(mod.lora_magnitude_vector, sd[f"base_model.model.{name}.lora_magnitude_vector.default.weight"])
    trainable, _ = count_parameters(m)
    assert trainable == expected_lora_params(m) == sum(p.numel() for p in lora_parameters(m))


def test_with_fp32_adapters_our_dora_logits_equal_peft_exactly(tiny_llama):
    ours = dora_model(tiny_llama)
    pm = peft_dora(tiny_llama)
    copy_into_peft(ours, pm)
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).logits, pm(input_ids=x).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        with pm.disable_adapter():
            assert (pm(input_ids=x).logits - a).abs().max() > 1e-2  # DoRA changes the output


def test_gradients_equal_peft(tiny_llama):
    ours = dora_model(tiny_llama)
    pm = peft_dora(tiny_llama)
    copy_into_peft(ours, pm)
    ours.train(), pm.train()
    x = tokens()
    ours(input_ids=x, labels=x).loss.backward()
    pm(input_ids=x, labels=x).loss.backward()
    params = dict(pm.named_parameters())
    for name, m in lora_modules(ours).items():
        for ours_p, key in ((m.lora_A.weight, "lora_A.default.weight"), (m.lora_B.weight, "lora_B.default.weight"),
                            (m.lora_magnitude_vector, "lora_magnitude_vector.default.weight")):
            ref = params[f"base_model.model.{name}.{key}"].grad
            assert ours_p.grad is not None and ref.abs().max() > 0
            torch.testing.assert_close(ours_p.grad, ref, atol=0, rtol=0, msg=f"{name}.{key}")


def test_adapter_files_load_both_ways_with_peft(tiny_llama, tmp_path):
    import peft
    from safetensors.torch import load_file

    ours = dora_model(tiny_llama)
    save_adapter(ours, tmp_path / "ours", DORA, tiny_llama)
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(lora_modules(ours))
    # ours -> PEFT
    x = tokens()
    loaded = peft.PeftModel.from_pretrained(bnb_base(tiny_llama), tmp_path / "ours")
    with torch.no_grad():
        want = ours(x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=0, rtol=0)
    # PEFT -> ours
    pm2 = peft_dora(tiny_llama)
    copy_into_peft(ours, pm2)
    pm2.save_pretrained(tmp_path / "peft")
    back = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False))
    cfg = load_adapter(back, tmp_path / "peft", dtype=torch.float32)
    assert cfg.use_dora
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=0, rtol=0)


def test_export_merges_dora_exactly_as_peft_on_the_dequantized_base(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from qlora_lite.export.merge import export_model
    from qlora_lite.lora.dora import base_weight
    from qlora_lite.recipe import DataConfig, Recipe, save_recipe

    ours = dora_model(tiny_llama)
    save_recipe(Recipe(model=ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False), lora=DORA,
                       data=DataConfig(path="data.jsonl")), tmp_path / "run" / "recipe.yaml")
    save_adapter(ours, tmp_path / "run" / "adapter", DORA, tiny_llama)
    export_model(tmp_path / "run", tmp_path / "out", dtype="bf16", log=lambda m: None)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    pm = peft_dora(tiny_llama)
    copy_into_peft(ours, pm)
    for name in lora_modules(ours):
        layer = pm.base_model.model.get_submodule(name)
        # PEFT's 4-bit merge: merge_safe on the dequantized weight, before it re-quantizes the result.
        with torch.no_grad():
            want = layer.lora_variant["default"].merge_safe(layer, "default", base_weight(layer.base_layer))
        assert want.dtype == torch.bfloat16
        assert torch.equal(merged[f"{name}.weight"], want), name


def test_gradient_checkpointing_gives_the_same_dora_grads(tiny_llama):
    grads = []
    for gc in (False, True):
        m = dora_model(tiny_llama, gc=gc)
        m.train()
        x = tokens()
        m(input_ids=x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in lora_parameters(m)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_training_with_packing_checkpointing_and_resume_keeps_dora(tmp_path):
    """`run` with use_dora, packing, gradient checkpointing and dropout: the magnitudes train, are
    saved in the adapter and checkpoints, and a resumed run continues with them."""
    import json

    from safetensors.torch import load_file

    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.loop import train

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(64, seed=1)))

    def recipe(steps):
        return recipe_from_dict({
            "model": {"name_or_path": "qlora-lite:tiny-llama", "gradient_checkpointing": True},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "use_dora": True, "dtype": "float32"},
            "data": {"path": str(data), "format": "alpaca", "max_seq_len": 128, "packing": True, "eval_split": 0.1},
            "train": {"max_steps": steps, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0, "log_every": 1,
                      "eval_every": 0, "eval_max_batches": 1, "save_every": 2, "optimizer": "adamw"},
            "output": {"dir": str(tmp_path / "run")}})

    train(recipe(2))
    first = load_file(str(tmp_path / "run/checkpoints/step-2/adapter/adapter_model.safetensors"))
    summary = train(recipe(3), resume=True)
    assert summary["steps"] == 3
    cfg = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    final = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    mags = [k for k in final if k.endswith(".lora_magnitude_vector")]
    assert cfg["use_dora"] is True and len(mags) == 7 * 4  # every linear of the 4-layer tiny Llama
    changed = [k for k in mags if not torch.equal(final[k], first[k])]
    assert len(changed) == len(mags)  # step 3 trained them further
