"""Samples while it trains: samples.jsonl, the console, TensorBoard's text, the timing, and no effect on training."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import losses, make_recipe

from qlora_lite.errors import QloraError
from qlora_lite.recipe import RecipeError, recipe_from_dict
from qlora_lite.train.loop import train

pytestmark = pytest.mark.slow  # whole training runs: `make test` only, not `make test-fast`

PROMPTS = ["What is the capital of France?", "Name a colour."]


def samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "samples.jsonl")]


def test_sample_prompts_are_answered_before_training_and_at_every_eval(data_file, tmp_path, capsys):
    s = train(make_recipe(data_file, tmp_path / "r", max_steps=4, eval_every=2, save_every=0,
                          sample_prompts=PROMPTS, sample_max_new_tokens=5))
    rows = samples(tmp_path / "r")
    assert [(r["step"], r["index"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(r["prompt"] == PROMPTS[r["index"]] and 1 <= r["new_tokens"] <= 5 for r in rows)
    assert all(isinstance(r["completion"], str) and r["seconds"] >= 0 for r in rows)
    out = capsys.readouterr()
    assert "step     2  sample 0:" in out.out + out.err and "(eval " in out.out + out.err
    recs = [json.loads(line) for line in open(tmp_path / "r/metrics.jsonl")]
    evals = {r["step"]: r for r in recs if "sample_seconds" in r}
    assert sorted(evals) == [0, 2, 4]
    assert "eval_seconds" not in evals[0] and evals[2]["eval_seconds"] > 0 and "eval_loss" in evals[4]
    train_recs = [r for r in recs if "loss" in r]
    assert all("sample_seconds" not in r and "eval_seconds" not in r for r in train_recs)
    assert s["sample_time_s"] == pytest.approx(sum(r["sample_seconds"] for r in evals.values()), abs=0.02)
    assert s["eval_time_s"] > 0


def test_a_run_with_samples_trains_exactly_like_one_without(data_file, tmp_path):
    # Dropout is on (make_recipe's lora.dropout 0.1): sampling must not draw from its RNG.
    train(make_recipe(data_file, tmp_path / "a", max_steps=4, eval_every=2, save_every=0))
    train(make_recipe(data_file, tmp_path / "b", max_steps=4, eval_every=2, save_every=0, sample_prompts=PROMPTS,
                      sample_max_new_tokens=4, sample_temperature=0.8))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_number_takes_the_first_eval_rows_prompts_and_resume_cuts_samples_back(data_file, tmp_path):
    train(make_recipe(data_file, tmp_path / "r", max_steps=4, eval_every=2, save_every=2, sample_prompts=1,
                      sample_max_new_tokens=3))
    first = samples(tmp_path / "r")
    assert [r["step"] for r in first] == [0, 2, 4] and "### Instruction" in first[0]["prompt"]
    # A crash after step 2's checkpoint with step 4 logged: the resumed run writes step 4 once.
    shutil.rmtree(tmp_path / "r/checkpoints/step-4")
    shutil.rmtree(tmp_path / "r/adapter")
    train(make_recipe(data_file, tmp_path / "r", max_steps=4, eval_every=2, save_every=2, sample_prompts=1,
                      sample_max_new_tokens=3), resume=True)
    again = samples(tmp_path / "r")
    assert [r["step"] for r in again] == [0, 2, 4] and again[:2] == first[:2]


def test_sample_prompts_from_eval_rows_need_an_eval_split(data_file, tmp_path):
    recipe = make_recipe(data_file, tmp_path / "r", max_steps=1, sample_prompts=2)
    recipe.data.eval_split = 0.0
    with pytest.raises(QloraError, match="train.sample_prompts: 2 asks for the prompts of 2 eval rows"):
        train(recipe)


@pytest.mark.parametrize("bad", [[""], "hello", -1, [3], True])
def test_sample_prompts_must_be_prompts_or_a_row_count(bad):
    with pytest.raises(RecipeError, match="train.sample_prompts must be a list of non-empty prompts"):
        recipe_from_dict({"model": {"name_or_path": "x"}, "data": {"path": "d.jsonl"},
                          "train": {"sample_prompts": bad}})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed: pip install 'qlora-lite[tensorboard]'")
def test_tensorboard_gets_the_samples_as_text_at_their_steps(data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_recipe(data_file, tmp_path / "r", max_steps=2, eval_every=2, save_every=0, sample_prompts=PROMPTS,
                      sample_max_new_tokens=3, report_to=["tensorboard"]))
    acc = EventAccumulator(str(tmp_path / "r/tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("samples/text_summary")
    assert [e.step for e in events] == [0, 2]
    rows = {r["step"]: r for r in samples(tmp_path / "r") if r["index"] == 1}
    text = events[-1].tensor_proto.string_val[0].decode()
    assert "Name a colour." in text and rows[2]["completion"].replace("|", "\\|").replace("\n", "<br>") in text
