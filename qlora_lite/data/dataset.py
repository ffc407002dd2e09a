"""SFT data: read rows, detect the format, render prompts, tokenize with label masks, cache.

Public API (batching for the loop is in data/batching.py):

    train, eval, summary = build_datasets(cfg: DataConfig, tokenizer, seed: int, cache_dir: str | None)
        train, eval: lists of samples {"input_ids": list[int], "labels": list[int]}; labels are
        -100 (IGNORE_INDEX) where no loss is taken. eval is [] without a held-out split.
        summary: DataSummary; `print(summary.format())` before training.
    prompt_ids(tokenizer, instruction, input="", chat_template=None) -> list[int]
        the token ids of a prompt exactly as training renders it, for generation.

Formats (`data.format`, "auto" picks from the columns):
    alpaca      instruction, input (optional), output [, system]
    sharegpt    conversations: [{from: human|gpt|system, value}], multi-turn
    messages    messages: [{role: user|assistant|system, content}], multi-turn
    completion  one text column (`data.text_field`), trained whole

Every assistant turn is trained (`train_on: responses`); prompt tokens get -100. Masks come
from one tokenization of the whole rendered text plus the character spans of the responses
(offsets), so input_ids are exactly what the chat template renders. Rendering lives in
data/templates.py, file reading in data/sources.py, the eval split and the token cache in
data/cache.py. Preference pairs (data/preference.py) go
through the same rendering, tokenizing, eval split and cache (`load_train_eval`, pairs=True).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

from ..errors import QloraError
from .cache import load_train_eval
from .templates import render_alpaca, render_chat, resolve_template

IGNORE_INDEX = -100  # the label of tokens without loss (torch's cross_entropy default)
TOKENIZE_CHUNK = 1000  # texts per tokenizer call: the fast tokenizer batches them in Rust
PAIR_COLUMNS = {"chosen", "rejected"}  # what makes a row a preference pair (data/preference.py)
PAIR_FORMATS = ("preference", "hh")  # the data.format values of pair data
ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "chatgpt": "assistant", "system": "system",
}

# ---------------------------------------------------------------- formats


def detect_format(columns, text_field: str = "text", pairs: bool = False) -> str:
    """Pick the data format from the column names; QloraError lists them when nothing fits.

    Args:
        columns (Iterable[str]): the first row's column names.
        text_field (str): the text column of completion data. Default "text".
        pairs (bool): the objective trains on preference pairs (DPO, ORPO), which read only
            chosen/rejected data; SFT reads none of it. Default False.
    """
    cols = set(columns)
    has_pairs = PAIR_COLUMNS <= cols
    if pairs:
        if has_pairs:
            return "preference"  # data/preference.py tells HH transcripts apart by their text
        raise QloraError(
            f"preference training needs chosen and rejected columns; the data has {sorted(cols)}. "
            "Rename the columns, or set train.objective: sft to train on this data with SFT."
        )
    sft = _sft_format(cols, text_field)
    if has_pairs:
        also = f", or data.format: {sft} to run SFT on its other columns" if sft else ""
        raise QloraError(
            f"the data holds preference pairs (columns {sorted(cols)} include chosen and rejected), "
            f"which SFT does not train on; set train.objective: dpo or orpo{also}."
        )
    if sft is None:
        raise QloraError(
            f"cannot detect the data format from columns {sorted(cols)}: expected instruction+output (alpaca), "
            f"conversations (sharegpt), messages, or {text_field!r} (completion). Set data.format, "
            "or data.text_field for plain text."
        )
    return sft


def _sft_format(cols: set, text_field: str) -> str | None:
    if "conversations" in cols:
        return "sharegpt"
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if text_field in cols:
        return "completion"
    return None


def check_format(fmt: str, pairs: bool) -> None:
    """QloraError when an explicit data.format does not suit the objective (pairs or SFT)."""
    if pairs and fmt not in PAIR_FORMATS:
        raise QloraError(
            f"data.format: {fmt} is SFT data, but preference training needs pairs; set data.format to "
            f"{' or '.join(PAIR_FORMATS)} (or auto), or train.objective: sft."
        )
    if not pairs and fmt in PAIR_FORMATS:
        raise QloraError(f"data.format: {fmt} holds preference pairs; set train.objective: dpo or orpo.")


def to_messages(row: dict, fmt: str, where: str, text_field: str = "text") -> list[dict] | str:
    """Normalise one row to [{role, content}] (alpaca user turns keep `input`); completion -> str."""
    def need(key):
        if row.get(key) is None:
            raise QloraError(f"{where}: {fmt} row has no {key!r} field (fields: {sorted(row)}).")
        return row[key]

    if fmt == "completion":
        text = need(text_field)
        if not isinstance(text, str):
            raise QloraError(f"{where}: {text_field!r} must be a string, got {type(text).__name__}.")
        return text
    if fmt == "alpaca":
        msgs = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        user = {"role": "user", "content": str(need("instruction")), "input": str(row.get("input") or "")}
        return msgs + [user, {"role": "assistant", "content": str(need("output"))}]
    return normalize_turns(need("conversations" if fmt == "sharegpt" else "messages"), where)


def normalize_turns(turns, where: str, field: str = "") -> list[dict]:
    """[{role, content}] from a list of role/content or from/value turns (ROLES names the roles).

    Args:
        turns (list[dict]): the row's turns.
        where (str): "<path> row <i>", for errors.
        field (str): the column the turns came from, named in errors when given. Default "".
    """
    column = f" {field!r}" if field else ""
    if not isinstance(turns, list) or not turns:
        raise QloraError(f"{where}:{column} expected a non-empty list of turns, got {turns!r:.80}.")
    msgs = []
    for t in turns:
        role = t.get("from", t.get("role")) if isinstance(t, dict) else None
        content = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise QloraError(
                f"{where}:{column} turn {t!r:.80} needs a role ({', '.join(sorted(ROLES))}) and a string text."
            )
        msgs.append({"role": ROLES[role], "content": content})
    return msgs


# ---------------------------------------------------------------- tokenizing


def tokenize_rows(rows, fmt, tokenizer, template, train_on, max_seq_len, text_field, where):
    """Render and tokenize rows; return (samples, {"truncated": n, "dropped": n})."""
    eos = eos_token(tokenizer)
    texts, spans, prefixes = [], [], []
    for i, row in enumerate(rows):
        where_row = f"{where} row {i}"
        msgs = to_messages(row, fmt, where_row, text_field)
        if fmt == "completion":
            text = msgs + eos
            sp, prefix = [(0, len(text))], bos_ids(tokenizer)
        else:
            text, sp, prefix = render_messages(msgs, tokenizer, template, where_row)
        texts.append(text)
        spans.append(sp)
        prefixes.append(prefix)
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for ids, labels in tokenize_rendered(tokenizer, texts, spans, prefixes, train_all=train_on == "all"):
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            counts["truncated"] += 1
        if all(label == IGNORE_INDEX for label in labels):
            counts["dropped"] += 1
            continue
        samples.append({"input_ids": ids, "labels": labels})
    return samples, counts


def eos_token(tokenizer) -> str:
    """The tokenizer's EOS text; QloraError when it has none (nothing could end a response)."""
    if tokenizer.eos_token is None:
        raise QloraError("the tokenizer has no eos_token; set one so responses can end.")
    return tokenizer.eos_token


