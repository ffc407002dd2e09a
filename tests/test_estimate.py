"""estimate.py: exact persistent bytes, and predicted peaks within 10% of the measured ones."""

import json

import pytest
import torch
import transformers

from qlora_lite.errors import QloraError
from qlora_lite.estimate import (MODES, Settings, estimate, estimate_mode, gpu_mem_bytes, load_arch, nf4_bytes,
                                 settings_from_recipe)
from qlora_lite.profile import measure_mode
from qlora_lite.recipe import recipe_from_dict

TOLERANCE = 0.10

# (name, architecture, recipe knobs): different widths, GQA ratios, vocabularies, loss paths,
# optimizers, dropout and accumulation, so each term of the estimate is exercised.
CASES = [
    ("llama-h64-v2000", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=2000),
     dict(r=8, dropout=0.05, optimizer="paged_adamw_8bit", loss_chunk_size=0, grad_accum=16)),
    ("llama-h128-i352", "llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=500),
     dict(r=16, dropout=0.0, optimizer="adamw", loss_chunk_size=16, grad_accum=16)),
    ("qwen2-h96-mqa", "qwen2", dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=3, num_key_value_heads=1, vocab_size=1000),
     dict(r=8, dropout=0.05, optimizer="adamw_8bit", loss_chunk_size=1024, grad_accum=1)),
]
SEQ_LENS = (32, 96)


def _build(path, arch, dims):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model_cls(cfg_cls(max_position_embeddings=512, **dims)).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate-models")
    return {name: _build(root / name, arch, dims) for name, arch, dims, _ in CASES}


def _recipe(path, knobs, lora_dtype="bfloat16"):
    return recipe_from_dict({
        "model": {"name_or_path": path},
        "lora": {"r": knobs["r"], "alpha": 2 * knobs["r"], "dropout": knobs["dropout"], "dtype": lora_dtype},
        "train": {k: knobs[k] for k in ("optimizer", "loss_chunk_size", "grad_accum")},
    })


def _settings(seq_len, knobs):
    return Settings(seq_len=seq_len, batch_size=1, lora_r=knobs["r"], lora_dropout=knobs["dropout"],
                    optimizer=knobs["optimizer"], loss_chunk_size=knobs["loss_chunk_size"],
                    grad_accum=knobs["grad_accum"], device="cpu")


def test_estimate_matches_measured_peaks(models):
    worst, rows = 0.0, []
    for name, _, _, knobs in CASES:
        arch = load_arch(models[name])
        recipe = _recipe(models[name], knobs)
        for seq_len in SEQ_LENS:
            for mode in MODES:
                measured = measure_mode(recipe, mode, steps=2, seq_len=seq_len)["peak"]
                predicted = estimate_mode(arch, _settings(seq_len, knobs), mode)
                # Weights, adapters and optimizer state are counted exactly.
                for c in ("base_weights", "lora_params", "optimizer_state"):
                    assert predicted["bytes"][c] == measured["bytes"][c], (name, seq_len, mode, c)
                err = predicted["total"] / measured["total"] - 1
                rows.append(f"{name} seq {seq_len} {mode}: measured {measured['total']} predicted "
                            f"{predicted['total']} ({err:+.1%})")
                worst = max(worst, abs(err))
    print("\n".join(rows) + f"\nworst |error| {worst:.1%}")
    assert worst <= TOLERANCE, "\n".join(rows)


@pytest.mark.parametrize("case", [0, 1])
def test_fp32_adapters_are_estimated_as_measured(models, case):
    """lora.dtype float32: 4-byte adapters and gradients (torch AdamW state too), as profile measures."""
    name, _, _, knobs = CASES[case]
    recipe = _recipe(models[name], knobs, lora_dtype="float32")
    s = settings_from_recipe(recipe, seq_len=96, device="cpu")
    assert s == Settings(**{**_settings(96, knobs).__dict__, "lora_dtype": "float32"})
    arch = load_arch(models[name])
    bf16 = estimate_mode(arch, _settings(96, knobs), "qlora")["bytes"]
    for mode in ("qlora", "lora"):
        measured = measure_mode(recipe, mode, steps=2, seq_len=96)["peak"]
        predicted = estimate_mode(arch, s, mode)
        for c in ("base_weights", "lora_params", "optimizer_state"):
            assert predicted["bytes"][c] == measured["bytes"][c], (name, mode, c)
        assert abs(predicted["total"] / measured["total"] - 1) <= TOLERANCE
    fp32 = estimate_mode(arch, s, "qlora")["bytes"]
    assert fp32["lora_params"] == 2 * bf16["lora_params"] and fp32["gradients"] == 2 * bf16["gradients"]


def test_nf4_is_about_4_127_bits_per_parameter():
    n = 4096 * 11008
    assert nf4_bytes(n) * 8 / n == pytest.approx(4.127, abs=0.001)


def test_llama_2_7b_prediction():
    result = estimate("llama-2-7b", Settings(seq_len=2048), gpu_mem=gpu_mem_bytes("24GiB"))
    q, full = result["modes"]["qlora"], result["modes"]["full"]
    assert result["arch"]["hidden_size"] == 4096
    assert 3.4e9 < q["bytes"]["base_weights"] < 3.9e9  # 6.7B parameters, mostly at 4.127 bits
    assert q["fits"] and not full["fits"]
    assert full["total"] > 75 * 2**30  # 12 bytes per parameter
    assert q["max_seq_len"] >= 2048 and q["max_batch_size"] >= 1
    json.dumps(result)


def test_load_arch_inputs(tmp_path, models):
    for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b", "qwen2.5-7b"):
        assert load_arch(name).num_hidden_layers > 0
    folder = models[CASES[0][0]]
    assert load_arch(folder).vocab_size == load_arch(f"{folder}/config.json").vocab_size == 2000
    with pytest.raises(QloraError, match="not a config.json"):
        load_arch(str(tmp_path / "missing"))
    assert gpu_mem_bytes("24GiB") == 24 * 2**30 and gpu_mem_bytes("24GB") == 24 * 10**9
    with pytest.raises(QloraError, match="--gpu-mem"):
        gpu_mem_bytes("lots")
    with pytest.raises(QloraError, match="give a unit"):
        gpu_mem_bytes("24")
