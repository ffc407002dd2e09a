"""The run folder's own record across restarts: events.jsonl, data_fingerprint.json, and what
`--resume auto` makes of a folder."""

from __future__ import annotations

import json

import pytest

from qlora_lite.errors import QloraError
from qlora_lite.recipe import DataConfig
from qlora_lite.runs.events import read_events, record_event
from qlora_lite.runs.fingerprint import check_data, data_changes, data_fingerprint, write_fingerprint
from qlora_lite.runs.folder import resolve_resume


class Tokenizer:
    """What the fingerprint reads of a tokenizer: no backend, a vocabulary, special tokens."""

    backend_tokenizer = None
    bos_token, eos_token, chat_template = "<s>", "</s>", None

    def __init__(self, vocab=None):
        self.vocab = vocab or {"a": 0, "b": 1}

    def get_vocab(self):
        return self.vocab


def test_events_are_appended_one_line_each_and_a_cut_line_is_skipped(tmp_path):
    record_event(tmp_path, "start", 0, world_size=2)
    record_event(tmp_path, "stop", 12, reason="SIGTERM", checkpoint="c/step-12")
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"time": "2026-')  # kill -9 in the middle of a write
    events = read_events(tmp_path)
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("stop", 12)]
    assert events[1]["reason"] == "SIGTERM" and events[0]["world_size"] == 2
    assert {"time", "pid", "host"} <= set(events[0]) and events[0]["time"].endswith("Z")
    assert read_events(tmp_path / "none") == []


def data(tmp_path, name="rows.jsonl", text='{"instruction": "a", "output": "b"}\n'):
    path = tmp_path / name
    path.write_text(text)
    return DataConfig(path=str(path), format="alpaca")


def test_data_that_moved_with_the_same_content_is_no_change(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    saved = data_fingerprint(data(tmp_path / "a"), Tokenizer())
    assert data_changes(saved, data_fingerprint(data(tmp_path / "b"), Tokenizer())) == []
    assert saved["files"][0]["size"] == 36 and len(saved["files"][0]["sha256"]) == 64


def test_an_edited_data_file_is_named_with_its_old_and_new_size_and_hash(tmp_path):
    saved = data_fingerprint(data(tmp_path), Tokenizer())
    now = data_fingerprint(data(tmp_path, text='{"instruction": "a", "output": "c"}\n{"x": 1}\n'), Tokenizer())
    [change] = data_changes(saved, now)
    assert f"data.path {str(tmp_path / 'rows.jsonl')!r} changed: it now has 45 bytes" in change
    assert f"the run read 36 bytes, sha256 {saved['files'][0]['sha256'][:12]}" in change


def test_a_changed_tokenizer_or_a_new_eval_file_is_a_change(tmp_path):
    cfg = data(tmp_path)
    saved = data_fingerprint(cfg, Tokenizer())
    assert "the tokenizer changed" in data_changes(saved, data_fingerprint(cfg, Tokenizer({"a": 1, "b": 0})))[0]
    data(tmp_path, "eval.jsonl")
    cfg.eval_path = str(tmp_path / "eval.jsonl")
    assert "data.eval_path" in data_changes(saved, data_fingerprint(cfg, Tokenizer()))[0]


def test_a_resume_on_changed_data_is_refused_with_the_way_out_unless_accepted(tmp_path, capsys):
    run = tmp_path / "run"
    write_fingerprint(run, data_fingerprint(data(tmp_path), Tokenizer()))
    now = data_fingerprint(data(tmp_path, text="{}\n"), Tokenizer())
    with pytest.raises(QloraError) as e:
        check_data(run, now, accept=False)
    msg = str(e.value)
    assert msg.startswith("--resume: the data changed since the run started: data.path")
    assert "--set output.dir=runs/NEW" in msg and "--accept-changed-data" in msg
    [accepted] = check_data(run, now, accept=True)
    assert "changed" in accepted
    assert check_data(tmp_path / "old-run", now, accept=False) == []  # no record: nothing to check
    assert "cannot be checked" in capsys.readouterr().err


def test_a_hub_data_set_is_recorded_by_id_and_said_to_be_unchecked(tmp_path, capsys):
    hub = data_fingerprint(DataConfig(path="org/set", format="alpaca"), Tokenizer())
    assert hub["files"] == [{"role": "data.path", "hub": "org/set", "split": "train"}]
    write_fingerprint(tmp_path, hub)
    assert check_data(tmp_path, hub, accept=False) == []
    assert "Hub data set: whether its content changed since the run started cannot be checked" in capsys.readouterr().err


def test_resume_auto_starts_an_empty_folder_resumes_a_stopped_run_and_refuses_a_finished_one(tmp_path):
    assert resolve_resume(tmp_path / "new", "auto") is False
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("{}")
    assert resolve_resume(run, "auto") is False  # stopped before its first checkpoint: nothing to lose
    (run / "checkpoints/step-3").mkdir()
    assert resolve_resume(run, "auto") is True
    (run / "summary.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(QloraError, match=r"--resume auto: .* holds a finished run \(summary.json, adapter/\)"):
        resolve_resume(run, "auto")
    assert resolve_resume(run, True) is True and resolve_resume(run, False) is False


def test_resume_auto_never_starts_over_someone_elses_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QloraError, match="not a qlora-lite run .*refusing to start a run over them"):
        resolve_resume(tmp_path, "auto")
