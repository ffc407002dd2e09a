"""stopping.py on its own: the signal flag, the exit line and train.max_time's arithmetic."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from qlora_lite.parallel.distributed import World
from qlora_lite.train import stopping
from qlora_lite.train.stopping import TIME_LIMIT, StopFlag, Stopped, TimeBudget


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_each_stop_signal_raises_the_flag_and_exits_with_128_plus_its_number(sig, status):
    with StopFlag() as flag:
        assert flag.poll(World()) == 0
        os.kill(os.getpid(), sig)
        assert flag.poll(World()) == sig and flag.agreed(World()) == sig
    assert Stopped(flag.code, 4, Path("runs/x/checkpoints/step-4")).exit_status == status


def test_a_second_sigterm_is_noted_but_a_second_ctrl_c_aborts(capsys):
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. during the save: nothing is cut short
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.code == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "already stopping" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_the_stop_line_says_what_where_and_the_command_to_go_on():
    ckpt = Path("runs/x/checkpoints/step-12")
    assert Stopped(signal.SIGTERM, 12, ckpt).line("r.yaml") == (
        "preempted by SIGTERM at step 12: checkpoint runs/x/checkpoints/step-12; "
        "resume with: qlora-lite run r.yaml --resume auto")
    assert Stopped(signal.SIGINT, 1, ckpt).line().startswith("interrupted by Ctrl-C (SIGINT) at step 1")
    s = Stopped(TIME_LIMIT, 3, ckpt)
    assert s.line().startswith("stopped by train.max_time at step 3") and s.exit_status == 75


def test_the_time_budget_stops_when_the_slowest_step_and_a_save_would_not_fit(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    budget = TimeBudget(100.0, save_bytes=int(5 * stopping.SAVE_GUESS_BYTES_PER_S))  # a 5 s save, guessed
    now[0] += 150
    assert not budget.up()  # no step finished yet in this process: it always makes progress
    budget = TimeBudget(100.0)
    budget.note_step(10.0)
    budget.note_save(4.0)
    now[0] += 85
    assert not budget.up()  # 85 + 10 + 4 < 100
    now[0] += 2
    assert budget.up()  # 87 + 10 + 4 > 100
    assert not TimeBudget(None).up()


def test_a_signal_on_any_rank_wins_over_rank_0s_clock():
    class TwoRanks:
        def __init__(self, other):
            self.other = other

        def max(self, value):
            return max(value, self.other)

    flag = StopFlag()
    assert flag.agreed(TwoRanks(0), time_up=True) == TIME_LIMIT and flag.code == 0
    assert flag.agreed(TwoRanks(signal.SIGTERM), time_up=True) == signal.SIGTERM
    assert flag.code == signal.SIGTERM  # the other rank's signal is this rank's now


@pytest.mark.parametrize("args,resume", [([], False), (["--resume"], True), (["--resume", "auto"], "auto"),
                                         (["--resume", "--set", "train.max_steps=3"], True)])
def test_run_takes_bare_resume_and_resume_auto(tmp_path, monkeypatch, args, resume):
    from click.testing import CliRunner

    from qlora_lite import cli
    from qlora_lite.train import loop

    got = {}
    monkeypatch.setattr(loop, "run_recipe", lambda cfg, **kw: got.update(kw) or 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: qlora-lite:tiny-llama}\ndata: {path: rows.jsonl}\n")
    r = CliRunner().invoke(cli.main, ["run", str(recipe), *args])
    assert r.exit_code == 0, r.output
    assert got["resume"] == resume and got["recipe_path"] == str(recipe) and got["accept_changed_data"] is False


def test_accept_changed_data_is_refused_without_resume(tmp_path):
    from click.testing import CliRunner

    from qlora_lite import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: qlora-lite:tiny-llama}\ndata: {path: rows.jsonl}\n")
    r = CliRunner().invoke(cli.main, ["run", str(recipe), "--accept-changed-data"])
    assert r.exit_code == 2 and "--accept-changed-data applies only with --resume" in r.output
    r = CliRunner().invoke(cli.main, ["run", str(recipe), "--resume", "newest"])
    assert r.exit_code == 2 and "'newest' is not one of 'latest', 'auto'" in r.output
