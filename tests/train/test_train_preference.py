"""DPO and ORPO runs through `train()` and the CLI on the tiny model: what SFT runs promise
(exact resume, Ctrl-C saves, export and generate) and what preference runs add (TRL's metric
names, the recorded reference, precomputed reference log-probs). The objectives' numbers
against TRL are in test_objectives.py."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import losses, make_recipe, pair_recipe
from test_train import cli

from qlora_lite.errors import QloraError
from qlora_lite.runs.checkpoint import checkpoint_dirs
from qlora_lite.train.loop import train
from qlora_lite.train.reference import REFERENCE_LOGPS_FILE

pytestmark = pytest.mark.slow

DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def crash_after(src: Path, dst: Path, step: int) -> None:
    """`dst` = the run folder `src` as it stood right after step `step`'s checkpoint."""
    shutil.copytree(src, dst)
    for d in checkpoint_dirs(dst):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    shutil.rmtree(dst / "adapter")


def assert_same_metrics(a, b, tol=1e-5):
    ra = {(r["step"], "eval_loss" in r): r for r in records(a)}
    rb = {(r["step"], "eval_loss" in r): r for r in records(b)}
    assert ra.keys() == rb.keys()
    for k, r in ra.items():
        for name in DPO_KEYS | {"loss"}:
            key = f"eval_{name}" if k[1] else name
            assert r[key] == pytest.approx(rb[k][key], abs=tol), (k, key, r[key], rb[k][key])


def test_a_dpo_run_logs_trls_metrics_and_resumes_to_the_same_numbers(pairs_file, tmp_path):
    straight = train(pair_recipe(pairs_file, tmp_path / "a"))
    assert straight["objective"] == "dpo" and straight["eval_perplexity"] is None
    assert {f"eval_{k}" for k in DPO_KEYS} <= set(straight)
    recs = records(tmp_path / "a")
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10] and [r["step"] for r in evals] == [5, 10]
    for r in steps:
        assert DPO_KEYS <= set(r) and 0 <= r["rewards/accuracies"] <= 1
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    assert {f"eval_{k}" for k in DPO_KEYS} <= set(evals[-1])
    ref = json.loads((tmp_path / "a/reference.json").read_text())
    assert ref["reference"] == "base" and ref["precomputed"] is False
    # A crash right after step 5's checkpoint: the resume must finish on the same numbers.
    crash_after(tmp_path / "a", tmp_path / "b", 5)
    resumed = train(pair_recipe(pairs_file, tmp_path / "b"), resume=True)
    assert_same_metrics(tmp_path / "a", tmp_path / "b")
    assert resumed["eval_rewards/margins"] == pytest.approx(straight["eval_rewards/margins"], abs=1e-5)


def test_an_orpo_run_logs_its_terms_and_needs_no_reference(pairs_file, tmp_path):
    s = train(pair_recipe(pairs_file, tmp_path / "r", objective="orpo", beta=0.1, max_steps=4, eval_every=4,
                          log_every=1))  # one step a record: its terms add up exactly
    steps = [r for r in records(tmp_path / "r") if "loss" in r]
    for r in steps:
        assert {"nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"} <= set(r)
        # ORPO's loss is NLL(chosen) - beta * mean(logsigmoid(log odds)), TRL's logged log_odds_ratio.
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.1 * r["log_odds_ratio"], rel=1e-4)
    assert s["objective"] == "orpo" and "eval_nll_loss" in s
    assert not (tmp_path / "r/reference.json").exists()


def test_init_from_is_the_frozen_reference_and_a_changed_one_stops_the_resume(data_file, pairs_file, tmp_path):
    train(make_recipe(data_file, tmp_path / "sft", max_steps=3, eval_every=0, save_every=0))
    recipe = pair_recipe(pairs_file, tmp_path / "dpo", lora={"init_from": str(tmp_path / "sft")}, log_every=1,
                         max_steps=4, save_every=2, eval_every=0)
    train(recipe)
    ref = json.loads((tmp_path / "dpo/reference.json").read_text())
    assert ref["reference"] == "adapter" and ref["adapter"] == str(tmp_path / "sft/adapter") and ref["sha256"]
    first = records(tmp_path / "dpo")[0]
    # The policy starts as the SFT adapter: against that reference its first rewards are 0, where
    # against the bare base they would not be (the SFT adapter moved the log-probs).
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
    crash_after(tmp_path / "dpo", tmp_path / "again", 2)
    train(make_recipe(data_file, tmp_path / "sft", max_steps=3, eval_every=0, save_every=0, seed=4), overwrite=True)
    with pytest.raises(QloraError, match="the DPO reference changed"):
        train(pair_recipe(pairs_file, tmp_path / "again", lora={"init_from": str(tmp_path / "sft")}, log_every=1,
                          max_steps=4, save_every=2, eval_every=0), resume=True)


