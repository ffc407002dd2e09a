"""Prompt templates: the Alpaca prompt and chat templates, with the spans the loss is taken on.

A renderer returns the conversation's text and the character spans of the assistant turns;
data/dataset.py tokenizes the text once and marks the tokens inside the spans as trained.
`prompt_ids` renders a prompt for generation exactly as training rendered it.
"""

from __future__ import annotations

from ..errors import QloraError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input: str = "", system: str | None = None) -> str:
    """The Stanford Alpaca prompt (with or without input), ending in '### Response:\\n'."""
    preamble = system or (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)
    text = f"{preamble}\n\n### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"


def resolve_template(chat_template: str | None, tokenizer) -> str:
    """"alpaca" or the Jinja chat template to render with (recipe's, else the tokenizer's)."""
    if chat_template:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is for chat
        own = own.get("default") or next(iter(own.values()), None)
    return own or "alpaca"


def render_alpaca(msgs: list[dict], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Alpaca-format text for a conversation and the character spans of the responses (EOS included)."""
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
    text, spans, first, open_prompt = "", [], True, False
    for m in msgs:
        if m["role"] == "user":
            if first:
                text += alpaca_prompt(m["content"], m.get("input", ""), system)
            else:
                text += f"\n\n### Instruction:\n{m['content']}\n\n"
                text += f"### Input:\n{m['input']}\n\n" if m.get("input") else ""
                text += "### Response:\n"
            first, open_prompt = False, True
        elif m["role"] == "assistant":
            if not open_prompt:
                text += ("\n\n" if text else "") + "### Response:\n"
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            first, open_prompt = False, False
    return text, spans


def render_chat(msgs: list[dict], tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Chat-template text and the character spans of the assistant turns.

    Each span is what the template adds between "prefix + generation prompt" and "prefix +
    this turn", so the end-of-turn marker is trained too; templates that rewrite earlier turns
    fall back to finding each response's text.
    """
    msgs = [_chat_message(m) for m in msgs]

    def render(part, gen):
        return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full = render(msgs, False)
    spans, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(msgs[:i], True) if i else ""
        upto = render(msgs[: i + 1], False)
        if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
            spans.append((len(prefix), len(upto)))
        else:
            start = full.find(m["content"], cursor)
            if start < 0:
                raise QloraError("the chat template does not reproduce an assistant turn's text; set data.chat_template.")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    return full, spans


def _chat_message(m: dict) -> dict:
    content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
    return {"role": m["role"], "content": content}


def prompt_ids(tokenizer, prompt: str | list[dict], input: str = "", chat_template: str | None = None) -> list[int]:
    """Token ids of a prompt rendered as in training, ending where the answer starts.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt (str | list[dict]): the user's request, or a conversation of {role, content}
            ending with a user turn.
        input (str): Alpaca context of a one-message prompt. Default "".
        chat_template (str | None): as `data.chat_template`. Default None.
    """
    msgs = [{"role": "user", "content": prompt, "input": input}] if isinstance(prompt, str) else prompt
    template = resolve_template(chat_template, tokenizer)
    if template == "alpaca":
        text, _ = render_alpaca(msgs, tokenizer.eos_token)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(text, add_special_tokens=False)["input_ids"]
    msgs = [_chat_message(m) for m in msgs]
    text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
