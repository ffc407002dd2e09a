"""`run --demo`: eval loss and a greedy answer to an eval prompt, before and after training."""

from __future__ import annotations

import torch

from ..generate import generate_ids, stop_ids
from .samples import eval_prompt_ids

DEMO_NEW_TOKENS = 24  # enough for the demo's one-line answers


def demo_snapshot(model, tokenizer, samples, evaluate) -> dict:
    """Eval loss and a greedy generation for the first eval prompt.

    Args:
        model: the LoRA-wrapped model.
        tokenizer: its tokenizer.
        samples (list[dict]): tokenized eval samples; the first one's prompt is answered.
        evaluate (callable): () -> eval metrics ({"loss", ...}: evaluate.evaluate).
    """
    prompt = eval_prompt_ids(samples[0])
    new = generate_ids(model, torch.tensor([prompt]), max_new_tokens=DEMO_NEW_TOKENS,
                       eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    metrics = evaluate()
    return {"eval_loss": metrics["loss"], "eval": metrics, "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "generation": tokenizer.decode(new, skip_special_tokens=True)}


def prompt_gist(prompt: str) -> str:
    """The instruction (and input) lines of a formatted prompt, without template headers."""
    lines = [line.strip() for line in prompt.splitlines()]
    return " / ".join(x for x in lines if x and not x.startswith(("###", "Below is an instruction")))


def format_demo(demo: dict) -> str:
    """The before/after rows printed under the summary table."""
    b, a = demo["before"], demo["after"]
    rows = [("eval before", f"{b['eval_loss']:.4f}"), ("eval after", f"{a['eval_loss']:.4f}")]
    if "rewards/accuracies" in b.get("eval", {}):  # preference pairs: does the model prefer the chosen?
        rows += [("pairs won", f"{b['eval']['rewards/accuracies']:.2f} -> {a['eval']['rewards/accuracies']:.2f}"),
                 ("margin", f"{b['eval']['rewards/margins']:.4f} -> {a['eval']['rewards/margins']:.4f}")]
    rows += [("prompt", prompt_gist(b["prompt"])),
            ("gen before", repr(b["generation"])), ("gen after", repr(a["generation"]))]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)
