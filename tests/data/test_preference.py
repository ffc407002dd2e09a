"""Preference pairs: the four row layouts under both templates, label masks, detection, bad rows, drops, cache."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_jsonl

from qlora_lite.data.dataset import IGNORE_INDEX, build_datasets, detect_format
from qlora_lite.data.preference import build_preference_datasets, detect_pair_format
from qlora_lite.data.templates import render_alpaca
from qlora_lite.errors import QloraError
from qlora_lite.recipe import DataConfig


def build(tmp_path, tokenizer, rows, cache=False, name="pairs.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, rows)
    cfg.setdefault("eval_split", 0.0)
    return build_preference_datasets(DataConfig(path=path, **cfg), tokenizer, seed=0,
                                     cache_dir=tmp_path / "cache" if cache else None)


def labelled(sample) -> list[int]:
    return [t for t in sample["labels"] if t != IGNORE_INDEX]


def prompt_len(sample) -> int:
    return next(i for i, t in enumerate(sample["labels"]) if t != IGNORE_INDEX)


# ---------------------------------------------------------------- formats

TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And of Chile?"},
]
CHOSEN, REJECTED = "Santiago.", "Buenos Aires, I think."
SHAREGPT_TURNS = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                  for m in TURNS]
ROWS = {
    "string prompt": ({"prompt": "And of Chile?", "system": "You are terse.", "chosen": CHOSEN, "rejected": REJECTED},
                      "preference", [TURNS[0], TURNS[3]]),
    "message prompt": ({"prompt": TURNS, "chosen": [{"role": "assistant", "content": CHOSEN}],
                        "rejected": [{"role": "assistant", "content": REJECTED}]}, "preference", TURNS),
    "implicit prompt": ({"chosen": SHAREGPT_TURNS + [{"from": "gpt", "value": CHOSEN}],
                         "rejected": SHAREGPT_TURNS + [{"from": "gpt", "value": REJECTED}]}, "preference", TURNS),
    "hh": ({k: "\n\nHuman: Capital of Peru?\n\nAssistant: Lima.\n\nHuman: And of Chile?\n\nAssistant: " + answer
            for k, answer in (("chosen", CHOSEN), ("rejected", REJECTED))}, "hh", TURNS[1:]),
}


def expected_ids(tokenizer, msgs, chat: bool) -> list[int]:
    """The ids SFT would give the whole conversation: the chat template's text, or BOS + the Alpaca text."""
    if chat:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text, _ = render_alpaca(msgs, tokenizer.eos_token)
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat", [False, True], ids=["alpaca", "chat"])
@pytest.mark.parametrize("layout", list(ROWS))
def test_each_layout_labels_only_the_final_assistant_turn(tmp_path, tok, chat_tok, layout, chat):
    row, fmt, prompt = ROWS[layout]
    tokenizer = chat_tok if chat else tok
    (pair,), _, summary = build(tmp_path, tokenizer, [row])
    assert (summary.data_format, summary.template) == (fmt, "chat template" if chat else "alpaca")
    end = "</s>\n" if chat else "</s>"  # the tiny chat template closes an assistant turn with EOS + newline
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        s = pair[side]
        assert s["input_ids"] == expected_ids(tokenizer, prompt + [{"role": "assistant", "content": answer}], chat)
        assert s["labels"][0] == IGNORE_INDEX
        assert tokenizer.decode(labelled(s)) == answer + end  # not "Lima.", an earlier assistant turn
        assert s["labels"][prompt_len(s):] == s["input_ids"][prompt_len(s):]
    c, r = pair["chosen"], pair["rejected"]
    assert prompt_len(c) == prompt_len(r) and c["input_ids"][:prompt_len(c)] == r["input_ids"][:prompt_len(r)]


def test_hh_transcript_may_start_without_the_blank_line(tmp_path, tok):
    row = {"chosen": "Human: Hi\n\nAssistant: Hello there.", "rejected": "Human: Hi\n\nAssistant: Go away."}
    assert detect_pair_format(row) == "hh"
    (pair,), _, _ = build(tmp_path, tok, [row])
    assert tok.decode(labelled(pair["chosen"])) == "Hello there.</s>"


# ---------------------------------------------------------------- detection and the objective


