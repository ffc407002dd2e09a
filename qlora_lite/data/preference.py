"""Preference pairs for DPO and ORPO: read chosen/rejected rows, render both conversations, label the completion.

Public API (batching for the loop is `collate_pairs` in data/batching.py):

    train, eval, summary = build_preference_datasets(cfg: DataConfig, tokenizer, seed: int, cache_dir)
        train, eval: lists of pairs {"chosen": sample, "rejected": sample}; a sample is
        {"input_ids": list[int], "labels": list[int]}: the whole conversation (prompt + that
        completion) tokenized exactly as SFT tokenizes it, labels the ids of the final assistant
        turn (with its EOS or end-of-turn marker) and -100 (IGNORE_INDEX) everywhere else.
        summary: PreferenceSummary; `print(summary.format())` before training.
    detect_pair_format(row) -> "preference" | "hh"
    pair_messages(row, fmt, where) -> (chosen messages, rejected messages)

Formats (`data.format`, "auto" picks from the first row):
    preference  chosen, rejected [, prompt] [, system]: prompt a string (one user turn) or a
                list of messages; chosen/rejected strings (one assistant turn) or message lists
                appended to the prompt. Without a prompt column both must be message lists
                that agree on every turn but the last, which is the completion (TRL's
                "implicit prompt").
    hh          Anthropic HH-RLHF: chosen and rejected are whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
                transcripts; the shared turns are the prompt, the final Assistant turns differ.

Identical pairs are dropped, and so are pairs with either sequence over data.max_seq_len: a
completion cut short is no longer the text that was preferred, so nothing is truncated. Both
are counted in the summary. data.train_on does not change the labels here; the objective reads it
(ORPO's NLL on the whole chosen sequence).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial

from ..errors import QloraError
from .cache import load_train_eval
from .dataset import (
    IGNORE_INDEX,
    check_format,
    detect_format,
    eos_token,
    normalize_turns,
    render_messages,
    tokenize_rendered,
)
from .templates import resolve_template

# A turn of an HH transcript: "\n\nHuman: " or "\n\nAssistant: " (the first may lack the blank line).
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_FIX = "set data.format: preference for prompt/chosen/rejected columns"

# ---------------------------------------------------------------- formats


def detect_pair_format(row: dict) -> str:
    """"preference" or "hh" from the first row; QloraError naming the columns when it holds no pairs."""
    fmt = detect_format(row.keys(), pairs=True)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    transcript = isinstance(chosen, str) and ("\n\nAssistant:" in chosen or chosen.startswith(("Human:", "\n\nHuman:")))
    if "prompt" not in row and isinstance(rejected, str) and transcript:
        return "hh"
    return fmt


def pair_messages(row: dict, fmt: str, where: str) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) conversations of one row, each ending with its assistant completion.

    Args:
        row (dict): one data row.
        fmt (str): "preference" or "hh".
        where (str): "<path> row <i>", for errors.
    """
    prompt = None  # None: the implicit prompt, every turn before the last
    if fmt == "hh":
        chosen, rejected = (parse_hh(_field(row, k, where, (str,)), where, k) for k in ("chosen", "rejected"))
    else:
        chosen, rejected = (_completion(row, k, where) for k in ("chosen", "rejected"))
        if row.get("prompt") is not None:
            prompt = _prompt(row["prompt"], where)
            chosen, rejected = (_as_turns(c) for c in (chosen, rejected))
        elif not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise QloraError(
                f"{where}: no 'prompt' field, which string chosen/rejected need (fields: {sorted(row)}); add "
                "a prompt, or give chosen and rejected as message lists that share the prompt turns."
            )
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        _check_completion(turns, field, where)
    if prompt is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    prompt = _with_system(prompt, row, where)
    return prompt + chosen, prompt + rejected


