"""tools/get_smollm2.py's conversion on a tiny GGUF written here with the `gguf` package (skipped without it).

The real 93 MB package is never needed: the tiny file has SmolLM2's shape of metadata (llama
architecture, GPT-2-style byte-level BPE, ChatML chat template, tied embeddings, a Q4_1 tensor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

import get_smollm2  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with a small byte-level BPE tokenizer; one weight stored as Q4_1."""
    from qlora_lite.model.tiny import build_tiny_tokenizer

    tok = json.loads(build_tiny_tokenizer(vocab_size=300)._tokenizer.to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + ["<|im_start|>", "<|im_end|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 1)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(len(tokens), HIDDEN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (KV_HEADS * head, HIDDEN)),
                            ("attn_v", (KV_HEADS * head, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        q41 = gguf.GGMLQuantizationType.Q4_1  # SmolLM2's file is Q4_1: dequantized by transformers
        w.add_tensor(f"blk.{i}.ffn_up.weight", gguf.quants.quantize(t(FFN, HIDDEN), q41), raw_dtype=q41)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_a_gguf_becomes_a_plain_bf16_folder_with_the_weights_transformers_reads(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "plain"
    get_smollm2.convert_gguf(tiny_gguf, out)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert plain.dtype == torch.bfloat16
    assert getattr(plain.config, "quantization_config", None) is None  # a plain folder, not GGUF
    ref_sd, plain_sd = ref.state_dict(), plain.state_dict()
    assert set(ref_sd) == set(plain_sd)
    for k, v in ref_sd.items():
        assert torch.equal(plain_sd[k], v.to(torch.bfloat16)), k
    # The Q4_1 weight holds at most 16 levels per block of 32, as dequantized.
    assert len(torch.unique(ref_sd["model.layers.0.mlp.up_proj.weight"][0, :32])) <= 16
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "<|im_start|>user\nThe capital of France is Paris.<|im_end|>"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_conversion_is_deterministic(tiny_gguf, tmp_path):
    for name in ("a", "b"):
        get_smollm2.convert_gguf(tiny_gguf, tmp_path / name)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_finished_conversion_is_left_alone_and_a_wrong_gguf_is_refused(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "conversion.json").write_text(json.dumps({"gguf_sha256": get_smollm2.GGUF_SHA256}))
    assert get_smollm2.get_model(out, tmp_path / "wheels", offline=True, log=lambda m: None) == out
    # The tiny GGUF stands in for an installed package with the wrong bytes: refused by its hash.
    monkeypatch.setattr(get_smollm2, "installed_gguf", lambda: tiny_gguf)
    with pytest.raises(get_smollm2.QloraError, match="sha256"):
        get_smollm2.get_model(tmp_path / "other", tmp_path / "wheels", offline=True)
