"""Export: merged weights checked against bitsandbytes + our own formula and against peft's merge."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes.functional as F
import pytest
import torch
from click.testing import CliRunner
from conftest import LORA, build_tiny, make_run
from safetensors import safe_open
from safetensors.torch import load_file

import qlora_lite.export.merge as export_mod
from qlora_lite.cli import main
from qlora_lite.errors import QloraError
from qlora_lite.export.merge import export_model, plan_shards
from qlora_lite.export.verify import verify_report
from qlora_lite.lora.files import save_adapter
from qlora_lite.lora.layer import attach_lora, lora_modules
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import DataConfig, LoraConfig, ModelConfig, QuantizationConfig, Recipe, save_recipe


def read_export(folder) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """The weight training saw, computed here independently: bf16 -> NF4 (double quant) -> bf16."""
    q, state = F.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4",
                               quant_storage=torch.uint8)
    return F.dequantize_4bit(q, state)


def adapter_tensors(run) -> dict[str, dict[str, torch.Tensor]]:
    raw = load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))
    out: dict = {}
    for k, v in raw.items():
        mod, ab = k[len("base_model.model."):].rsplit(".", 2)[0:2]
        out.setdefault(mod, {})[ab] = v
    return out


@pytest.fixture(scope="module")
def run_llama(tiny_llama, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run-llama"), tiny_llama)


@pytest.fixture(scope="module")
def export_fp32(run_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "fp32"
    export_model(run_llama, out, dtype="fp32", log=lambda m: None)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases are copied, not merged
def test_merged_weight_is_dequantized_nf4_plus_scaled_BA(tiny_dirs, tmp_path, arch):
    run = make_run(tmp_path / "run", tiny_dirs[arch])
    export_model(run, tmp_path / "out", dtype="fp32", log=lambda m: None)
    got = read_export(tmp_path / "out")
    orig = load_file(f"{tiny_dirs[arch]}/model.safetensors")
    ad = adapter_tensors(run)
    assert set(got) == set(orig)
    assert len(ad) == 14
    for key, w in orig.items():
        mod = key.removesuffix(".weight")
        if mod in ad:
            want = nf4_roundtrip(w).float() + 2.0 * (ad[mod]["lora_B"].float() @ ad[mod]["lora_A"].float())
            # Same fp32 operations in the same order: equal up to fp32 rounding of the matmul.
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(got[key], nf4_roundtrip(w).float())  # the delta is really there
        else:
            assert torch.equal(got[key], w.float()), key  # embeddings, norms, lm_head, biases: copied


def test_bare_adapter_folder_gives_the_same_export(run_llama, export_fp32, tmp_path):
    export_model(Path(run_llama) / "adapter", tmp_path / "out", dtype="fp32", log=lambda m: None)
    a, b = read_export(export_fp32), read_export(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_weights_as_peft_merge_and_unload(run_llama, export_fp32, tiny_llama):
    """peft as the reference: its merge of our adapter into the fp32 dequantized base."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(nf4_roundtrip(m.weight).float())
    merged = peft.PeftModel.from_pretrained(base, str(Path(run_llama) / "adapter")).merge_and_unload()
    ref = merged.state_dict()
    got = read_export(export_fp32)
    assert set(got) <= set(ref)
    for k, v in got.items():
        # peft scales B @ A before adding, we scale after the matmul: fp32 rounding apart.
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6, msg=k)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def test_fp32_export_matches_fp32_qlora_forward_near_exactly(tiny_llama, tmp_path):
    """With compute in fp32 on both sides the export must equal base + adapter up to summation order."""
    from transformers import AutoModelForCausalLM

    from qlora_lite.lora.files import load_adapter

    run = make_run(tmp_path / "run", tiny_llama, compute_dtype="float32")
    export_model(run, tmp_path / "out", dtype="fp32", log=lambda m: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ref = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False,
                                 quantization=QuantizationConfig(compute_dtype="float32")))
    load_adapter(ref, Path(run) / "adapter", dtype=torch.float32)
    a, b = logits(exported, IDS), logits(ref, IDS)
    # x @ (W + sBA)^T vs x @ W^T + s (x A^T) B^T: ~1e-6 relative per layer through 2 layers.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("dtype,tie", [("bf16", False), ("fp32", True), ("bf16", True)])