def parse_hh(text: str, where: str, field: str) -> list[dict]:
    """[{role, content}] of an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    pieces = HH_TURN.split(text)  # [text before the first turn, role, content, role, content, ...]
    if pieces[0].strip() or len(pieces) < 3:
        raise QloraError(
            f"{where}: {field!r} is not an HH transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns "
            f"(got {text!r:.80}); fix the row, or {HH_FIX}."
        )
    return [{"role": HH_ROLES[r], "content": c.strip()} for r, c in zip(pieces[1::2], pieces[2::2])]


def _field(row: dict, key: str, where: str, types: tuple) -> str | list:
    value = row.get(key)
    if value is None:
        raise QloraError(f"{where}: no {key!r} field (fields: {sorted(row)}); every row needs chosen and rejected.")
    if not isinstance(value, types):
        kinds = " or ".join({str: "a string", list: "a list of messages"}[t] for t in types)
        raise QloraError(f"{where}: {key!r} must be {kinds}, got {type(value).__name__}; fix the row.")
    return value


def _completion(row: dict, key: str, where: str) -> str | list[dict]:
    value = _field(row, key, where, (str, list))
    return value if isinstance(value, str) else normalize_turns(value, where, key)


def _as_turns(completion: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion


def _prompt(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return normalize_turns(prompt, where, "prompt")
    raise QloraError(
        f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}; fix the row."
    )


def _split_implicit(chosen: list[dict], rejected: list[dict], where: str):
    """(prompt, [chosen's last turn], [rejected's last turn]) of two conversations sharing all but the last turn."""
    shared_c, shared_r = chosen[:-1], rejected[:-1]
    if shared_c != shared_r:
        k = next((k for k, (c, r) in enumerate(zip(shared_c, shared_r)) if c != r), min(len(shared_c), len(shared_r)))
        raise QloraError(
            f"{where}: chosen and rejected differ at turn {k} (chosen: {_describe(shared_c, k)}; rejected: "
            f"{_describe(shared_r, k)}), but without a 'prompt' field every turn before the last is the shared "
            "prompt. Make them differ only in their final assistant turn, or add a prompt column."
        )
    return shared_c, chosen[-1:], rejected[-1:]


def _describe(msgs: list[dict], k: int) -> str:
    return f"{msgs[k]['role']} {msgs[k]['content']!r:.40}" if k < len(msgs) else "no such turn before its completion"


def _with_system(prompt: list[dict], row: dict, where: str) -> list[dict]:
    system = row.get("system")
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise QloraError(f"{where}: 'system' must be a string, got {type(system).__name__}; fix the row.")
    if prompt and prompt[0]["role"] == "system":
        raise QloraError(f"{where}: a 'system' field and a system turn in the prompt; keep one of them.")
    return [{"role": "system", "content": system}, *prompt]


def _check_completion(turns: list[dict], field: str, where: str) -> None:
    last = turns[-1]
    if last["role"] != "assistant":
        raise QloraError(
            f"{where}: {field!r} must end with an assistant turn (the completion), not a {last['role']} turn; "
            "fix the row."
        )
    if not last["content"].strip():
        raise QloraError(f"{where}: {field!r} has an empty completion; give it text or remove the row.")


# ---------------------------------------------------------------- tokenizing


def tokenize_pairs(rows, fmt, tokenizer, template, max_seq_len, where):
    """Render and tokenize pair rows; return (pairs, {"identical": n, "too_long": n}).

    Args:
        rows (list[dict]): the data rows.
        fmt (str): "preference" or "hh".
        tokenizer: a Hugging Face tokenizer (fast, for offsets).
        template (str): "alpaca" or a Jinja chat template (`resolve_template`).
        max_seq_len (int): the longest sequence kept; a pair with a longer one is dropped.
        where (str): the data path, for errors.
    """
    eos_token(tokenizer)  # the same rule as SFT: a tokenizer without EOS cannot end a completion
    texts, spans, prefixes = [], [], []
    counts = {"identical": 0, "too_long": 0}
    for i, row in enumerate(rows):
        where_row = f"{where} row {i}"
        chosen, rejected = pair_messages(row, fmt, where_row)
        if chosen == rejected:  # no preference to learn, and DPO's gradient is zero
            counts["identical"] += 1
            continue
        for msgs in (chosen, rejected):
            text, sp, prefix = render_messages(msgs, tokenizer, template, where_row)
            texts.append(text)
            spans.append(sp[-1:])  # the completion is the last assistant turn
            prefixes.append(prefix)
    encoded = tokenize_rendered(tokenizer, texts, spans, prefixes)
    seqs = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    pairs = []
    for c, r in zip(seqs[::2], seqs[1::2]):
        if max(len(c["input_ids"]), len(r["input_ids"])) > max_seq_len:
            counts["too_long"] += 1
        else:
            pairs.append({"chosen": c, "rejected": r})
    return pairs, counts


def _tokenize_file(cfg, tokenizer, template, rows, where):
    fmt = detect_pair_format(rows[0]) if cfg.format == "auto" else cfg.format
    check_format(fmt, pairs=True)
    pairs, counts = tokenize_pairs(rows, fmt, tokenizer, template, cfg.max_seq_len, where)
    return pairs, {"format": fmt, **counts}


# ---------------------------------------------------------------- summary, build


@dataclass
class PreferenceSummary:
    """What a preference run trains on, printed before training.

    Args:
        source (str): data.path.
        data_format (str): "preference" or "hh".
        template (str): "alpaca" or "chat template".
        rows (int): rows read from the train file (after max_samples).
        pairs (int): training pairs kept.
        eval_pairs (int): eval pairs kept.
        tokens (int): tokens of the training pairs, chosen plus rejected.
        completion_tokens (int): of those, the labelled completion tokens.
        identical (int): pairs dropped for chosen == rejected (train and eval files).
        too_long (int): pairs dropped for a sequence over max_seq_len (train and eval files).
        longest (int): the longest training sequence, in tokens.
        max_seq_len (int): data.max_seq_len.
        from_cache (bool): the tokenized data came from the cache.
    """

    source: str
    data_format: str
    template: str
    rows: int
    pairs: int
    eval_pairs: int
    tokens: int
    completion_tokens: int
    identical: int
    too_long: int
    longest: int
    max_seq_len: int
    from_cache: bool

    def format(self) -> str:
        """A short table for the console."""
        lines = [
            ("data", f"{self.source} [{self.data_format}, {self.template}{', cached' if self.from_cache else ''}]"),
            ("rows read", f"{self.rows}"),
            ("pairs", f"{self.pairs} train, {self.eval_pairs} eval"),
            ("tokens", f"{self.tokens} train (chosen+rejected), {self.completion_tokens} completion"),
            ("longest", f"{self.longest} tokens"),
            ("dropped", f"{self.identical} identical, {self.too_long} over max_seq_len={self.max_seq_len}"),
        ]
        return "\n".join(f"{k:<10} {v}" for k, v in lines)


def build_preference_datasets(cfg, tokenizer, seed: int, cache_dir: str | os.PathLike | None = None):
    """Tokenized train and eval preference pairs plus a PreferenceSummary.

    Args:
        cfg (DataConfig): the recipe's data section.
        tokenizer: a Hugging Face tokenizer (fast, for offsets).
        seed (int): seeds the eval split.
        cache_dir (str | PathLike | None): where tokenized files are cached; None disables.
    """
    template = resolve_template(cfg.chat_template, tokenizer)
    tokenize = partial(_tokenize_file, cfg, tokenizer, template)
    train, eval_pairs, meta, cached = load_train_eval(
        cfg, tokenizer, template, seed, cache_dir, tokenize, counts=("identical", "too_long"), pairs=True)
    if not train:
        raise QloraError(
            f"data {cfg.path!r}: no preference pairs left ({meta['rows']} rows; dropped {meta['identical']} "
            f"identical, {meta['too_long']} with a sequence over data.max_seq_len={cfg.max_seq_len}); raise "
            "data.max_seq_len or check the data."
        )
    seqs = [s for p in train for s in (p["chosen"], p["rejected"])]
    summary = PreferenceSummary(
        source=cfg.path, data_format=meta["format"], template="alpaca" if template == "alpaca" else "chat template",
        rows=meta["rows"], pairs=len(train), eval_pairs=len(eval_pairs), tokens=sum(len(s["input_ids"]) for s in seqs),
        completion_tokens=sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in seqs),
        identical=meta["identical"], too_long=meta["too_long"], longest=max(len(s["input_ids"]) for s in seqs),
        max_seq_len=cfg.max_seq_len, from_cache=cached,
    )
    return train, eval_pairs, summary
