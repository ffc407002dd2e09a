"""lora.dtype float32 end to end: trained, saved, reloaded (generate, export --verify) and estimated in fp32."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_lite.export.verify as verify_mod
from qlora_lite.data.demo_rows import demo_rows
from qlora_lite.export.merge import export_model
from qlora_lite.generate import generate_text, load_for_generation
from qlora_lite.lora.files import load_adapter, read_adapter_config
from qlora_lite.lora.layer import lora_parameters
from qlora_lite.memory.estimate import persistent
from qlora_lite.memory.estimate_inputs import load_arch, settings_from_recipe
from qlora_lite.model.loader import resolve_model_path
from qlora_lite.recipe import load_recipe, recipe_from_dict
from qlora_lite.train.loop import train

pytestmark = pytest.mark.slow  # whole training runs: `make test` only, not `make test-fast`


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32-run")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(40, seed=4)))
    recipe = recipe_from_dict({
        # fp32 compute too, so export --verify can tell fp32 adapters from bf16 ones (below).
        "model": {"name_or_path": "qlora-lite:tiny-llama", "quantization": {"compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "dtype": "float32"},
        "data": {"path": str(data), "format": "alpaca", "max_seq_len": 64, "eval_split": 0.0},
        "train": {"seed": 1, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2,
                  "warmup_steps": 0, "eval_every": 0, "save_every": 0},
        "output": {"dir": str(root / "run")},
    })
    train(recipe)
    return root / "run"


def test_the_sidecar_records_the_dtype_and_tensors_are_fp32(fp32_run):
    assert json.loads((fp32_run / "adapter/qlora_lite.json").read_text()) == {"lora_dtype": "float32"}
    assert "qlora_lite" not in json.loads((fp32_run / "adapter/adapter_config.json").read_text())
    tensors = load_file(fp32_run / "adapter/adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items())  # it trained


def test_generate_reloads_fp32_adapters_with_their_exact_values(fp32_run):
    loaded = load_for_generation(str(fp32_run))
    params = lora_parameters(loaded.model)
    assert params and {p.dtype for p in params} == {torch.float32}
    saved = load_file(fp32_run / "adapter/adapter_model.safetensors")
    state = dict(loaded.model.named_parameters())
    for key, t in saved.items():
        assert torch.equal(state[key.removeprefix("base_model.model.")], t)
    assert isinstance(generate_text(loaded.model, loaded.tokenizer, "Name a colour.", max_new_tokens=4), str)


def test_export_verify_compares_against_fp32_adapters(fp32_run, tmp_path, monkeypatch):
    dtypes = []

    def spy(model, adapter_dir, dtype=None):
        cfg = load_adapter(model, adapter_dir, dtype)
        dtypes.extend(p.dtype for p in lora_parameters(model))
        return cfg

    monkeypatch.setattr(verify_mod, "load_adapter", spy)
    info = export_model(fp32_run, tmp_path / "out", dtype="fp32", verify=True, log=lambda m: None)
    assert dtypes and set(dtypes) == {torch.float32}
    v = info["verify"]
    # All fp32: equal up to summation order. Adapters rounded to bf16 would differ by ~1e-2.
    assert v["greedy_agree"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"], v


def test_estimate_reads_fp32_from_the_run_recipe(fp32_run):
    recipe = load_recipe(fp32_run / "recipe.yaml")
    s = settings_from_recipe(recipe, device="cpu")
    assert s.dtype == "float32" and s.r == 8
    arch = load_arch(resolve_model_path(recipe.model.name_or_path))
    saved = load_file(fp32_run / "adapter/adapter_model.safetensors")
    p = persistent(arch, s, "qlora")
    assert p["lora_params"] == p["gradients"] == sum(t.numel() * 4 for t in saved.values())


def test_peft_loads_the_fp32_adapter_without_any_warning(fp32_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("qlora-lite:tiny-llama"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reports unknown adapter_config.json fields as a warning
        peft_model = PeftModel.from_pretrained(base, str(fp32_run / "adapter"))
    saved = load_file(fp32_run / "adapter/adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items()}
    assert all(torch.equal(state[k], t) for k, t in saved.items())


def test_an_adapter_from_before_the_sidecar_still_loads_in_its_recorded_dtype(fp32_run, tmp_path):
    # Older qlora-lite wrote {"qlora_lite": {"lora_dtype": ...}} into adapter_config.json itself.
    old = tmp_path / "old-adapter"
    shutil.copytree(fp32_run / "adapter", old)
    (old / "qlora_lite.json").unlink()
    raw = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps(dict(raw, qlora_lite={"lora_dtype": "bfloat16"})))
    cfg, _ = read_adapter_config(old)
    assert cfg.dtype == "bfloat16"  # the old record, not the fp32 tensors' own dtype
