"""estimate.py: exact persistent bytes, and predicted peaks within 10% of the measured ones."""

import contextlib
import json

import pytest
import torch
import transformers

from qlora_lite.errors import QloraError
from qlora_lite.memory.estimate import MODES, estimate, estimate_mode, gpu_mem_bytes
from qlora_lite.memory.estimate_inputs import Settings, load_arch, nf4_bytes, settings_from_recipe
from qlora_lite.memory.measure import measure_mode
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
    return Settings(max_seq_len=seq_len, micro_batch_size=1, r=knobs["r"], dropout=knobs["dropout"],
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
    s = settings_from_recipe(recipe, max_seq_len=96, device="cpu")
    assert s == Settings(**{**_settings(96, knobs).__dict__, "dtype": "float32"})
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
    result = estimate("llama-2-7b", Settings(max_seq_len=2048), gpu_mem=gpu_mem_bytes("24GiB"))
    q, full = result["modes"]["qlora"], result["modes"]["full"]
    assert result["arch"]["hidden_size"] == 4096
    assert 3.4e9 < q["bytes"]["base_weights"] < 3.9e9  # 6.7B parameters, mostly at 4.127 bits
    assert q["fits"] and not full["fits"]
    assert full["total"] > 75 * 2**30  # 12 bytes per parameter
    assert q["max_seq_len"] >= 2048 and q["max_micro_batch_size"] >= 1
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


def test_estimate_counts_dora_and_matches_the_measured_peak(tmp_path):
    """estimate --dora: magnitudes exactly, the peak within test_estimate's 10% of `profile`'s measurement."""
    from dataclasses import replace

    from qlora_lite.memory.estimate import estimate_mode
    from qlora_lite.memory.estimate_inputs import load_arch
    from qlora_lite.memory.measure import measure_mode
    from qlora_lite.recipe import recipe_from_dict

    rows, worst = [], 0.0
    for name, arch_name, dims, knobs in CASES[:2]:
        path = _build(tmp_path / name, arch_name, dims)
        arch = load_arch(path)
        recipe = recipe_from_dict({
            "model": {"name_or_path": path},
            "lora": {"r": knobs["r"], "alpha": 2 * knobs["r"], "dropout": knobs["dropout"], "use_dora": True},
            "train": {k: knobs[k] for k in ("optimizer", "loss_chunk_size", "grad_accum")}})
        for mode in ("qlora", "lora"):
            measured = measure_mode(recipe, mode, steps=2, seq_len=64)["peak"]
            lora_only = estimate_mode(arch, _settings(64, knobs), mode)
            predicted = estimate_mode(arch, replace(_settings(64, knobs), use_dora=True), mode)
            for c in ("base_weights", "lora_params", "optimizer_state"):
                assert predicted["bytes"][c] == measured["bytes"][c], (name, mode, c)
            assert predicted["bytes"]["lora_params"] > lora_only["bytes"]["lora_params"]
            err = predicted["total"] / measured["total"] - 1
            rows.append(f"{name} {mode}: measured {measured['total']} predicted {predicted['total']} ({err:+.1%})")
            worst = max(worst, abs(err))
    assert worst <= TOLERANCE, "\n".join(rows)


def test_the_estimate_command_takes_recipe_names_and_its_old_flags_alike(tmp_path):
    """`estimate --set lora.r=64` and the 0.1 flag `--lora-r 64` give one result, shown under the
    recipe's names; a recipe file gives its own settings; a bad value gets the recipe's error."""
    from click.testing import CliRunner

    from qlora_lite.cli import main

    def run(*args):
        r = CliRunner().invoke(main, ["estimate", *args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    new = run("llama-2-7b", "--max-seq-len", "1024", "--set", "lora.r=64", "--set", "lora.use_dora=true",
              "--set", "train.distributed=fsdp", "--nproc", "2")
    old = run("llama-2-7b", "--seq-len", "1024", "--lora-r", "64", "--dora", "--strategy", "fsdp", "--gpus", "2")
    assert new == old
    s = new["settings"]
    assert s["lora.r"] == 64 and s["data.max_seq_len"] == 1024 and s["lora.use_dora"] is True
    assert s["train.optimizer"] == "adamw" and s["nproc"] == 2  # FSDP's only optimizer when none is chosen
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: llama-2-7b}\nlora: {r: 8}\ndata: {path: x.jsonl, max_seq_len: 300}\n")
    from_file = run("--recipe", str(recipe))
    assert from_file["model"] == "llama-2-7b" and from_file["settings"]["lora.r"] == 8
    assert from_file["settings"]["data.max_seq_len"] == 300
    bad = CliRunner().invoke(main, ["estimate", "llama-2-7b", "--set", "lora.rr=8"])
    assert bad.exit_code == 2 and "Did you mean `r`?" in bad.output


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_pairs_are_estimated_as_measured(models, objective):
    """A pair is two sequences: DPO (with its reference pass in the step) and ORPO within the SFT
    tolerance of `profile`'s measurement, and above SFT's peak at the same length."""
    from dataclasses import replace

    name, _, _, knobs = CASES[1]
    recipe = _recipe(models[name], knobs)
    recipe.train.objective = objective
    arch = load_arch(models[name])
    for mode in ("qlora", "lora"):
        measured = measure_mode(recipe, mode, steps=2, seq_len=96)["peak"]
        predicted = estimate_mode(arch, replace(_settings(96, knobs), objective=objective), mode)
        sft = estimate_mode(arch, _settings(96, knobs), mode)
        for c in ("base_weights", "lora_params", "optimizer_state"):
            assert predicted["bytes"][c] == measured["bytes"][c] == sft["bytes"][c], (mode, c)
        assert abs(predicted["total"] / measured["total"] - 1) <= TOLERANCE, (mode, predicted["total"], measured)
        assert predicted["bytes"]["activations"] > sft["bytes"]["activations"]
    with pytest.raises(QloraError, match="second copy") if objective == "dpo" else contextlib.nullcontext():
        measure_mode(recipe, "full", steps=1, seq_len=32)
