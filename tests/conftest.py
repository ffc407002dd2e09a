"""What tests in several folders share: tiny models built locally (no network, seconds each),
the demo rows as a data file, recipes for short runs, and a finished run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_lite.lora.files import save_adapter
from qlora_lite.lora.layer import attach_lora, lora_modules
from qlora_lite.model.loader import load_model
from qlora_lite.model.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from qlora_lite.recipe import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    Recipe,
    recipe_from_dict,
    save_recipe,
)

ARCHS = ("llama", "mistral", "qwen2")


def build_tiny(out_dir, arch: str = "llama", seed: int = 0, tie: bool = False, dtype=torch.bfloat16):
    """Write a 2-layer random model of `arch` into `out_dir` (safetensors) and return the path."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cls, cfg = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "mistral": (MistralForCausalLM, MistralConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    }[arch]
    torch.manual_seed(seed)
    model = cls(cfg(**common)).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


@pytest.fixture(scope="session")
def tok():
    """The tiny BPE tokenizer without a chat template (the Alpaca layout)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def chat_tok():
    """The tiny tokenizer with a ChatML-style chat template."""
    t = build_tiny_tokenizer()
    t.chat_template = TINY_CHAT_TEMPLATE
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from qlora_lite.data.demo_rows import demo_rows

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(160, seed=1)))
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Preference pairs from the demo rows: the right answer chosen, another row's answer to the
    same kind of question (a wrong capital, colour, opposite or word) rejected."""
    from qlora_lite.data.demo_rows import demo_rows

    rows = demo_rows(160, seed=1)
    pairs = []
    for i, row in enumerate(rows):
        other = rows[(i + 4 * (1 + i % 7)) % len(rows)]  # 4 tasks in turn: the same task
        if other["output"] != row["output"]:
            prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
            pairs.append({"prompt": prompt, "chosen": row["output"], "rejected": other["output"]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def make_recipe(data_file, out, **train):
    t = dict(seed=3, max_steps=10, micro_batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, log_every=1,
             eval_every=5, save_every=5, keep_last=2, optimizer="paged_adamw_8bit")
    t.update(train)
    return recipe_from_dict({
        "model": {"name_or_path": "qlora-lite:tiny-llama"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"path": data_file, "format": "alpaca", "max_seq_len": 64, "eval_split": 0.1},
        "train": t,
        "output": {"dir": str(out)},
    })


def pair_recipe(pairs_file, out, lora=None, **train_kw):
    """A DPO recipe (train.objective and the rest overridable) on `pairs_file`."""
    t = dict(objective="dpo", seed=3, max_steps=10, micro_batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2,
             log_every=2, eval_every=5, save_every=5, keep_last=5, optimizer="paged_adamw_8bit")
    t.update(train_kw)
    return recipe_from_dict({
        "model": {"name_or_path": "qlora-lite:tiny-llama"},
        "lora": dict({"r": 8, "alpha": 16, "dropout": 0.0}, **(lora or {})),
        "data": {"path": pairs_file, "format": "preference", "max_seq_len": 64, "eval_split": 0.1},
        "train": t,
        "output": {"dir": str(out)},
    })


def losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def tiny_recipe(data_file, out, **train_kw):
    t = dict(seed=3, max_steps=400, micro_batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=0, log_every=1,
             eval_every=0, save_every=2, keep_last=2)
    t.update(train_kw)
    return recipe_from_dict({"model": {"name_or_path": "qlora-lite:tiny-llama"}, "lora": {"r": 4, "alpha": 8},
                             "data": {"path": str(data_file), "format": "alpaca", "max_seq_len": 64, "eval_split": 0},
                             "train": t, "output": {"dir": str(out)}})


LORA = LoraConfig(r=8, alpha=16, dropout=0.0)


def make_run(run_dir, base_path, lora=LORA, seed=1, compute_dtype="bfloat16", chat_template=None) -> str:
    """A run folder as `qlora-lite run` writes it: recipe.yaml + adapter/ with random non-zero B."""
    mc = ModelConfig(name_or_path=str(base_path), gradient_checkpointing=False,
                     quantization=QuantizationConfig(compute_dtype=compute_dtype))
    m = load_model(mc)
    torch.manual_seed(seed)
    attach_lora(m, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)
    save_recipe(Recipe(model=mc, lora=lora, data=DataConfig(path="data.jsonl", chat_template=chat_template)),
                Path(run_dir) / "recipe.yaml")
    save_adapter(m, Path(run_dir) / "adapter", lora, str(base_path))
    return str(run_dir)
