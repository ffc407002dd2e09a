"""Runs that survive a cluster: SIGTERM/SIGUSR1 to a real `qlora-lite run`, a stop between
micro-batches, a second signal during the save, `--resume auto`, data edited under a resume, and
train.max_time. Each resumed run is compared with an uninterrupted one, loss for loss."""

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
import yaml
from conftest import losses, make_recipe

from qlora_lite.errors import QloraError
from qlora_lite.runs.checkpoint import checkpoint_dirs, read_checkpoint
from qlora_lite.runs.events import read_events
from qlora_lite.runs.lock import LOCK_NAME
from qlora_lite.train import loop
from qlora_lite.train.loop import run_recipe, train
from qlora_lite.train.stopping import Stopped, StopFlag

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Dropout on (make_recipe: 0.1) and two micro-batches per step: a resume is exact only if the
# RNG and the data position are those of the last finished step.
RUN = dict(max_steps=12, save_every=0, eval_every=0, log_every=1, keep_last=5)
TOL = 1e-5


def cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "qlora_lite.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(p, timeout=300):
    out = p.communicate(timeout=timeout)[0]
    return p.returncode, out


def write_recipe(path, recipe):
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return str(path)


def assert_same_losses(a, b):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb), (sorted(la), sorted(lb))
    worst = max(abs(la[s] - lb[s]) for s in la)
    assert worst <= TOL, [(s, la[s], lb[s]) for s in la if abs(la[s] - lb[s]) > TOL]


def signal_at_step(p, sig, step=2):
    """Send `sig` once the run has logged `step`; return everything it printed up to then."""
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("step") and int(line.split()[1]) >= step:
            p.send_signal(sig)
            break
    return "".join(seen)


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_preempted_run_saves_its_last_step_exits_128_plus_the_signal_and_the_same_command_finishes_it(
        data_file, tmp_path, sig, status):
    recipe = write_recipe(tmp_path / "recipe.yaml", make_recipe(data_file, tmp_path / "r", **RUN))
    p = cli("run", recipe, "--resume", "auto")  # a job's first start: an empty folder starts fresh
    head = signal_at_step(p, sig)
    code, out = finished(p, 120)
    out = head + out
    assert code == status, out
    [kept] = checkpoint_dirs(tmp_path / "r")
    step = int(kept.name.split("-")[1])
    assert 2 <= step < RUN["max_steps"]
    assert f"preempted by {sig.name} at step {step}: checkpoint {kept}; resume with: qlora-lite run {recipe} " \
           "--resume auto" in out
    state = json.loads((kept / "trainer_state.json").read_text())
    assert state["step"] == step and state["batch_in_epoch"] == 2 * step  # no part of the next step
    assert max(losses(tmp_path / "r")) == step

    code, out = finished(cli("run", recipe, "--resume", "auto"))  # the requeued job: the same command
    assert code == 0 and f"resumed from {kept}" in out, out
    train(make_recipe(data_file, tmp_path / "straight", **RUN))
    assert_same_losses(tmp_path / "r", tmp_path / "straight")
    events = read_events(tmp_path / "r")
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("stop", step), ("resume", step),
                                                         ("finish", RUN["max_steps"])]
    assert events[1]["reason"] == sig.name and events[1]["checkpoint"] == str(kept)

    code, out = finished(cli("run", recipe, "--resume", "auto"))  # requeued once too often
    assert code == 2 and "holds a finished run" in out and "Traceback" not in out, out


