"""PEFT-format adapter files: ours load in peft, peft's load in ours, mismatches are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import peft_model, qlora_model, randomize_b, tokens

from qlora_lite.errors import QloraError
from qlora_lite.lora.files import load_adapter, save_adapter
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import LoraConfig, ModelConfig

LORA = LoraConfig(r=8, alpha=16, dropout=0.0)


def test_ours_saved_loads_in_peft_with_same_logits(tiny_llama, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loader import bnb_config
    from qlora_lite.recipe import QuantizationConfig

    ours = qlora_model(tiny_llama, lora=LORA)
    randomize_b(ours)
    size = save_adapter(ours, tmp_path / "a", LORA, tiny_llama)
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["task_type"] == "CAUSAL_LM"
    keys = load_file(tmp_path / "a/adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    assert size == (tmp_path / "a/adapter_model.safetensors").stat().st_size
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=bnb_config(QuantizationConfig()),
                                                device_map="cpu", dtype=torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a")
    pm.to(torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).logits.float(), pm(input_ids=x).logits.float()
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()


def test_peft_saved_loads_in_ours_with_same_logits(tiny_llama, tmp_path):
    pm = peft_model(tiny_llama, LORA)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "p")
    ours = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False))
    cfg = load_adapter(ours, tmp_path / "p")
    assert cfg.r == 8 and cfg.alpha == 16
    pm.to(torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).logits.float(), pm(input_ids=x).logits.float()
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()


def test_mismatched_adapter_names_module_and_shapes(tiny_llama, tmp_path):
    m = qlora_model(tiny_llama, lora=LORA)
    save_adapter(m, tmp_path / "a", LORA, tiny_llama)
    # An adapter whose up_proj was trained for a 96-wide MLP.
    t = load_file(tmp_path / "a/adapter_model.safetensors")
    t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(96, 8)
    save_file(t, tmp_path / "a/adapter_model.safetensors")
    fresh = load_model(ModelConfig(name_or_path=tiny_llama))
    with pytest.raises(QloraError) as e:
        load_adapter(fresh, tmp_path / "a")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and "(96, 8)" in msg and "(128, 8)" in msg


def test_adapter_for_missing_module_is_named(tiny_llama, tmp_path):
    m = qlora_model(tiny_llama, lora=LORA)
    save_adapter(m, tmp_path / "a", LORA, tiny_llama)
    t = load_file(tmp_path / "a/adapter_model.safetensors")
    t["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    t["base_model.model.model.layers.7.mlp.up_proj.lora_B.weight"] = torch.zeros(128, 8)
    save_file(t, tmp_path / "a/adapter_model.safetensors")
    with pytest.raises(QloraError, match=r"model\.layers\.7\.mlp\.up_proj"):
        load_adapter(load_model(ModelConfig(name_or_path=tiny_llama)), tmp_path / "a")


def test_missing_adapter_files_are_named(tmp_path, tiny_llama):
    with pytest.raises(QloraError, match="adapter_config.json"):
        load_adapter(load_model(ModelConfig(name_or_path=tiny_llama)), tmp_path)
