"""Generation: prompt formatting as in training, greedy or sampled decoding, a chat loop.

Works on a 4-bit base + adapter (a run folder, or a model plus --adapter) and on a plain
model folder such as an export. Prompts are rendered by `qlora_lite.data.templates` (the chat template
when the tokenizer or recipe has one, else Alpaca), the same functions training uses.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .data.templates import prompt_ids
from .errors import QloraError
from .lora.files import load_adapter
from .model.loader import disable_cpu_weight_packing, load_model, load_tokenizer, pick_device, resolve_model_path
from .recipe import ModelConfig
from .runs.folder import is_adapter_folder, is_run_folder, resolve_source
from .utils.libraries import quiet_progress_bars

DEFAULT_MAX_NEW_TOKENS = 128
EXIT_COMMAND = "/exit"


@dataclass
class Loaded:
    """A model ready to generate with.

    Args:
        model: a transformers causal LM (4-bit + LoRA, or plain).
        tokenizer: its tokenizer.
        chat_template (str | None): the recipe's data.chat_template (None: tokenizer's or Alpaca).
        description (str): what was loaded, for the user.
    """

    model: object
    tokenizer: object
    chat_template: str | None
    description: str


def load_for_generation(path: str, adapter: str | None = None, device: str = "auto") -> Loaded:
    """Load a run folder, an adapter folder, or a model folder / name (+ optional adapter).

    Args:
        path (str): run folder (recipe.yaml + adapter/), PEFT adapter folder, or model.
        adapter (str | None): adapter folder to apply on a 4-bit base. Default None.
        device (str): "auto" (the GPU when there is one), "cpu" or "cuda". Default "auto".
    """
    device = pick_device(device)
    if is_run_folder(path) or is_adapter_folder(path):
        src = resolve_source(path)
        cfg, adapter_dir, template = src.model, Path(adapter or src.adapter_dir), src.chat_template
    elif adapter:
        cfg, adapter_dir, template = ModelConfig(name_or_path=path, gradient_checkpointing=False), Path(adapter), None
    else:
        from transformers import AutoModelForCausalLM

        quiet_progress_bars()
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype="auto", use_safetensors=True,
                                                         use_kernels=False)
        except OSError as e:
            raise QloraError(f"Could not load model {path!r}: {e}") from None
        tok = load_tokenizer(ModelConfig(name_or_path=path))
        return Loaded(model.to(device).eval(), tok, None, f"{path} ({model.dtype})")
    model = load_model(replace(cfg, gradient_checkpointing=False), device)
    load_adapter(model, adapter_dir)
    return Loaded(model.eval(), load_tokenizer(cfg), template, f"{cfg.name_or_path} (4-bit) + adapter {adapter_dir}")


# ---------------------------------------------------------------- prompts


def prompt_to_ids(tokenizer, prompt: str | list[dict], chat_template: str | None = None,
                  raw: bool = False) -> list[int]:
    """Token ids ending where the assistant's answer starts.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt (str | list[dict]): one user message, or a conversation of {role, content}
            ending with a user turn.
        chat_template (str | None): as `data.chat_template`. Default None.
        raw (bool): tokenize `prompt` as is, no template. Default False.
    """
    if raw:
        if not isinstance(prompt, str):
            raise QloraError("raw prompts must be text, not a conversation.")
        return tokenizer(prompt)["input_ids"]
    return prompt_ids(tokenizer, prompt, chat_template=chat_template)


# ---------------------------------------------------------------- decoding


def stop_ids(model, tokenizer=None) -> list[int]:
    """Every end-of-sequence id: the generation config's (chat models list several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: list[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None, min_new_tokens: int = 0) -> torch.Tensor:
    """New token ids (1-D, EOS included when reached) after `input_ids` (1 x T).

    Args:
        model: causal LM.
        input_ids (Tensor): 1 x T prompt ids.
        max_new_tokens (int): most tokens to add. Default DEFAULT_MAX_NEW_TOKENS.
        temperature (float): 0 for greedy, > 0 samples. Default 0.0.
        top_p (float): nucleus sampling mass, used when sampling. Default 1.0.
        eos_token_id (list[int] | None): stop ids; default from the model's generation config.
        pad_token_id (int | None): default the first stop id.
        seed (int | None): seeds sampling. Default None.
        min_new_tokens (int): EOS is suppressed before this many tokens. Default 0.
    """
    from transformers import GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1:
        raise QloraError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {temperature}, {top_p}.")
    eos = stop_ids(model) if eos_token_id is None else list(eos_token_id)
    sample = temperature > 0
    # A fresh config: the checkpoint's own generation_config may turn sampling on by default.
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample,
                           eos_token_id=eos or None,
                           pad_token_id=pad_token_id if pad_token_id is not None else (eos[0] if eos else None),
                           use_cache=True, **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}))
    disable_cpu_weight_packing(model)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    was_training = model.training
    model.eval()  # no dropout in the adapters; the training demo calls this mid-run
    try:
        if sample and seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    finally:
        model.train(was_training)
    return out[0, ids.shape[1]:].cpu()


def greedy_ids(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Exactly `max_new_tokens` greedy ids, EOS suppressed: for comparing two models token by token."""
    # generate() fills unset (None) fields from the model's own config, so an empty stop list
    # would not disable EOS; suppressing it until the last token does.
    return generate_ids(model, input_ids, max_new_tokens, min_new_tokens=max_new_tokens)


def generate_text(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  temperature: float = 0.0, top_p: float = 1.0, chat_template: str | None = None,
                  seed: int | None = None, raw: bool = False) -> str:
    """The model's answer to `prompt`, decoded, special tokens dropped; stops at EOS.

    Args:
        model: causal LM (4-bit + LoRA or plain).
        tokenizer: its tokenizer.
        prompt (str | list[dict]): a user message or a conversation ending with a user turn.
        max_new_tokens (int): Default DEFAULT_MAX_NEW_TOKENS.
        temperature (float): 0 greedy. Default 0.0.
        top_p (float): Default 1.0.
        chat_template (str | None): as `data.chat_template`. Default None.
        seed (int | None): seeds sampling. Default None.
        raw (bool): no template. Default False.
    """
    ids = torch.tensor([prompt_to_ids(tokenizer, prompt, chat_template, raw)])
    new = generate_ids(model, ids, max_new_tokens, temperature, top_p, stop_ids(model, tokenizer),
                       tokenizer.pad_token_id, seed)
    return tokenizer.decode(new, skip_special_tokens=True)


def chat_loop(loaded: Loaded, lines=None, write=print, **gen_kwargs) -> list[dict]:
    """Read user lines, answer each with the whole history as context; stop at EOF or /exit.

    Args:
        loaded (Loaded): model, tokenizer, template.
        lines (Iterable[str] | None): input lines. Default sys.stdin.
        write (callable): output. Default print.
        **gen_kwargs: passed to `generate_text` (max_new_tokens, temperature, top_p, seed).

    Returns:
        list[dict]: the conversation.
    """
    interactive = lines is None and sys.stdin.isatty()
    lines = sys.stdin if lines is None else lines
    history: list[dict] = []
    if interactive:
        write(f"chatting with {loaded.description}; {EXIT_COMMAND} or Ctrl-D ends")
    it = iter(lines)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = next(it, None)
        if line is None or line.strip() == EXIT_COMMAND:
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = generate_text(loaded.model, loaded.tokenizer, history, chat_template=loaded.chat_template, **gen_kwargs)
        history.append({"role": "assistant", "content": reply})
        write(reply)
    return history
