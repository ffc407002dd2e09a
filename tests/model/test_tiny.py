"""The tiny demo models: loadable by transformers, deterministic, tokenizer round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lite.data.demo_rows import demo_rows
from qlora_lite.data.templates import alpaca_prompt
from qlora_lite.model.tiny import build_tiny_llama, build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_tiny_llama_loads_and_round_trips(tmp_path):
    path = build_tiny_llama(tmp_path / "m", **SMALL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template is None  # so the Alpaca template is used
    assert model.config.vocab_size == len(tok)
    for row in demo_rows(30):
        text = alpaca_prompt(row["instruction"], row["input"]) + row["output"]
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("naïve 東京 ✓", add_special_tokens=False)["input_ids"]) == "naïve 東京 ✓"  # byte-level
    out = model(input_ids=torch.tensor([tok("What is the capital of Peru?")["input_ids"]]))
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.logits).all()


def test_build_is_deterministic(tmp_path):
    a, b = build_tiny_llama(tmp_path / "a", **SMALL), build_tiny_llama(tmp_path / "b", **SMALL)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    c = build_tiny_llama(tmp_path / "c", seed=1, **SMALL)
    assert (Path(a) / "model.safetensors").read_bytes() != (Path(c) / "model.safetensors").read_bytes()


def test_chat_template_option(tmp_path):
    path = build_tiny_llama(tmp_path / "m", chat_template=True, **SMALL)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert text == "<s><|user|>\nHi\n<|assistant|>\nHello</s>\n"
    assert tok.convert_tokens_to_ids("<|assistant|>") != tok.unk_token_id


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_archs(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch=arch, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == arch
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, model.config.vocab_size)


def test_demo_file_matches_generator():
    lines = (REPO / "recipes/data/tiny-instructions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == demo_rows()  # regenerate with tools/make_demo_data.py