def test_auto_detection_both_ways():
    assert detect_pair_format(ROWS["string prompt"][0]) == "preference"
    assert detect_pair_format(ROWS["implicit prompt"][0]) == "preference"
    assert detect_pair_format(ROWS["hh"][0]) == "hh"
    assert detect_pair_format({"prompt": "Human: x", "chosen": "\n\nAssistant: a", "rejected": "b"}) == "preference"
    pairs_in_sft = r"preference pairs \(columns \['chosen', 'rejected'\].*train.objective: dpo or orpo"
    with pytest.raises(QloraError, match=pairs_in_sft):
        detect_format(["chosen", "rejected"])
    with pytest.raises(QloraError, match="dpo or orpo, or data.format: messages"):
        detect_format(["prompt", "chosen", "rejected", "messages"])
    sft_in_pairs = r"needs chosen and rejected columns; the data has \['instruction', 'output'\].*train.objective: sft"
    with pytest.raises(QloraError, match=sft_in_pairs):
        detect_pair_format({"instruction": "a", "output": "b"})


def test_each_objective_refuses_the_other_kind_of_data(tmp_path, tok):
    sft_path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    pair_path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS["hh"][0]])
    with pytest.raises(QloraError, match="holds preference pairs.*train.objective: dpo or orpo"):
        build_datasets(DataConfig(path=pair_path), tok, 0, None)
    with pytest.raises(QloraError, match="data.format: hh holds preference pairs; set train.objective: dpo or orpo"):
        build_datasets(DataConfig(path=pair_path, format="hh"), tok, 0, None)
    with pytest.raises(QloraError, match=r"needs chosen and rejected columns.*\['instruction', 'output'\]"):
        build_preference_datasets(DataConfig(path=sft_path), tok, 0, None)
    with pytest.raises(QloraError, match="data.format: alpaca is SFT data.*preference or hh.*train.objective: sft"):
        build_preference_datasets(DataConfig(path=sft_path, format="alpaca"), tok, 0, None)


# ---------------------------------------------------------------- bad rows

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
HH_B = "\n\nHuman: q\n\nAssistant: b"
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "auto", r"row 1: no 'rejected' field \(fields: \['chosen', 'prompt'\]\)"),
    ({"prompt": "p", "rejected": "b", "chosen": None}, "auto", "row 1: no 'chosen' field"),
    ({"chosen": "a", "rejected": "b"}, "preference", "row 1: no 'prompt' field, which string chosen/rejected need"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "auto", "row 1: 'prompt' must be a string or a list of messages"),
    ({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}, "auto", "row 1: 'chosen' must be a string or a list"),
    ({"prompt": "p", "chosen": "a", "rejected": " \n"}, "auto", "row 1: 'rejected' has an empty completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "system": 7}, "auto", "row 1: 'system' must be a string, got int"),
    ({"prompt": "p", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}, "auto",
     "row 1: 'chosen' turn .* needs a role"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}],
      "rejected": "b"}, "auto", "row 1: 'chosen' must end with an assistant turn .*not a user turn"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}, "preference",
     "row 1: chosen and rejected differ at turn 0 \\(chosen: user 'q1'; rejected: user 'q2'\\)"),
    ({"chosen": "Human: q", "rejected": HH_B}, "hh", "row 1: 'chosen' must end with an assistant"),
    ({"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: a\n\nHuman: r\n\nAssistant: b"}, "hh",
     "row 1: chosen and rejected differ at turn 1 \\(chosen: no such turn before its completion; rejected: assistant"),
    ({"chosen": "q and a", "rejected": HH_B}, "hh", "row 1: 'chosen' is not an HH transcript"),
    ({"chosen": ["x"], "rejected": HH_B}, "hh", "row 1: 'chosen' must be a string, got list"),
]


@pytest.mark.parametrize("row, fmt, message", BAD_ROWS, ids=[m.split(": ", 1)[1][:30] for _, _, m in BAD_ROWS])
def test_bad_rows_name_the_row_and_field_and_write_nothing(tmp_path, tok, row, fmt, message):
    first = ROWS["hh"][0] if fmt == "hh" else GOOD
    with pytest.raises(QloraError, match=message):
        build(tmp_path, tok, [first, row], cache=True, format=fmt)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------- drops, summary, cache, split