def bos_ids(tokenizer) -> list[int]:
    """[bos_token_id], or [] for a tokenizer without one."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def render_messages(msgs: list[dict], tokenizer, template: str, where: str):
    """(text, response spans, ids put before the text) of a conversation, as training renders it.

    Args:
        msgs (list[dict]): {role, content} turns (alpaca user turns may carry `input`).
        tokenizer: a Hugging Face tokenizer.
        template (str): "alpaca" or a Jinja chat template (`resolve_template`).
        where (str): "<path> row <i>", for errors.
    """
    if template == "alpaca":
        text, spans = render_alpaca(msgs, eos_token(tokenizer))
        return text, spans, bos_ids(tokenizer)
    try:  # chat templates write their own BOS when the model wants one
        text, spans = render_chat(msgs, tokenizer, template)
    except QloraError as e:
        raise QloraError(f"{where}: {e}") from None
    except Exception as e:  # Jinja errors raised by the template (e.g. roles must alternate)
        raise QloraError(f"{where}: the chat template failed: {e}") from None
    return text, spans, []


def tokenize_rendered(tokenizer, texts, spans, prefixes, train_all: bool = False):
    """Yield (input_ids, labels) per rendered text, tokenized TOKENIZE_CHUNK texts per call.

    Args:
        tokenizer: a Hugging Face tokenizer (fast, for offsets).
        texts (list[str]): rendered texts.
        spans (list[list[tuple[int, int]]]): per text, the character spans that get labels.
        prefixes (list[list[int]]): per text, ids put before it (BOS), never labelled.
        train_all (bool): label every token, not only the spans. Default False.
    """
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = slice(start, start + TOKENIZE_CHUNK)
        for (ids, trained), pre in zip(encode_with_spans(tokenizer, texts[chunk], spans[chunk]), prefixes[chunk]):
            trained = [False] * len(pre) + trained
            ids = pre + ids
            labels = [t if (k or train_all) else IGNORE_INDEX for t, k in zip(ids, trained)]
            labels[0] = IGNORE_INDEX  # nothing predicts the first token; counts stay honest
            yield ids, labels


def encode_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]):
    """[(input_ids, trained flags)] per text: one tokenization of the whole text, flags from offsets.

    Tokenizers without offsets (pure-Python ones) get each span and each gap tokenized on
    its own instead, which can differ from whole-text tokenization at the seams.
    """
    try:
        # verbose=False: long texts are expected here (truncated below), no warning per text
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, ValueError, TypeError):
        enc = None
    if enc is not None and "offset_mapping" in enc:
        return [(list(ids), _in_spans(off, sp)) for ids, off, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)]
    out = []
    for text, sp in zip(texts, spans):
        ids, trained, at = [], [], 0
        for a, b in [*sp, (len(text), len(text))]:
            for piece, flag in ((text[at:a], False), (text[a:b], True)):
                if piece:
                    part = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                    ids += part
                    trained += [flag] * len(part)
            at = b
        out.append((ids, trained))
    return out


def _in_spans(offsets, spans) -> list[bool]:
    # A token is trained when any of its characters is in a response span: a BPE token
    # such as " Paris" starts on the prompt's space but is produced by the response.
    out, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        out.append(j < len(spans) and start < spans[j][1] and max(end, start + 1) > spans[j][0])
    return out


# ---------------------------------------------------------------- summary, cache, build


@dataclass
class DataSummary:
    """What the run trains on, printed before training.

    Args:
        source (str): data.path.
        data_format (str): the format used ("alpaca", "sharegpt", ...).
        template (str): "alpaca", "chat template" or "none" (completion).
        rows (int): rows read from the train file (after max_samples).
        train_samples (int): training samples kept.
        eval_samples (int): eval samples kept.
        tokens (int): tokens in the training samples.
        trained_tokens (int): training tokens with a loss.
        truncated (int): samples cut to max_seq_len (train and eval files).
        dropped (int): samples removed for having no trained token left (train and eval files).
        longest (int): the longest training sample, in tokens.
        max_seq_len (int): data.max_seq_len.
        from_cache (bool): the tokenized data came from the cache.
    """

    source: str
    data_format: str
    template: str
    rows: int
    train_samples: int
    eval_samples: int
    tokens: int
    trained_tokens: int
    truncated: int
    dropped: int
    longest: int
    max_seq_len: int
    from_cache: bool

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def format(self) -> str:
        """A short table for the console."""
        cut = f"{self.truncated} (> {self.max_seq_len} tokens)"
        lines = [
            ("data", f"{self.source} [{self.data_format}, {self.template}{', cached' if self.from_cache else ''}]"),
            ("rows read", f"{self.rows}"),
            ("samples", f"{self.train_samples} train, {self.eval_samples} eval"),
            ("tokens", f"{self.tokens} train, {self.trained_share:.1%} trained, longest {self.longest}"),
            ("truncated", cut),
            ("dropped", f"{self.dropped} (no response token left)"),
        ]
        return "\n".join(f"{k:<10} {v}" for k, v in lines)


def build_datasets(cfg, tokenizer, seed: int, cache_dir: str | os.PathLike | None = None):
    """Tokenized train and eval samples plus a DataSummary.

    Args:
        cfg (DataConfig): the recipe's data section.
        tokenizer: a Hugging Face tokenizer (fast, for offsets).
        seed (int): seeds the eval split.
        cache_dir (str | PathLike | None): where tokenized files are cached; None disables.
    """
    template = resolve_template(cfg.chat_template, tokenizer)
    tokenize = partial(_tokenize_sft, cfg, tokenizer, template)
    train, eval_samples, meta, cached = load_train_eval(
        cfg, tokenizer, template, seed, cache_dir, tokenize, counts=("dropped", "truncated"))
    dropped, truncated = meta["dropped"], meta["truncated"]
    if not train:
        raise QloraError(
            f"data {cfg.path!r}: no training samples left ({meta['rows']} rows, {dropped} dropped for having "
            f"no response token within data.max_seq_len={cfg.max_seq_len}); raise max_seq_len or check the data."
        )
    tokens = sum(len(s["input_ids"]) for s in train)
    trained = sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in train)
    summary = DataSummary(
        source=cfg.path, data_format=meta["format"],
        template="none" if meta["format"] == "completion" else "alpaca" if template == "alpaca" else "chat template",
        rows=meta["rows"], train_samples=len(train), eval_samples=len(eval_samples), tokens=tokens,
        trained_tokens=trained, truncated=truncated, dropped=dropped,
        longest=max(len(s["input_ids"]) for s in train), max_seq_len=cfg.max_seq_len, from_cache=cached,
    )
    return train, eval_samples, summary


def _tokenize_sft(cfg, tokenizer, template, rows, where):
    fmt = detect_format(rows[0].keys(), cfg.text_field) if cfg.format == "auto" else cfg.format
    check_format(fmt, pairs=False)
    samples, counts = tokenize_rows(rows, fmt, tokenizer, template, cfg.train_on, cfg.max_seq_len, cfg.text_field, where)
    return samples, {"format": fmt, **counts}
