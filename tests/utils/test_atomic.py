"""A full disk: a checkpoint, the final adapter, an export or the data cache that cannot be written
fails naming the file and the bytes it needed, leaves no temporary file, and the last checkpoint
still resumes.

Space runs out through the file-size limit (RLIMIT_FSIZE), which the kernel enforces for root
too: a write past it fails with EFBIG, as a full disk fails with ENOSPC. Python ignores SIGXFSZ
(which would otherwise kill the process), and the subprocesses here ignore it explicitly."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lite.data.dataset import build_datasets
from qlora_lite.lora.files import save_adapter
from qlora_lite.recipe import DataConfig, LoraConfig
from qlora_lite.runs.checkpoint import checkpoint_dirs
from qlora_lite.utils.atomic import NoSpaceError, atomic_dir, atomic_write_bytes, require_space

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Lower this process's soft file-size limit for the `with` body (no root needed)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old"))


def test_the_limit_really_fails_writes_here_even_as_root(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with file_size_limit(1000), pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 5000)  # a write past the limit, by root too
    finally:
        os.close(fd)
    assert e.value.errno == errno.EFBIG


def test_a_file_that_does_not_fit_is_named_with_its_size_and_the_old_one_stays(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")
    with file_size_limit(1000), pytest.raises(NoSpaceError) as e:
        atomic_write_bytes(target, b"x" * 5000)
    assert str(e.value) == (f"could not write {str(target)!r}: File too large. It needed 5,000 bytes (5.0 kB); "
                            "free at least that much on its disk (or raise the file-size limit, ulimit -f) and run "
                            "the command again.")
    assert (e.value.path, e.value.nbytes) == (target, 5000)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_folder_that_does_not_fit_is_named_by_its_final_path(tmp_path):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 64)

    from qlora_lite.lora.layer import attach_lora

    model = Toy()
    attach_lora(model, LoraConfig(r=4, alpha=8), targets=["q_proj"], dtype=torch.float32)
    final = tmp_path / "run" / "adapter"  # as train() writes the final adapter
    with file_size_limit(1000), pytest.raises(NoSpaceError) as e:
        with atomic_dir(final, overwrite=True) as tmp:
            save_adapter(model, tmp, LoraConfig(r=4, alpha=8), "toy")
    assert e.value.path == final / "adapter_model.safetensors" and e.value.nbytes > 1000
    assert not final.exists() and leftovers(tmp_path) == []
    # A library writing inside the folder (transformers' save_pretrained): the OS names no file
    # for a failed write(), so the folder is named.
    with file_size_limit(1000), pytest.raises(NoSpaceError, match=r"could not write '.*/out': File too large. "
                                                                  r"It needed more space than is left") as e:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("x" * 5000)
    assert e.value.nbytes is None and leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_data_cache_that_does_not_fit_is_named(tmp_path):
    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows(32, seed=1)))
    cfg = DataConfig(path=str(tmp_path / "rows.jsonl"), format="alpaca", max_seq_len=64, eval_split=0.0)
    with file_size_limit(2000), pytest.raises(NoSpaceError, match=r"could not write '.*/cache/rows-\w+.safetensors'"):
        build_datasets(cfg, tok, 0, tmp_path / "cache")
    assert leftovers(tmp_path) == []


def test_require_space_fails_before_a_long_job(tmp_path):
    with pytest.raises(NoSpaceError, match=r"could not write '.*/out': only [\d.]+ [kMG]?B are free on its disk\. "
                                           r"It needed 1,000,000,000,000,000,000 bytes \(1000000000.0 GB\); "
                                           r"free at least that much on its disk and run"):
        require_space(tmp_path / "out", 10**18)
    require_space(tmp_path / "out", 1)


# ---------------------------------------------------------------- end to end through the CLI

LIMIT = 200_000  # above every small run file, below the tiny run's optimizer state (~550 kB) and its export


def limited_cli(*args) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "qlora_lite.cli", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit, timeout=600)


@pytest.mark.slow
def test_checkpoint_and_export_that_do_not_fit_then_resume(tmp_path):
    import yaml
    from conftest import tiny_recipe

    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.export.merge import export_model
    from qlora_lite.train.loop import train

    data, run = tmp_path / "rows.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(64, seed=1)))
    train(tiny_recipe(data, run, max_steps=2))  # step-2 checkpoint, final adapter, data cache
    step2 = run / "checkpoints" / "step-2"
    before = {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data, run, max_steps=4).to_dict()))

    # Resume to step 4: its checkpoint's adapter fits, its optimizer state does not.
    p = limited_cli("run", str(recipe), "--resume")
    assert p.returncode == 2, p.stdout
    need = (step2 / "optimizer.pt").stat().st_size
    assert (f"error: could not write {str(run / 'checkpoints/step-4/optimizer.pt')!r}: File too large. "
            f"It needed {need:,} bytes") in p.stdout
    assert f"Checkpoint {str(step2)!r} is complete: continue from it with --resume." in p.stdout
    assert "Traceback" not in p.stdout
    assert checkpoint_dirs(run) == [step2] and leftovers(run) == []
    assert {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()} == before

    # With space again the resume continues from step 2.
    assert train(tiny_recipe(data, run, max_steps=4), resume=True)["steps"] == 4

    # An export whose one shard does not fit: nothing is left, neither the folder nor its temporary.
    with file_size_limit(LIMIT), pytest.raises(NoSpaceError) as e:
        export_model(run, tmp_path / "export", log=lambda m: None)
    assert e.value.path == tmp_path / "export" / "model.safetensors" and "File too large" in str(e.value)
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []
    info = export_model(run, tmp_path / "export", log=lambda m: None)  # it needed what it said
    assert info["total_bytes"] == e.value.nbytes > LIMIT