def test_precomputed_reference_logps_train_the_same_and_are_reused_on_resume(pairs_file, tmp_path):
    live = train(pair_recipe(pairs_file, tmp_path / "live", max_steps=6, eval_every=6, save_every=3))
    pre = train(pair_recipe(pairs_file, tmp_path / "pre", max_steps=6, eval_every=6, save_every=3,
                            precompute_reference=True))
    assert json.loads((tmp_path / "pre/reference.json").read_text())["precomputed"] is True
    la, lb = losses(tmp_path / "live"), losses(tmp_path / "pre")
    # Reference log-probs from other batches (other padding) differ by bf16 rounding only.
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 2e-3 for s in la), (la, lb)
    assert pre["eval_loss"] == pytest.approx(live["eval_loss"], abs=2e-3)
    crash_after(tmp_path / "pre", tmp_path / "b", 3)
    cached = tmp_path / "b" / REFERENCE_LOGPS_FILE
    before = cached.stat().st_mtime_ns
    train(pair_recipe(pairs_file, tmp_path / "b", max_steps=6, eval_every=6, save_every=3,
                      precompute_reference=True), resume=True)
    assert cached.stat().st_mtime_ns == before  # read, not computed again
    assert_same_metrics(tmp_path / "pre", tmp_path / "b")


def test_packed_pairs_with_offload_and_tiled_mlp_resume_exactly_and_train_as_plain(pairs_file, tmp_path):
    """The long-context techniques work for pairs as for SFT: offloaded checkpoints and the tiled
    MLP under packed pairs and the chunked log-probs, exact on resume, close to the plain run."""

    def recipe(out, **model):
        r = pair_recipe(pairs_file, out, max_steps=6, micro_batch_size=2, save_every=3, eval_every=6, log_every=1,
                        loss_chunk_size=16)
        return replace(r, model=replace(r.model, **model), data=replace(r.data, packing=True))

    both = {"offload_activations": True, "tiled_mlp": 3}
    straight = train(recipe(tmp_path / "a", **both))
    plain = train(recipe(tmp_path / "p"))
    crash_after(tmp_path / "a", tmp_path / "b", 3)
    train(recipe(tmp_path / "b", **both), resume=True)
    assert_same_metrics(tmp_path / "a", tmp_path / "b")
    a, p = losses(tmp_path / "a"), losses(tmp_path / "p")
    # Step 1 is exact (B = 0: policy = reference, log 2); later steps differ by the tiles' bf16 rounding.
    assert a[1] == pytest.approx(0.6931, abs=1e-4) and a == pytest.approx(p, rel=0.05, abs=0.01)
    assert straight["eval_rewards/accuracies"] == pytest.approx(plain["eval_rewards/accuracies"], abs=0.15)


def test_ctrl_c_saves_a_dpo_run_and_export_and_generate_take_its_adapter(pairs_file, tmp_path):
    recipe = tmp_path / "dpo.yaml"
    r = pair_recipe(pairs_file, tmp_path / "r", max_steps=400, save_every=0, eval_every=0, log_every=1)
    recipe.write_text(yaml.safe_dump(r.to_dict()))
    p = cli("run", str(recipe))
    for line in p.stdout:
        if line.startswith("step") and "acc" in line:
            p.send_signal(signal.SIGINT)
            break
    out = p.stdout.read()
    assert p.wait(timeout=120) == 130, out
    kept = checkpoint_dirs(tmp_path / "r")
    assert len(kept) == 1 and "interrupted" in out
    step = int(kept[0].name.split("-")[1])
    p = cli("run", str(recipe), "--resume", "--set", f"train.max_steps={step + 1}")
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0, out
    assert "resumed from" in out and json.loads((tmp_path / "r/summary.json").read_text())["steps"] == step + 1
    p = cli("export", str(tmp_path / "r"), "--out", str(tmp_path / "merged"), "--verify")
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0 and "verify" in out.lower(), out
    p = cli("generate", str(tmp_path / "r"), "--prompt", "What is the capital of Peru?", "--max-new-tokens", "4")
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0 and out.strip(), out
