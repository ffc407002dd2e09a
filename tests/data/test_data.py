"""The SFT data pipeline: formats, templates, label masks, limits, cache, eval split."""

from __future__ import annotations

import json
import os

import pytest
from conftest import write_jsonl

from qlora_lite.data.dataset import IGNORE_INDEX, build_datasets, detect_format, tokenize_rows
from qlora_lite.data.templates import alpaca_prompt, prompt_ids
from qlora_lite.errors import QloraError
from qlora_lite.model.tiny import TINY_CHAT_TEMPLATE
from qlora_lite.recipe import DataConfig


def build(tmp_path, tokenizer, rows, cache=False, name="d.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, rows)
    cfg.setdefault("eval_split", 0.0)
    out = build_datasets(DataConfig(path=path, **cfg), tokenizer, seed=0, cache_dir=tmp_path / "cache" if cache else None)
    return out


def trained_text(tokenizer, sample) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, cur = [], []
    for t, lab in zip(sample["input_ids"], sample["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("inp", ["", "cat dog"])
def test_alpaca_prompt_and_mask(tmp_path, tok, inp):
    row = {"instruction": "Reverse the words.", "input": inp, "output": "dog cat"}
    (s,), _, summary = build(tmp_path, tok, [row])
    prompt = alpaca_prompt(row["instruction"], inp)
    assert prompt.startswith("Below is an instruction that describes a task" + (", paired with an input" if inp else "."))
    assert ("### Input:\ncat dog\n\n" in prompt) == bool(inp)
    assert prompt.endswith("### Response:\n")
    expected = [tok.bos_token_id] + tok(prompt + "dog cat" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == expected
    assert s["input_ids"][-1] == tok.eos_token_id
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert s["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert s["labels"][n_prompt:] == s["input_ids"][n_prompt:]
    assert trained_text(tok, s) == ["dog cat</s>"]
    assert summary.data_format == "alpaca" and summary.template == "alpaca"
    assert prompt_ids(tok, row["instruction"], inp) == s["input_ids"][:n_prompt]


def _expected_chat_labels(tokenizer, ids):
    """Walk the tokens: assistant turns run from after '<|assistant|>\\n' to the '\\n' after EOS."""
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    labels, state = [], "prompt"
    for t in ids:
        if state == "header":  # the newline closing '<|assistant|>'
            assert t == newline[0]
            labels.append(IGNORE_INDEX)
            state = "response"
        elif state == "response":
            labels.append(t)
            if t == tokenizer.eos_token_id:
                state = "after_eos"
        elif state == "after_eos":
            labels.append(t)
            state = "prompt"
        else:
            labels.append(IGNORE_INDEX)
            if t == assistant:
                state = "header"
    return labels


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "Capital of Peru?"},
        {"from": "gpt", "value": "Lima."},
        {"from": "human", "value": "And of Chile?"},
        {"from": "gpt", "value": "Santiago, of course."},
    ]
}
MESSAGES = {"messages": [{"role": m["from"].replace("human", "user").replace("gpt", "assistant"), "content": m["value"]}
                         for m in SHAREGPT["conversations"]]}


@pytest.mark.parametrize("row", [SHAREGPT, MESSAGES], ids=["sharegpt", "messages"])
def test_multi_turn_chat_template_masks_token_by_token(tmp_path, chat_tok, row):
    (s,), _, summary = build(tmp_path, chat_tok, [row])
    msgs = MESSAGES["messages"]
    rendered = chat_tok.apply_chat_template(msgs, tokenize=False)
    assert s["input_ids"] == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    assert s["labels"] == _expected_chat_labels(chat_tok, s["input_ids"])
    assert trained_text(chat_tok, s) == ["Lima.</s>\n", "Santiago, of course.</s>\n"]
    assert summary.template == "chat template"


def test_multi_turn_without_chat_template_uses_alpaca(tmp_path, tok):
    (s,), _, _ = build(tmp_path, tok, [SHAREGPT])
    assert trained_text(tok, s) == ["Lima.</s>", "Santiago, of course.</s>"]
    text = tok.decode(s["input_ids"])
    assert text.startswith("<s>You are terse.\n\n### Instruction:\nCapital of Peru?\n\n### Response:\nLima.</s>")
    assert "\n\n### Instruction:\nAnd of Chile?\n\n### Response:\nSantiago" in text


def test_recipe_template_overrides_tokenizer(tmp_path, chat_tok, tok):
    row = {"instruction": "Hi", "input": "", "output": "Hello"}
    (forced,), _, summary = build(tmp_path, chat_tok, [row], chat_template="alpaca")
    assert summary.template == "alpaca" and trained_text(chat_tok, forced) == ["Hello</s>"]
    (custom,), _, summary = build(tmp_path, tok, [row], chat_template=TINY_CHAT_TEMPLATE)
    assert summary.template == "chat template"
    assert tok.decode(custom["input_ids"]) == "<s><|user|>\nHi\n<|assistant|>\nHello</s>\n"


def test_completion_trains_everything(tmp_path, tok):
    (s,), _, summary = build(tmp_path, tok, [{"body": "plain text here"}], format="completion", text_field="body")
    assert tok.decode(s["input_ids"]) == "<s>plain text here</s>"
    assert s["labels"][0] == IGNORE_INDEX and s["labels"][1:] == s["input_ids"][1:]
    assert summary.data_format == "completion" and summary.template == "none"


def test_train_on_all(tmp_path, tok):
    (s,), _, summary = build(tmp_path, tok, [{"instruction": "a", "output": "b"}], train_on="all")
    assert s["labels"][0] == IGNORE_INDEX and s["labels"][1:] == s["input_ids"][1:]  # token 0 is never predicted
    assert summary.trained_tokens == summary.tokens - 1


def test_auto_detection_and_error():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["id", "conversations"]) == "sharegpt"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["text", "meta"]) == "completion"
    assert detect_format(["body"], text_field="body") == "completion"
    with pytest.raises(QloraError, match=r"\['prompt', 'reply'\]"):
        detect_format(["prompt", "reply"])


