"""Data-parallel runs on the CPU: 2 processes through torchrun and gloo, on the tiny model.

The claim under test: a global step is grad_accum x world micro-batches of one plan, so
2 processes x grad_accum 1 train what 1 process x grad_accum 2 trains. The gradient sum over
ranks reaches the same value as one process accumulating (bf16 a + b rounds once either way),
so we see bit-equal adapters; the tolerance we assert is 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, make_recipe, pair_recipe
from safetensors.torch import load_file

from qlora_lite.runs.checkpoint import checkpoint_dirs
from qlora_lite.train.loop import train

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # the same path twice (a run and its resume): equal but for summation order
# One process accumulating micro-batches against several summing theirs: the fused LoRA backward
# adds each micro-batch's adapter gradient into the flat bf16 buffer inside its matmul (one
# rounding), where ranks round their gradients and then sum them; after a few steps losses differ
# by a few 1e-4 and weights by a bf16 unit in the last place. A wrong normaliser or a missing sum
# is off by a factor.
WORLD_TOL = dict(loss=2e-3, weights=1e-2)
pytestmark = pytest.mark.slow


def small(data_file, out, **train):
    t = dict(max_steps=4, micro_batch_size=4, grad_accum=1, save_every=2, keep_last=5, eval_every=0,
             device="cpu")
    t.update(train)
    return make_recipe(data_file, out, **t)


def launch(tmp_path, recipe, *args, nproc=2, wait=True):
    """`qlora-lite run RECIPE --nproc N` in a new session (as a terminal would start it)."""
    import yaml

    path = tmp_path / f"recipe-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "qlora_lite", "run", str(path), "--nproc", str(nproc), *args],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    if not wait:
        return p
    out = p.communicate(timeout=300)[0]
    return p.returncode, out


def adapters(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a, b, steps=None, tol=None):
    tol = tol or dict(loss=TOL, weights=TOL)
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) and (steps is None or sorted(la) == steps)
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=tol["loss"], abs=tol["loss"]), (s, la[s], lb[s])
    wa, wb = adapters(a), adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=tol["weights"], atol=tol["weights"])


@pytest.fixture(scope="module")
def ddp_run(data_file, tmp_path_factory):
    """A 2-process DDP run, grad_accum 1, dropout 0, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = small(data_file, tmp / "two")
    recipe.lora.dropout = 0.0
    code, out = launch(tmp, recipe)
    assert code == 0, out
    return tmp, recipe


def test_two_processes_train_what_one_process_with_twice_the_accumulation_trains(ddp_run, data_file):
    tmp, recipe = ddp_run
    one = small(data_file, tmp / "one", grad_accum=2)
    one.lora.dropout = 0.0
    s = train(one)
    assert_same_run(tmp / "two", tmp / "one", steps=[1, 2, 3, 4], tol=WORLD_TOL)
    two = json.loads((tmp / "two/summary.json").read_text())
    assert two["world_size"] == 2 and two["distributed"] == "ddp" and two["peak_memory_rank"] in (0, 1)
    assert two["tokens"] == s["tokens"] and two["trained_tokens"] == s["trained_tokens"]
    assert all("peak_rank" in json.loads(line) for line in open(tmp / "two/metrics.jsonl") if '"loss"' in line)


def test_a_two_process_run_resumes_on_one_process_at_the_same_global_sample(ddp_run, data_file):
    tmp, recipe = ddp_run
    shutil.copytree(tmp / "two", tmp / "to-one")
    shutil.rmtree(tmp / "to-one/checkpoints/step-4")
    shutil.rmtree(tmp / "to-one/adapter")
    resumed = small(data_file, tmp / "to-one")
    resumed.lora.dropout = 0.0
    with pytest.raises(Exception, match=r"global batch is 2 process\(es\) x grad_accum 1.*grad_accum=2"):
        train(resumed, resume=True)
    resumed.train.grad_accum = 2
    s = train(resumed, resume=True)
    assert s["steps"] == 4 and "world_size" not in s
    assert_same_run(tmp / "two", tmp / "to-one", steps=[1, 2, 3, 4], tol=WORLD_TOL)