def test_identical_and_too_long_pairs_are_dropped_and_counted(tmp_path, tok):
    rows = [
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
        {"prompt": "Hi", "chosen": "word " * 80, "rejected": "short"},
        {"prompt": "Hi", "chosen": "short", "rejected": "word " * 80},
        {"prompt": "Bye", "chosen": "Farewell", "rejected": "Whatever"},
    ]
    train, _, summary = build(tmp_path, tok, rows, max_seq_len=64)
    assert (summary.rows, summary.pairs, summary.identical, summary.too_long) == (5, 2, 1, 2)
    assert [tok.decode(labelled(p["chosen"])) for p in train] == ["Hello</s>", "Farewell</s>"]
    assert summary.longest == max(len(s["input_ids"]) for p in train for s in p.values()) <= 64
    assert summary.tokens == sum(len(s["input_ids"]) for p in train for s in p.values())
    assert summary.completion_tokens == sum(len(labelled(s)) for p in train for s in p.values())
    assert "dropped    1 identical, 2 over max_seq_len=64" in summary.format()
    json.dumps(summary.__dict__)  # the trainer writes it to data_summary.json
    with pytest.raises(QloraError, match=r"no preference pairs left \(2 rows; dropped 1 identical, 1 with a sequence "
                                         "over data.max_seq_len=64\\); raise data.max_seq_len"):
        build(tmp_path, tok, rows[1:3], max_seq_len=64)


def test_cache_round_trip_gives_the_same_pairs(tmp_path, chat_tok):
    rows = [{"prompt": f"Say {i}", "chosen": str(i), "rejected": str(i + 1)} for i in range(12)]
    rows.append(GOOD | {"rejected": "a"})  # identical: the count survives the cache
    first = build(tmp_path, chat_tok, rows, cache=True, eval_split=0.25)
    cfg = DataConfig(path=str(tmp_path / "pairs.jsonl"), eval_split=0.25)
    second = build_preference_datasets(cfg, chat_tok, 0, tmp_path / "cache")
    assert not first[2].from_cache and second[2].from_cache and "cached" in second[2].format()
    assert second[:2] == first[:2] and (len(second[0]), len(second[1])) == (9, 3)
    assert {**second[2].__dict__, "from_cache": False} == first[2].__dict__


def test_a_cache_of_the_other_kind_is_rebuilt(tmp_path, tok, capsys):
    (tmp_path / "p").mkdir()
    pairs_first = build(tmp_path / "p", tok, [GOOD], cache=True)
    sft_path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "p", "output": "a"}])
    sft_cfg = DataConfig(path=sft_path, eval_split=0.0)
    sft_first = build_datasets(sft_cfg, tok, 0, tmp_path / "sft-cache")
    (pair_file,), (sft_file,) = list((tmp_path / "p" / "cache").iterdir()), list((tmp_path / "sft-cache").iterdir())
    assert pair_file.name != sft_file.name  # the kind is in the key

    # Same key shape, other kind: an SFT file where the pairs' cache should be, and the reverse.
    pair_bytes = pair_file.read_bytes()
    shutil.copyfile(sft_file, pair_file)
    pair_cfg = DataConfig(path=str(tmp_path / "p" / "pairs.jsonl"), eval_split=0.0)
    again = build_preference_datasets(pair_cfg, tok, 0, tmp_path / "p" / "cache")
    assert not again[2].from_cache and again[0] == pairs_first[0]
    assert "holds SFT samples, not preference pairs" in capsys.readouterr().err
    pair_file.write_bytes(pair_bytes)
    shutil.copyfile(pair_file, sft_file)
    sft_again = build_datasets(sft_cfg, tok, 0, tmp_path / "sft-cache")
    assert not sft_again[2].from_cache and sft_again[0] == sft_first[0]
    assert "holds preference pairs, not SFT samples" in capsys.readouterr().err


def test_eval_path_and_max_samples(tmp_path, tok):
    write_jsonl(tmp_path / "eval.jsonl", [GOOD, GOOD | {"chosen": "x", "rejected": "x"}])
    rows = [{"prompt": f"Say {i}", "chosen": str(i), "rejected": "no"} for i in range(10)]
    train, ev, summary = build(tmp_path, tok, rows, eval_path=str(tmp_path / "eval.jsonl"), max_samples=4)
    assert (len(train), len(ev), summary.rows, summary.eval_pairs, summary.identical) == (4, 1, 4, 1, 1)
