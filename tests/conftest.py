"""Tiny models built locally and deterministically: no network, seconds each."""

from __future__ import annotations

import pytest
import torch

ARCHS = ("llama", "mistral", "qwen2")


def build_tiny(out_dir, arch: str = "llama", seed: int = 0, tie: bool = False, dtype=torch.bfloat16):
    """Write a 2-layer random model of `arch` into `out_dir` (safetensors) and return the path."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

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
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    return tiny_dirs["llama"]
