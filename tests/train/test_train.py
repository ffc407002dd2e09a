"""The training loop through `train()` and the real CLI: resume equality, Ctrl-C, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import losses, make_recipe

from qlora_lite.errors import QloraError
from qlora_lite.recipe import recipe_from_dict
from qlora_lite.runs.checkpoint import checkpoint_dirs
from qlora_lite.train.loop import train
from qlora_lite.train.step import NonFiniteLoss
from qlora_lite.train.stopping import StopFlag

pytestmark = pytest.mark.slow  # whole training runs: `make test` only, not `make test-fast`

REPO = Path(__file__).resolve().parents[2]


def test_resume_gives_the_same_losses_as_a_straight_run(data_file, tmp_path):
    # log_every=2 with a checkpoint at step 5: the resumed run must finish the open log window.
    straight = train(make_recipe(data_file, tmp_path / "a", keep_last=5, log_every=2))
    assert straight["steps"] == 10 and (tmp_path / "a/adapter/adapter_model.safetensors").is_file()
    assert [p.name for p in checkpoint_dirs(tmp_path / "a")] == ["step-5", "step-10"]
    # A crash right after step 5's checkpoint: the run folder as it stood then.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/step-10")
    shutil.rmtree(tmp_path / "b/adapter")
    resumed = train(make_recipe(data_file, tmp_path / "b", keep_last=5, log_every=2), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10]
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, [(s, a[s], b[s]) for s in a]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-5)


def test_summary_and_metrics_files(data_file, tmp_path):
    s = train(make_recipe(data_file, tmp_path / "r", max_steps=4, save_every=0, eval_every=0))
    on_disk = json.loads((tmp_path / "r/summary.json").read_text())
    assert on_disk["steps"] == 4 and on_disk["eval_loss"] == s["eval_loss"] and s["eval_perplexity"] > 1
    assert on_disk["adapter_bytes"] == (tmp_path / "r/adapter/adapter_model.safetensors").stat().st_size
    recs = [json.loads(line) for line in open(tmp_path / "r/metrics.jsonl")]
    train_recs = [r for r in recs if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"} <= set(train_recs[0])
    assert "eval_perplexity" in recs[-1]
    assert (tmp_path / "r/recipe.yaml").is_file() and (tmp_path / "r/data_summary.json").is_file()
    assert not checkpoint_dirs(tmp_path / "r")
    card = (tmp_path / "r/adapter/README.md").read_text()
    assert "base_model: qlora-lite:tiny-llama" in card and "4 steps" in card


def test_a_second_run_into_the_same_folder_is_refused(data_file, tmp_path):
    train(make_recipe(data_file, tmp_path / "r", max_steps=1, eval_every=0))
    with pytest.raises(QloraError, match="--resume"):
        train(make_recipe(data_file, tmp_path / "r", max_steps=1))
    with pytest.raises(QloraError, match="no checkpoint"):
        train(make_recipe(data_file, tmp_path / "fresh", max_steps=1), resume=True)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(data_file, tmp_path):
    # An absurd learning rate overflows the bf16 adapters within a few steps.
    r = make_recipe(data_file, tmp_path / "r", max_steps=30, lr=1e30, warmup_steps=0, save_every=1,
                    max_grad_norm=0.0, optimizer="adamw")
    with pytest.raises(NonFiniteLoss, match=r"at step \d+") as e:
        train(r)
    step = int(str(e.value).split("at step ")[1].split(";")[0])
    kept = checkpoint_dirs(tmp_path / "r")
    assert kept and kept[-1].name == f"step-{step - 1}"
    assert not (tmp_path / "r/adapter").exists()


def cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qlora_lite.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def write_recipe(tmp_path, data_file, out, **train):
    import yaml

    r = make_recipe(data_file, out, **train)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r.to_dict()))
    return str(path)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(data_file, tmp_path):
    recipe = write_recipe(tmp_path, data_file, tmp_path / "r", max_steps=400, save_every=0, eval_every=0)
    p = cli("run", recipe)
    for line in p.stdout:
        if line.startswith("step") and "loss" in line:
            p.send_signal(signal.SIGINT)
            break
    out = p.stdout.read()
    assert p.wait(timeout=120) == 130, out
    kept = checkpoint_dirs(tmp_path / "r")
    assert len(kept) == 1 and "interrupted" in out
    step = int(kept[0].name.split("-")[1])
    assert step >= 1
    p = cli("run", recipe, "--resume", "--set", f"train.max_steps={step + 2}")
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0, out
    assert "resumed from" in out and json.loads((tmp_path / "r/summary.json").read_text())["steps"] == step + 2


class CtrlCDuringTheAllReduce:
    """A world whose all-reduce is where Ctrl-C lands: the signal reaches this process while the
    call runs, as it does when ranks wait for each other in the collective."""

    def max(self, value: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before this returns
        return value


def test_a_ctrl_c_that_lands_in_the_all_reduce_is_kept_for_the_next_step():
    with StopFlag() as interrupt:
        world = CtrlCDuringTheAllReduce()
        assert not interrupt.agreed(world)  # the ranks agreed before this Ctrl-C...
        assert interrupt.requested  # ...and it is not erased by their answer
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still aborts
            interrupt.agreed(world)


def test_cli_end_to_end_and_clear_errors(data_file, tmp_path):
    recipe = write_recipe(tmp_path, data_file, tmp_path / "r", max_steps=3, eval_every=0, save_every=0)
    p = cli("run", recipe, "--set", "train.lr=5e-4")
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0, out
    assert "trainable" in out and "eval loss" in out and "truncated" in out
    import yaml

    assert yaml.safe_load((tmp_path / "r/recipe.yaml").read_text())["train"]["lr"] == 5e-4
    p = cli("run", recipe, "--set", "train.lrr=1")
    out = p.stdout.read()
    assert p.wait(timeout=60) == 2 and "Did you mean `lr`" in out and "Traceback" not in out


def test_resume_refuses_changed_training_settings(data_file, tmp_path):
    train(make_recipe(data_file, tmp_path / "r", max_steps=5, eval_every=0))
    with pytest.raises(QloraError, match=r"train.lr is 0.002 but the run was started with 0.001"):
        train(make_recipe(data_file, tmp_path / "r", max_steps=8, lr=2e-3), resume=True)
    assert "lr: 0.001" in (tmp_path / "r/recipe.yaml").read_text()  # the record is kept
    s = train(make_recipe(data_file, tmp_path / "r", max_steps=7, eval_every=0), resume=True)
    assert s["steps"] == 7


def test_resume_with_more_steps_takes_the_longer_schedules_lr(data_file, tmp_path):
    # Cosine without warmup, checkpoint at step 2: a 4-step curve gives step 3 half the peak lr,
    # an 8-step one 0.85 of it. Resumed to 8 steps, step 3 must take the 8-step curve's lr.
    from qlora_lite.train.optim import lr_lambda
    from qlora_lite.train.setup import setup_run

    short = dict(warmup_steps=0, save_every=2, eval_every=0, keep_last=5)
    train(make_recipe(data_file, tmp_path / "r", max_steps=4, **short))
    shutil.rmtree(tmp_path / "r/checkpoints/step-4")
    saved = torch.load(tmp_path / "r/checkpoints/step-2/optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
    assert saved == pytest.approx(1e-3 * lr_lambda("cosine", 0, 4)(2)) == pytest.approx(0.5e-3)
    # Resumed with its own length: the saved lr, bit for bit (exact resume).
    run = setup_run(make_recipe(data_file, tmp_path / "r", max_steps=4, **short), resume=True)
    assert run.state.step == 2 and run.optimizer.param_groups[0]["lr"] == saved
    del run
    run = setup_run(make_recipe(data_file, tmp_path / "r", max_steps=8, **short), resume=True)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda("cosine", 0, 8)(2), rel=1e-12)


def test_overwrite_deletes_only_run_folders(data_file, tmp_path):
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    with pytest.raises(QloraError, match="not a qlora-lite run folder"):
        train(make_recipe(data_file, keep, max_steps=1), overwrite=True)
    assert (keep / "precious.txt").exists()
    train(make_recipe(data_file, tmp_path / "r", max_steps=1, eval_every=0))
    s = train(make_recipe(data_file, tmp_path / "r", max_steps=2, eval_every=0), overwrite=True)
    assert s["steps"] == 2


def test_fp32_adapters_train_and_save_in_fp32(data_file, tmp_path):
    import torch
    from safetensors.torch import load_file

    r = make_recipe(data_file, tmp_path / "r", max_steps=2, eval_every=0)
    r.lora.dtype = "float32"
    s = train(r)
    tensors = load_file(tmp_path / "r/adapter/adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert s["train_loss"] is not None and s["train_loss"] < 20
