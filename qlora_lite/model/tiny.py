"""Tiny demo models built locally: random-init Llama/Mistral/Qwen2 plus a byte-level BPE tokenizer.

Nothing is downloaded. `build_tiny_model` writes a Hugging Face folder (safetensors, config,
tokenizer) that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
read, in about a second. The same arguments give the same bytes: the weights come from a
seeded init and the tokenizer is trained on `demo_rows()`, which is itself seeded.

The tokenizer is trained on the demo data set (data/demo_rows.py), which is what the tiny
model learns in the demo and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.demo_rows import demo_rows
from ..data.templates import alpaca_prompt
from ..errors import QloraError
from ..utils.atomic import atomic_dir

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template for tests of the messages/sharegpt path: each turn is
# "<|role|>\ncontent\n", assistant turns end with EOS (the model learns to stop there).
# Newlines are Jinja expressions because HF renders with trim_blocks, which eats a
# literal newline after a block tag.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ARCHS = ("llama", "mistral", "qwen2")


# Five times HF's 0.02 on purpose: the frozen random lm_head bounds the logits an adapter-only
# model can reach (at 0.02 the largest logit is about 5, so the loss cannot fall below ~2), and
# in a 200-step LoRA run on the demo data eval loss reached 0.36 at 0.1 against 1.2 at 0.05.
TINY_INIT_STD = 0.1


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    initializer_range: float = TINY_INIT_STD,
    chat_template: bool | str = False,
    seed: int = 0,
    overwrite: bool = True,
) -> str:
    """Write a random-init tiny causal LM and its tokenizer to `out_dir`; return the path.

    Args:
        out_dir (str | PathLike): the folder to write (written atomically).
        arch (str): "llama", "mistral" or "qwen2". Default "llama".
        hidden_size (int): model width. Default 256.
        num_layers (int): decoder layers. Default 4.
        num_heads (int): attention heads. Default 4.
        num_kv_heads (int): key/value heads (GQA when < num_heads). Default 2.
        intermediate_size (int): MLP width. Default 512.
        vocab_size (int): most BPE tokens to learn, specials included; the demo corpus runs
            out of merges at about 750. Default 1024.
        max_position_embeddings (int): longest sequence. Default 1024.
        initializer_range (float): init std. Default TINY_INIT_STD.
        chat_template (bool | str): False for none (the Alpaca template is used), True for
            `TINY_CHAT_TEMPLATE`, or a Jinja string. Default False.
        seed (int): seeds the weights. Default 0.
        overwrite (bool): replace an existing folder. Default True.
    """
    import torch

    if arch not in ARCHS:
        raise QloraError(f"tiny model arch {arch!r} is not one of {', '.join(ARCHS)}.")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        return str(out)
    tokenizer = build_tiny_tokenizer(vocab_size)
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE if chat_template is True else chat_template
    config, cls = _config_and_class(
        arch, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    # Seed a private generator state so building a model never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)


def _config_and_class(arch: str, **common):
    """The transformers config and model class of `arch`, sliding windows off (short demo rows)."""
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    return transformers.Qwen2Config(use_sliding_window=False, **common), transformers.Qwen2ForCausalLM


def build_tiny_llama(out_dir: str | os.PathLike, **kwargs) -> str:
    """`build_tiny_model(out_dir, arch="llama", **kwargs)`: the demo base model."""
    return build_tiny_model(out_dir, arch="llama", **kwargs)


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE on the demo corpus (`train_bpe_tokenizer`), with the chat role tokens.

    Args:
        vocab_size (int): vocabulary size including special tokens. Default 1024.
    """
    return train_bpe_tokenizer(_tokenizer_corpus(), vocab_size, extra_specials=ROLE_TOKENS)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, extra_specials=(), model_max_length: int = 1024):
    """A byte-level BPE trained on `texts` (deterministic), as a `PreTrainedTokenizerFast`.

    Byte-level means every string round-trips, not only the training text. BOS is added by the
    post-processor like Llama's (the data pipeline tokenizes with add_special_tokens=False).

    Args:
        texts (list[str]): the training corpus.
        vocab_size (int): vocabulary size including special tokens.
        extra_specials (list[str]): special tokens after PAD, BOS, EOS. Default ().
        model_max_length (int): the tokenizer's length limit. Default 1024.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *extra_specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    extra = {"additional_special_tokens": list(extra_specials)} if extra_specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length, **extra)


def _tokenizer_corpus() -> list[str]:
    rows = demo_rows()
    return [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]