def test_bad_rows_name_the_row(tmp_path, tok):
    with pytest.raises(QloraError, match=r"row 1: alpaca row has no 'output'"):
        build(tmp_path, tok, [{"instruction": "a", "output": "b"}, {"instruction": "a"}], format="alpaca")
    bad_turn = {"conversations": [{"from": "robot", "value": "x"}]}
    with pytest.raises(QloraError, match="row 0: turn"):
        build(tmp_path, tok, [bad_turn])


# ---------------------------------------------------------------- limits and files


def test_truncation_and_drop_counts(tmp_path, tok):
    short = {"instruction": "Hi", "output": "Hello"}
    long_answer = {"instruction": "Hi", "output": "word " * 200}
    long_prompt = {"instruction": "word " * 200, "output": "ok"}
    rows = [short, long_answer, long_prompt]
    train, _, summary = build(tmp_path, tok, rows, max_seq_len=64)
    assert summary.rows == 3 and summary.truncated == 2 and summary.dropped == 1
    assert len(train) == 2 and max(len(s["input_ids"]) for s in train) == 64
    assert "truncated  2" in summary.format() and "dropped    1" in summary.format()


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n')
    with pytest.raises(QloraError, match=rf"{path}:3: not valid JSON"):
        build_datasets(DataConfig(path=str(path)), tok, 0, None)


def test_missing_file_names_path(tok, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(QloraError, match=f"data file '{missing}' not found"):
        build_datasets(DataConfig(path=str(missing)), tok, 0, None)


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_other_file_types(tmp_path, tok, suffix):
    import datasets

    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(4)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path))
    train, _, summary = build_datasets(DataConfig(path=str(path), eval_split=0.0), tok, 0, None)
    assert summary.rows == 4 and [trained_text(tok, s) for s in train] == [[f"{i}</s>"] for i in range(4)]


