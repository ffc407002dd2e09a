"""One process owns a run folder: a second run, resume, overwrite or export is refused with the
holder's PID, and a lock left by a process killed with kill -9 blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe

from qlora_lite.export.merge import export_model
from qlora_lite.runs.checkpoint import checkpoint_dirs
from qlora_lite.runs.folder import prepare_run_dir
from qlora_lite.runs.lock import LOCK_NAME, RunFolderBusy, owning_run, run_lock
from qlora_lite.train.loop import train

REPO = Path(__file__).resolve().parents[2]


def test_a_second_holder_is_refused_with_the_pid(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "run"):
        assert (run / LOCK_NAME).read_text().startswith(f"PID {os.getpid()}, qlora-lite run, since ")
        # flock locks belong to open files, so a second open in this same process is refused too.
        with pytest.raises(RunFolderBusy, match=rf"'{run}' is in use by another qlora-lite process "
                                                rf"\(PID {os.getpid()}, qlora-lite run, since .*\); wait for it"):
            with run_lock(run, "run --resume"):
                pass
        with run_lock(run, enabled=False):  # a non-writing rank of a multi-process run
            pass
    with run_lock(run, "export"):  # released on exit
        assert "qlora-lite export" in (run / LOCK_NAME).read_text()


def test_readers_lock_only_folders_a_writer_marked(tmp_path):
    bare = tmp_path / "adapter"
    bare.mkdir()
    with run_lock(bare, "export", create=False):
        pass
    assert list(bare.iterdir()) == []  # a bare adapter folder gets no lock file
    run = tmp_path / "run"
    (run / "checkpoints/step-2/adapter").mkdir(parents=True)
    with run_lock(run):
        pass
    assert owning_run(run) == owning_run(run / "adapter") == owning_run(run / "checkpoints/step-2/adapter") == run
    assert owning_run(bare) is None


def test_export_of_a_run_being_written_is_refused(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "run"):
        for source in (run, run / "checkpoints" / "step-2" / "adapter"):
            with pytest.raises(RunFolderBusy, match=rf"PID {os.getpid()}, qlora-lite run"):
                export_model(source, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_overwrite_clears_the_folder_but_keeps_the_held_lock(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        (run / "checkpoints/step-1").mkdir(parents=True)
        (run / "metrics.jsonl").write_text("{}\n")
        prepare_run_dir(run, resume=False, overwrite=True)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        with pytest.raises(RunFolderBusy):  # still ours: the file we hold was not deleted
            with run_lock(run):
                pass


def hold_in_subprocess(folder) -> subprocess.Popen:
    code = ("import sys, time; from qlora_lite.runs.lock import run_lock\n"
            "with run_lock(sys.argv[1], 'run'):\n    print('locked', flush=True); time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.slow
def test_the_os_releases_the_lock_of_a_process_killed_with_sigkill(tmp_path):
    p = hold_in_subprocess(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy, match=rf"PID {p.pid}, qlora-lite run"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
    assert f"PID {p.pid}" in (tmp_path / "run" / LOCK_NAME).read_text()  # the stale file stays ...
    with run_lock(tmp_path / "run"):  # ... and blocks nobody
        pass


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_is_refused_and_kill_9_frees_it(tmp_path):
    import yaml

    from qlora_lite.data.demo_rows import demo_rows

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(64, seed=1)))
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data, run).to_dict()))
    first = subprocess.Popen([sys.executable, "-m", "qlora_lite.cli", "run", str(recipe)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))
    try:
        for line in first.stdout:  # step 3 logged: step 2's checkpoint is complete
            if line.startswith("step") and line.split()[1] == "3":
                break
        held = rf"in use by another qlora-lite process \(PID {first.pid}, qlora-lite run, since"
        for kwargs in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunFolderBusy, match=held):
                train(tiny_recipe(data, run), **kwargs)
        with pytest.raises(RunFolderBusy, match=held):
            export_model(run / "checkpoints" / "step-2" / "adapter", tmp_path / "out", log=lambda m: None)
        assert checkpoint_dirs(run)  # --overwrite deleted nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    step = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    (run / "checkpoints" / f".step-{step + 1}.x1y2.tmp").mkdir()  # as a kill mid-save leaves it
    s = train(tiny_recipe(data, run, max_steps=step + 2), resume=True)
    assert s["steps"] == step + 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # swept under the lock