def test_export_loads_with_plain_transformers(tmp_path, dtype, tie):
    """Plain from_pretrained works, dtype/config are right, tied embeddings stay tied, logits match."""
    from transformers import AutoModelForCausalLM

    base = build_tiny(tmp_path / "base", tie=tie)
    run = make_run(tmp_path / "run", base)
    export_model(run, tmp_path / "out", dtype=dtype, log=lambda m: None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    assert cfg["tie_word_embeddings"] is tie
    assert (tmp_path / "out" / "generation_config.json").is_file() and (tmp_path / "out" / "EXPORT.md").is_file()
    keys = set(read_export(tmp_path / "out"))
    assert ("lm_head.weight" in keys) is (not tie)  # tied: written once, as Hugging Face does
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if tie:
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    from qlora_lite.lora.files import load_adapter

    ref = load_model(ModelConfig(name_or_path=base, gradient_checkpointing=False))
    load_adapter(ref, Path(run) / "adapter")
    a, b = logits(exported, IDS), logits(ref, IDS)
    # The reference is the training forward: bf16 compute, bf16 adapter path. Each layer then
    # rounds activations to bf16 (8 bits of mantissa, ~0.4% relative); a bf16 export also rounds
    # the merged weights. Over 2 layers that stays within 3% of the logit scale; far below the
    # adapter's own effect, which the last assert checks is real.
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() < 0.03 * scale
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert (logits(plain, IDS) - b).abs().max().item() > 0.1 * scale


def test_crash_mid_export_leaves_nothing(run_llama, tmp_path, monkeypatch):
    real, calls = export_mod.write_shard, []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real(tensors, path)

    monkeypatch.setattr(export_mod, "write_shard", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(run_llama, tmp_path / "out", max_shard_size="100KB", log=lambda m: None)
    assert len(calls) == 2 and calls[0].parent.name.endswith(".tmp")  # the first shard was written
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder remains


def test_mismatched_base_is_an_error_naming_the_module(run_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(QloraError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj'"):
        export_model(run_llama, tmp_path / "out", model=str(other), log=lambda m: None)
    assert not (tmp_path / "out").exists()
    one_layer = tmp_path / "one"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(one_layer)
    with pytest.raises(QloraError, match=r"'model\.layers\.1\.\w+\.\w+_proj' does not exist"):
        export_model(run_llama, tmp_path / "out", model=str(one_layer), base="original", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "other"]


def test_base_original_reads_fp16_shards(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
                     ).to(torch.float16).save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 2
    run = make_run(tmp_path / "run", tmp_path / "base")
    export_model(run, tmp_path / "out", dtype="fp32", base="original", log=lambda m: None)
    got, ad = read_export(tmp_path / "out"), adapter_tensors(run)
    orig = {}
    for f in (tmp_path / "base").glob("*.safetensors"):
        orig.update(load_file(str(f)))
    assert set(got) == set(orig)
    for key, w in orig.items():
        assert w.dtype == torch.float16
        mod = key.removesuffix(".weight")
        want = w.float() + 2.0 * (ad[mod]["lora_B"].float() @ ad[mod]["lora_A"].float()) if mod in ad else w.float()
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-7, msg=key)
    assert "original" in (tmp_path / "out" / "EXPORT.md").read_text()


def test_small_max_shard_size_gives_several_shards_and_an_index(run_llama, export_fp32, tmp_path):
    limit = 60_000
    export_model(run_llama, tmp_path / "out", dtype="fp32", max_shard_size=limit, log=lambda m: None)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    sizes = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
            assert all(index["weight_map"][k] == f.name for k in keys)
            sizes[f.name] = sum(h.get_tensor(k).numel() * 4 for k in keys)
            assert sizes[f.name] <= limit or len(keys) == 1  # a bigger tensor gets a shard of its own
    assert index["metadata"]["total_size"] == sum(sizes.values())
    ref = read_export(export_fp32)  # one shard, no index
    assert not (export_fp32 / "model.safetensors.index.json").exists()
    got = read_export(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_plan_shards_groups_keys_in_order():
    assert plan_shards([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]


def test_refuses_existing_output_and_bad_options(run_llama, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(QloraError, match="already exists"):
        export_model(run_llama, tmp_path / "out", log=lambda m: None)
    with pytest.raises(QloraError, match="--dtype"):
        export_model(run_llama, tmp_path / "x", dtype="int8", log=lambda m: None)
    with pytest.raises(QloraError, match="neither a run folder"):
        export_model(tmp_path, tmp_path / "x", log=lambda m: None)


def test_cli_export_with_verify(run_llama, tmp_path):
    res = CliRunner().invoke(main, ["export", run_llama, "--out", str(tmp_path / "out"), "--dtype", "fp32",
                                    "--verify", "--max-shard-size", "100KB"])
    assert res.exit_code == 0, res.output
    assert "verify passed: the export against the 4-bit base + adapter on 3 prompts" in res.output
    assert "same 8 greedy tokens on 3 of 3 prompts" in res.output and "FAILED" not in res.output
    assert "## Verify" in (tmp_path / "out" / "EXPORT.md").read_text()
    res = CliRunner().invoke(main, ["export", run_llama, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "already exists" in res.output


VERIFIED = {"max_abs_logit_diff": 0.34, "mean_abs_logit_diff": 0.026, "max_abs_logit": 15.5, "argmax_agreement": 0.979,
            "greedy_same": 2, "prompts": 3, "new_tokens": 8}


def test_a_verify_with_a_diverging_greedy_path_reads_as_passed_and_says_why():
    line = verify_report(dict(VERIFIED, passed=True))
    assert line.startswith("verify passed: the export against the 4-bit base + adapter on 3 prompts")
    assert "argmax agrees at 97.9% of positions (pass: at least 90%)" in line
    assert "same 8 greedy tokens on 2 of 3 prompts" in line and "not a failure" in line


def test_a_verify_below_the_argmax_mark_reads_as_failed():
    line = verify_report(dict(VERIFIED, argmax_agreement=0.4, passed=False))
    assert line.startswith("verify FAILED") and "40.0%" in line