class StopAtPoll(StopFlag):
    """A stop signal that arrives between two micro-batches, at the n-th boundary of the run."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def poll(self, world) -> int:
        self.n -= 1
        if self.n == 0:
            self.code = signal.SIGTERM
        return super().poll(world)


def test_a_stop_between_micro_batches_drops_the_partial_step_and_resumes_exactly(data_file, tmp_path):
    kw = dict(RUN, max_steps=4, grad_accum=4, save_every=1)
    # 3 boundaries per step: the 5th is inside step 2, after two of its four micro-batches.
    with pytest.raises(Stopped) as e:
        train(make_recipe(data_file, tmp_path / "r", **kw), stop=StopAtPoll(5))
    assert e.value.step == 1 and e.value.exit_status == 143
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["step-1"]
    train(make_recipe(data_file, tmp_path / "straight", **kw))
    # The checkpoint is the straight run's step 1, RNG included: the dropped half step left no trace.
    a, b = (read_checkpoint(p / "checkpoints/step-1") for p in (tmp_path / "r", tmp_path / "straight"))
    assert torch.equal(a.rng["torch"], b.rng["torch"]) and a.state["batch_in_epoch"] == 4
    train(make_recipe(data_file, tmp_path / "r", **kw), resume=True)
    assert_same_losses(tmp_path / "r", tmp_path / "straight")


def test_a_second_sigterm_during_the_save_leaves_a_complete_loadable_checkpoint(data_file, tmp_path, monkeypatch):
    import qlora_lite.runs.checkpoint as checkpoint

    step, write = loop.checked_step, checkpoint.atomic_write_bytes

    def signalled_after_step_2(run, micro, stop=None):
        result = step(run, micro, stop)
        if run.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the cluster's first SIGTERM, during step 2
        return result

    def write_under_fire(path, data):
        os.kill(os.getpid(), signal.SIGTERM)  # and another one into every file of the save
        write(path, data)

    monkeypatch.setattr(loop, "checked_step", signalled_after_step_2)
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", write_under_fire)
    recipe = make_recipe(data_file, tmp_path / "r", **RUN)
    assert run_recipe(recipe, recipe_path="r.yaml") == 143
    monkeypatch.undo()
    [kept] = checkpoint_dirs(tmp_path / "r")
    assert kept.name == "step-2" and not list((tmp_path / "r/checkpoints").glob(".*"))
    assert read_checkpoint(kept).state["step"] == 2  # every file whole
    assert train(make_recipe(data_file, tmp_path / "r", **dict(RUN, max_steps=3)), resume=True)["steps"] == 3


def tree(folder: Path) -> dict:
    """Every file's bytes but the lock's (it names the last process that held it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def test_data_edited_under_a_resume_is_refused_clearly_and_the_override_is_recorded(data_file, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    shutil.copy(data_file, data)
    kw = dict(RUN, max_steps=2, save_every=2)
    train(make_recipe(str(data), tmp_path / "r", **kw))
    with open(data, "a") as f:
        f.write(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n")
    before = tree(tmp_path / "r")
    recipe = write_recipe(tmp_path / "recipe.yaml", make_recipe(str(data), tmp_path / "r", **kw))
    code, out = finished(cli("run", recipe, "--resume", "--set", "train.max_steps=4"))
    assert code == 2 and "Traceback" not in out, out
    assert f"error: --resume: the data changed since the run started: data.path {str(data)!r} changed" in out
    assert "--accept-changed-data" in out and "Start a new run" in out
    assert tree(tmp_path / "r") == before  # nothing written, not even recipe.yaml or an event

    s = train(make_recipe(str(data), tmp_path / "r", **dict(kw, max_steps=4)), resume=True, accept_changed_data=True)
    assert s["steps"] == 4
    resume = [e for e in read_events(tmp_path / "r") if e["event"] == "resume"]
    assert len(resume) == 1 and "changed" in resume[0]["accepted_changed_data"][0]

    moved = tmp_path / "elsewhere" / "rows.jsonl"  # another machine's mount, the same bytes
    moved.parent.mkdir()
    shutil.move(data, moved)
    capsys.readouterr()
    s = train(make_recipe(str(moved), tmp_path / "r", **dict(kw, max_steps=6)), resume=True)
    assert s["steps"] == 6 and "changed" not in capsys.readouterr().err
    assert "accepted_changed_data" not in read_events(tmp_path / "r")[-2]
    with pytest.raises(QloraError, match="data changed"):  # the accepted data is what is checked now
        shutil.copy(data_file, moved)
        train(make_recipe(str(moved), tmp_path / "r", **dict(kw, max_steps=8)), resume=True)


def test_max_time_stops_with_a_checkpoint_and_resume_auto_finishes_the_run(data_file, tmp_path):
    kw = dict(RUN, max_steps=6)
    recipe = write_recipe(tmp_path / "recipe.yaml", make_recipe(data_file, tmp_path / "r", **kw, max_time=1))
    code, out = finished(cli("run", recipe, "--resume", "auto"))
    assert code == 75, out  # loading alone takes over a second: one step, then the checkpoint
    [kept] = checkpoint_dirs(tmp_path / "r")
    step = int(kept.name.split("-")[1])
    assert f"stopped by train.max_time at step {step}: checkpoint {kept}" in out and step < 6
    code, out = finished(cli("run", recipe, "--resume", "auto", "--set", "train.max_time=1h"))
    assert code == 0, out
    assert json.loads((tmp_path / "r/summary.json").read_text())["steps"] == 6
    assert [e.get("reason") for e in read_events(tmp_path / "r") if e["event"] == "stop"] == ["train.max_time"]
    train(make_recipe(data_file, tmp_path / "straight", **kw))
    assert_same_losses(tmp_path / "r", tmp_path / "straight")
