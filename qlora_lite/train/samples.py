"""Samples while it trains: the model's answers to a few prompts, with the adapter on, before
training and at every eval, so a run shows that it works long before it ends.

The prompts are `train.sample_prompts` (formatted as in training) or the first N eval rows'
prompts. Each answer is at most `train.sample_max_new_tokens` tokens, greedy unless
`train.sample_temperature` > 0, which bounds what sampling adds to an eval. The answers go to
`<run>/samples.jsonl` (one line per prompt and step, appended and flushed like metrics.jsonl,
cut back to the checkpoint on resume), the console and each tracker (train/tracking.py).
Sampling runs under a forked RNG, so a run with samples trains exactly like one without.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data.dataset import IGNORE_INDEX
from ..errors import QloraError
from ..generate import generate_ids, prompt_to_ids, stop_ids

SAMPLES_NAME = "samples.jsonl"
CONSOLE_CHARS = 160  # an answer is cut to this on the console; samples.jsonl keeps it whole


def eval_prompt_ids(sample: dict) -> list[int]:
    """The prompt of a tokenized eval sample (a pair: its chosen side's): the ids before the first trained one."""
    sample = sample["chosen"] if "chosen" in sample else sample
    first_trained = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    return sample["input_ids"][:first_trained]


def resolve_prompts(recipe, tokenizer, eval_set: list) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids) for each sample prompt of the recipe.

    Args:
        recipe (Recipe): train.sample_prompts, data.chat_template.
        tokenizer: the run's tokenizer.
        eval_set (list[dict]): the tokenized eval samples (for a number of eval rows).
    """
    chosen = recipe.train.sample_prompts
    if isinstance(chosen, list):
        return [(p, prompt_to_ids(tokenizer, p, recipe.data.chat_template)) for p in chosen]
    if chosen and not eval_set:
        raise QloraError(f"train.sample_prompts: {chosen} asks for the prompts of {chosen} eval rows, but the run "
                         "has no eval split; set data.eval_split (or data.eval_path), or give a list of prompts.")
    out = []
    for sample in eval_set[:chosen]:
        ids = eval_prompt_ids(sample)
        out.append((tokenizer.decode(ids, skip_special_tokens=True), ids))
    return out


class Sampler:
    """Answers the run's sample prompts at a step: `sampler(step)` returns the seconds it took.

    Args:
        run (Run): the model, tokenizer, recipe, eval set, tracker and run folder.
        write (callable): the console (the training bar's write).
        main (bool): whether this rank writes samples.jsonl and the trackers. Every rank generates:
            under FSDP each forward needs all of them.
    """

    def __init__(self, run, write=print, main: bool = True):
        self.run, self.write, self.main = run, write, main
        self.prompts = resolve_prompts(run.recipe, run.tokenizer, run.eval_set)
        self.file = open(Path(run.run_dir) / SAMPLES_NAME, "a") if main and self.prompts else None

    def __call__(self, step: int) -> float:
        if not self.prompts:
            return 0.0
        t = self.run.recipe.train
        t0 = time.perf_counter()
        rows = []
        # Forked: the samples draw nothing from the RNG that dropout and the data order use.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            for i, (text, ids) in enumerate(self.prompts):
                t1 = time.perf_counter()
                new = generate_ids(self.run.model, torch.tensor([ids]), t.sample_max_new_tokens, t.sample_temperature,
                                   eos_token_id=stop_ids(self.run.model, self.run.tokenizer),
                                   pad_token_id=self.run.tokenizer.pad_token_id,
                                   seed=t.seed if t.sample_temperature > 0 else None)
                rows.append({"step": step, "index": i, "prompt": text,
                             "completion": self.run.tokenizer.decode(new, skip_special_tokens=True),
                             "new_tokens": int(new.numel()), "seconds": round(time.perf_counter() - t1, 3)})
        seconds = time.perf_counter() - t0
        if self.main:
            self._record(step, rows)
        return seconds

    def _record(self, step: int, rows: list[dict]) -> None:
        for r in rows:
            self.file.write(json.dumps(r) + "\n")
            answer = r["completion"] if len(r["completion"]) <= CONSOLE_CHARS else r["completion"][:CONSOLE_CHARS] + "..."
            self.write(f"step {step:>5}  sample {r['index']}: {answer!r}")
        self.file.flush()
        self.run.tracker.samples(step, rows)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
