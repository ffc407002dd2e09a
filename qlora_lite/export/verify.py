"""`export --verify`: the merged export against the 4-bit base + adapter it came from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..generate import greedy_ids, prompt_to_ids
from ..lora.files import load_adapter
from ..model.loader import load_model
from ..runs.folder import RunSource
from ..utils.libraries import quiet_progress_bars

VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give three tips for staying healthy.",
)
VERIFY_NEW_TOKENS = 8  # enough to see greedy paths diverge, cheap on CPU
# The pass marks. A right merge computes the same function up to the export dtype's rounding:
# mean |logit diff| 0.17% of the largest logit and 97.9% argmax agreement in bf16 on the demo
# run (docs/export.md), 0.11% and 94.4% on the tests' random tiny model, whose logits all lie
# within 0.7 of each other (near ties everywhere). A wrong merge (a missing scale, another base)
# moves the logits by what the adapter learned. Greedy paths are shown but not judged: one
# flipped near-tie changes every token after it.
MAX_MEAN_LOGIT_DIFF = 0.01  # of the largest |logit|
MIN_ARGMAX_AGREEMENT = 0.90


def verify_export(export_dir: str | Path, src: RunSource, prompts=VERIFY_PROMPTS,
                  new_tokens: int = VERIFY_NEW_TOKENS, device: str = "cpu") -> dict:
    """Logit differences and greedy agreement: plain-transformers export vs 4-bit base + adapter.

    Args:
        export_dir (str | Path): the exported folder.
        src (RunSource): the base and adapter it came from.
        prompts (tuple[str]): prompts to compare on. Default VERIFY_PROMPTS.
        new_tokens (int): greedy tokens generated per prompt. Default VERIFY_NEW_TOKENS.
        device (str): where both models run, one after the other (a 7B pair fits a 24 GB card
            that way). Default "cpu".
    """
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()
    exported = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype="auto", use_kernels=False).to(device).eval()
    inputs = _verify_inputs(export_dir, exported.config.vocab_size, prompts)
    want = _logits_and_greedy(exported, inputs, new_tokens)
    del exported  # free it before the 4-bit reference loads
    ref = load_model(replace(src.model, gradient_checkpointing=False), device)
    load_adapter(ref, src.adapter_dir)
    got = _logits_and_greedy(ref.eval(), inputs, new_tokens)
    diffs, agree, greedy_same, n_pos, scale = [], 0, 0, 0, 0.0
    for (a, ga), (b, gb), ids in zip(want, got, inputs):
        diffs.append((a - b).abs().flatten())
        scale = max(scale, b.abs().max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n_pos += ids.shape[1]
        greedy_same += int(torch.equal(ga, gb))
    d = torch.cat(diffs)
    return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(), "max_abs_logit": scale,
            "argmax_agreement": agree / n_pos, "greedy_agree": greedy_same == len(prompts),
            "greedy_same": greedy_same, "prompts": len(prompts), "new_tokens": new_tokens,
            "passed": agree / n_pos >= MIN_ARGMAX_AGREEMENT and d.mean().item() <= MAX_MEAN_LOGIT_DIFF * scale}


def verify_report(v: dict) -> str:
    """What --verify compared, its figures, and whether it passed, in one line for logs and EXPORT.md."""
    verdict = "passed" if v["passed"] else "FAILED"
    greedy = f"same {v['new_tokens']} greedy tokens on {v['greedy_same']} of {v['prompts']} prompts"
    if v["greedy_same"] < v["prompts"]:
        greedy += " (a path that diverges at a near-tied token is expected in bf16, not a failure)"
    return (f"verify {verdict}: the export against the 4-bit base + adapter on {v['prompts']} prompts: "
            f"max |logit diff| {v['max_abs_logit_diff']:.4g}, mean {v['mean_abs_logit_diff']:.4g} "
            f"(logits up to {v['max_abs_logit']:.4g}; pass: mean at most {MAX_MEAN_LOGIT_DIFF:.0%} of that); "
            f"argmax agrees at {v['argmax_agreement']:.1%} of positions (pass: at least {MIN_ARGMAX_AGREEMENT:.0%}); "
            f"{greedy}")


@torch.no_grad()
def _logits_and_greedy(model, inputs: list[torch.Tensor], new_tokens: int) -> list[tuple]:
    """(fp32 logits on the host, greedy ids) per prompt."""
    device = next(model.parameters()).device
    return [(model(input_ids=ids.to(device)).logits.float().cpu(), greedy_ids(model, ids, new_tokens))
            for ids in inputs]


def _verify_inputs(export_dir, vocab_size: int, prompts) -> list[torch.Tensor]:
    """Tokenized prompts, or seeded random ids when the model has no tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(export_dir))
    except (OSError, ValueError, TypeError):
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, vocab_size, (1, 12), generator=g) for _ in prompts]
    # Formatted as in training (the export's tokenizer carries the prompt format), so the
    # greedy answers compared are the ones users will ask for, not continuations of raw text.
    return [torch.tensor([prompt_to_ids(tok, p)]) for p in prompts]