def test_a_resumed_two_process_run_equals_the_straight_one(data_file, tmp_path):
    # Dropout on: each rank's own RNG stream must come back from the checkpoint.
    recipe = small(data_file, tmp_path / "a", max_steps=4, save_every=2)
    code, out = launch(tmp_path, recipe)
    assert code == 0, out
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/step-4")
    shutil.rmtree(tmp_path / "b/adapter")
    code, out = launch(tmp_path, small(data_file, tmp_path / "b", max_steps=4, save_every=2), "--resume")
    assert code == 0 and "resumed from" in out, out
    assert_same_run(tmp_path / "a", tmp_path / "b", steps=[1, 2, 3, 4])
    ra, rb = (torch.load(p / "checkpoints/step-4/rng.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert len(ra["ranks"]) == 2 and not torch.equal(ra["ranks"][0], ra["ranks"][1])
    assert all(torch.equal(x, y) for x, y in zip(ra["ranks"], rb["ranks"]))


def test_ctrl_c_on_the_launcher_saves_one_checkpoint_and_exits_130(data_file, tmp_path):
    recipe = small(data_file, tmp_path / "r", max_steps=400, save_every=0)
    p = launch(tmp_path, recipe, wait=False)
    for line in p.stdout:
        if line.startswith("step") and "loss" in line:
            p.send_signal(signal.SIGINT)  # what the terminal's Ctrl-C does to the launcher
            break
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 130, out
    kept = checkpoint_dirs(tmp_path / "r")
    assert len(kept) == 1 and "interrupted" in out, out
    state = json.loads((kept[0] / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] >= 1
    assert state["batch_in_epoch"] == 2 * state["step"]  # both ranks stopped after the same step


def rank_pids(launcher) -> list[int]:
    """The rank processes under `qlora-lite run --nproc` (launcher -> torchrun -> ranks)."""
    torchrun = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return [int(r) for r in subprocess.run(["pgrep", "-P", torchrun[0]], capture_output=True, text=True).stdout.split()]


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint_that_resumes_exactly(data_file, tmp_path):
    # Dropout on and two micro-batches per rank and step: the ranks agree between micro-batches,
    # and each rank's RNG must be that of the last finished step.
    kw = dict(max_steps=8, grad_accum=2, save_every=0)
    p = launch(tmp_path, small(data_file, tmp_path / "b", **kw), "--resume", "auto", wait=False)
    for line in p.stdout:
        if line.startswith("step") and int(line.split()[1]) >= 2:
            break
    ranks = rank_pids(p)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGTERM)  # one rank only, as a node's kubelet or a SLURM step might
    out = p.communicate(timeout=180)[0]
    assert p.returncode != 0 and "preempted by SIGTERM at step" in out, out
    [kept] = checkpoint_dirs(tmp_path / "b")
    state = json.loads((kept / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and 2 <= state["step"] < 8
    assert state["batch_in_epoch"] == 2 * 2 * state["step"]  # both ranks stopped after the same step
    code, out = launch(tmp_path, small(data_file, tmp_path / "b", **kw), "--resume", "auto")
    assert code == 0 and f"resumed from {kept}" in out, out
    code, out = launch(tmp_path, small(data_file, tmp_path / "a", **kw))
    assert code == 0, out
    assert_same_run(tmp_path / "a", tmp_path / "b", steps=list(range(1, 9)))


def test_sigusr1_to_the_launcher_reaches_every_rank_and_it_exits_138_with_one_checkpoint(data_file, tmp_path):
    p = launch(tmp_path, small(data_file, tmp_path / "r", max_steps=400, save_every=0), wait=False)
    for line in p.stdout:
        if line.startswith("step") and "loss" in line:
            p.send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@90 on `srun qlora-lite run --nproc 2`
            break
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 138 and "preempted by SIGTERM at step" in out, out  # torchrun passes it on as TERM
    [kept] = checkpoint_dirs(tmp_path / "r")
    state = json.loads((kept / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["batch_in_epoch"] == 2 * state["step"]


def test_a_non_finite_loss_stops_every_rank_with_one_error(data_file, tmp_path):
    recipe = small(data_file, tmp_path / "r", max_steps=30, lr=1e30, warmup_steps=0, save_every=1,
                   max_grad_norm=0.0, optimizer="adamw")
    code, out = launch(tmp_path, recipe)
    assert code != 0
    assert out.count("error: loss is") == 1 and "at step" in out, out
    assert not (tmp_path / "r/adapter").exists()


# ---------------------------------------------------------------- DPO

DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


def dpo_small(pairs_file, out, **train):
    t = dict(max_steps=3, micro_batch_size=4, grad_accum=1, log_every=1, save_every=0, eval_every=3, device="cpu")
    t.update(train)
    return pair_recipe(pairs_file, out, **t)


def assert_same_stats(a, b):
    """Step 1 (before any update: both runs score the same adapters) within 1e-5, accuracies too: the
    statistics are sums over both ranks' pairs. Later steps differ as the runs do (WORLD_TOL: Adam's
    first steps turn bf16 rounding into whole updates), which a margin of 1e-3 feels, so from then
    on only the eval rewards are compared, loosely."""
    ra = [json.loads(line) for line in open(Path(a) / "metrics.jsonl")]
    rb = [json.loads(line) for line in open(Path(b) / "metrics.jsonl")]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra[0]["step"] == 1
    for k in DPO_STATS:
        assert ra[0][k] == pytest.approx(rb[0][k], abs=1e-5), (k, ra[0][k], rb[0][k])
    for k in ("eval_rewards/chosen", "eval_rewards/margins", "eval_logps/chosen"):
        assert ra[-1][k] == pytest.approx(rb[-1][k], abs=0.05), (k, ra[-1][k], rb[-1][k])


@pytest.mark.parametrize("distributed,precompute", [("ddp", True), ("fsdp", False)])
def test_dpo_on_two_processes_trains_and_logs_what_one_process_does(pairs_file, tmp_path, distributed, precompute):
    # The pair statistics are sums over both ranks' pairs; precomputed reference log-probs are split
    # between the ranks and gathered; under FSDP the reference pass disables sharded adapters.
    kw = dict(distributed=distributed, optimizer="adamw", precompute_reference=precompute)
    code, out = launch(tmp_path, dpo_small(pairs_file, tmp_path / "two", **kw))
    assert code == 0, out
    train(dpo_small(pairs_file, tmp_path / "one", grad_accum=2, **kw))
    assert_same_run(tmp_path / "two", tmp_path / "one", steps=[1, 2, 3], tol=WORLD_TOL)
    assert_same_stats(tmp_path / "two", tmp_path / "one")


# ---------------------------------------------------------------- FSDP


def fsdp_recipe(data_file, out, **train):
    r = small(data_file, out, optimizer="adamw", distributed="fsdp", **train)
    r.lora.dropout = 0.0
    return r


@pytest.fixture(scope="module")
def fsdp_run(data_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    code, out = launch(tmp, fsdp_recipe(data_file, tmp / "two"))
    assert code == 0, out
    return tmp


def test_fsdp_two_processes_train_what_one_process_with_twice_the_accumulation_trains(fsdp_run, data_file):
    train(fsdp_recipe(data_file, fsdp_run / "one", grad_accum=2))
    assert_same_run(fsdp_run / "two", fsdp_run / "one", steps=[1, 2, 3, 4], tol=WORLD_TOL)
    assert json.loads((fsdp_run / "two/summary.json").read_text())["distributed"] == "fsdp"


def test_the_fsdp_adapter_loads_in_peft_tensor_for_tensor(fsdp_run):
    """Every gathered tensor reaches PEFT's layers unchanged (logits of our files in peft vs ours:
    test_adapter.py); 2-rank and 1-rank files are equal (test above)."""
    import peft
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loader import bnb_config, disable_cpu_weight_packing, resolve_model_path
    from qlora_lite.recipe import QuantizationConfig

    path = resolve_model_path("qlora-lite:tiny-llama")
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig()),
                                                device_map="cpu", dtype=torch.bfloat16)
    disable_cpu_weight_packing(base)
    pm = peft.PeftModel.from_pretrained(base, fsdp_run / "two/adapter")
    loaded = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    saved = adapters(fsdp_run / "two")
    assert loaded.keys() == saved.keys() and len(saved) == 4 * 7 * 2
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    x = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
        with pm.disable_adapter():
            plain = pm(input_ids=x).logits
    assert not torch.equal(adapted, plain)


def test_an_fsdp_run_resumes_on_two_and_on_one_process(fsdp_run, data_file):
    for name, nproc, accum in (("again-two", 2, 1), ("again-one", 1, 2)):
        shutil.copytree(fsdp_run / "two", fsdp_run / name)
        shutil.rmtree(fsdp_run / name / "checkpoints/step-4")
        shutil.rmtree(fsdp_run / name / "adapter")
        recipe = fsdp_recipe(data_file, fsdp_run / name, grad_accum=accum)
        if nproc == 2:
            code, out = launch(fsdp_run, recipe, "--resume")
            assert code == 0 and "resumed from" in out, out
        else:
            train(recipe, resume=True)
        assert_same_run(fsdp_run / "two", fsdp_run / name, steps=[1, 2, 3, 4], tol=None if nproc == 2 else WORLD_TOL)


def test_fsdp_rank_memory_is_half_the_base_and_matches_the_estimate(tmp_path):
    """Each of 2 FSDP ranks holds ~1/2 of the base; the per-GPU estimate is within 10% of the
    largest rank's measured peak (the MemoryTracker on each rank)."""
    from qlora_lite.memory.measure_parallel import measure_rank
    from qlora_lite.parallel.distributed import World
    from qlora_lite.recipe import recipe_from_dict

    raw = {"model": {"name_or_path": "qlora-lite:tiny-llama", "gradient_checkpointing": True},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"optimizer": "adamw", "grad_accum": 2, "loss_chunk_size": 1024}}
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    single = measure_rank(recipe_from_dict(raw), World(), seq_len=64)["peak"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(REPO / "bench/parallel_memory.py"), str(tmp_path / "m.yaml"), "--strategy", "fsdp",
                        "--seq-len", "64", "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads((tmp_path / "out/memory.json").read_text())
    for r in got["ranks"]:
        share = r["peak"]["bytes"]["base_weights"] / single["bytes"]["base_weights"]
        assert 0.5 <= share < 0.53, share  # 1/2, plus the quant constants every rank keeps whole
        for c in ("base_weights", "lora_params", "optimizer_state"):
            assert r["peak"]["bytes"][c] == got["estimate"]["bytes"][c], c
    assert abs(got["estimate_error"]) <= 0.10, got["estimate_error"]


def test_a_killed_rank_makes_the_others_exit_instead_of_hanging(data_file, tmp_path):
    p = launch(tmp_path, small(data_file, tmp_path / "r", max_steps=400, save_every=0), wait=False)
    for line in p.stdout:
        if line.startswith("step") and "loss" in line:
            break
    ranks = rank_pids(p)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    out = p.communicate(timeout=120)[0]  # never a hang: torchrun or gloo ends the survivor
    assert p.returncode not in (0, 130), out
    assert not (tmp_path / "r/adapter").exists()