# ---------------------------------------------------------------- cache and eval split


def test_cache_reuses_tokenized_data(tmp_path, tok):
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(20)]
    first = build(tmp_path, tok, rows, cache=True)
    assert not first[2].from_cache
    assert len(os.listdir(tmp_path / "cache")) == 1
    second = build(tmp_path, tok, rows, cache=True)  # rewrites the file: same bytes, new mtime
    assert not second[2].from_cache
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), eval_split=0.0)
    third = build_datasets(cfg, tok, 0, tmp_path / "cache")
    assert third[2].from_cache and "cached" in third[2].format()
    assert third[0] == first[0] and third[2].truncated == first[2].truncated
    # anything that changes tokens misses the cache
    cfg.max_seq_len = 300
    assert not build_datasets(cfg, tok, 0, tmp_path / "cache")[2].from_cache


def test_cache_hit_does_not_tokenize(tmp_path, tok, monkeypatch):
    rows = [{"instruction": "a", "output": "b"}]
    build(tmp_path, tok, rows, cache=True)

    def refuse(*a, **k):
        raise AssertionError("tokenizer called on a cache hit")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), eval_split=0.0)
    train, _, summary = build_datasets(cfg, tok, 0, tmp_path / "cache")
    assert summary.from_cache and len(train) == 1


def test_eval_split_sizes_and_seed(tmp_path, tok):
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(40)]
    train, ev, summary = build(tmp_path, tok, rows, eval_split=0.1)
    assert (len(train), len(ev)) == (36, 4) and (summary.train_samples, summary.eval_samples) == (36, 4)
    again = build(tmp_path, tok, rows, eval_split=0.1)
    assert again[1] == ev
    assert {tuple(s["input_ids"]) for s in train}.isdisjoint(tuple(s["input_ids"]) for s in ev)


def test_eval_path(tmp_path, tok):
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "e", "output": "f"}] * 3)
    rows = [{"instruction": "a", "output": "b"}] * 5
    train, ev, summary = build(tmp_path, tok, rows, eval_split=0.5, eval_path=str(tmp_path / "eval.jsonl"))
    assert (len(train), len(ev)) == (5, 3) and summary.eval_samples == 3


def test_max_samples(tmp_path, tok):
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(10)]
    train, _, summary = build(tmp_path, tok, rows, max_samples=4)
    assert summary.rows == 4 and len(train) == 4


def test_tokenize_rows_counts_are_per_call(tok):
    rows = [{"instruction": "x " * 50, "output": "y"}]
    samples, counts = tokenize_rows(rows, "alpaca", tok, "alpaca", "responses", 16, "text", "mem")
    assert samples == [] and counts == {"truncated": 1, "dropped": 1}


def test_hub_path_uses_datasets(tmp_path, tok, monkeypatch):
    import datasets

    rows = [{"instruction": "a", "output": "b"}] * 3
    calls = []

    def fake_load(name, split):  # no network in tests: stand in for the Hub
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(path="someone/some-data", split="train[:3]", eval_split=0.0)
    train, _, summary = build_datasets(cfg, tok, 0, tmp_path / "cache")
    assert calls == [("someone/some-data", "train[:3]")] and len(train) == 3
    assert build_datasets(cfg, tok, 0, tmp_path / "cache")[2].from_cache  # keyed on the fingerprint

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(QloraError, match="could not load Hub data set 'someone/other'"):
        build_datasets(DataConfig(path="someone/other"), tok, 0, None)


def test_segment_fallback_matches_offsets(tok):
    from qlora_lite.data.dataset import encode_with_spans
    from qlora_lite.data.templates import render_alpaca

    text, spans = render_alpaca([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}], "</s>")
    fast = encode_with_spans(tok, [text], [spans])

    class NoOffsets:  # a pure-Python tokenizer has no offset mapping
        def __call__(self, texts, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError
            return tok(texts, **kwargs)

    assert encode_with_spans(NoOffsets(), [text], [spans]) == fast
