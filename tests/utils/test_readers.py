"""Files from the wild and damaged files: BOM + CRLF just work, every file qlora-lite reads back
is named with a fix when truncated, corrupt or of the wrong kind, and a damaged data cache is rebuilt."""

from __future__ import annotations

import codecs
import csv
import io
import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save, save_file

from qlora_lite.cli import main
from qlora_lite.data.dataset import build_datasets
from qlora_lite.data.sources import load_rows
from qlora_lite.errors import QloraError
from qlora_lite.export.merge import CheckpointReader, resolve_source
from qlora_lite.lora.files import read_adapter_config, read_adapter_weights, save_adapter
from qlora_lite.lora.layer import attach_lora, lora_parameters
from qlora_lite.memory.estimate_inputs import load_arch
from qlora_lite.model.tiny import build_tiny_tokenizer
from qlora_lite.recipe import DataConfig, LoraConfig, load_recipe, recipe_from_dict, save_recipe
from qlora_lite.runs.checkpoint import load_checkpoint, save_checkpoint
from qlora_lite.train.metrics import last_logged_loss, truncate_metrics
from qlora_lite.utils.readers import read_log, read_yaml, torch_load

ROWS = [
    {"instruction": "Say hi", "input": "politely", "output": "Hi there.\nHow are you?"},
    {"instruction": "Count to 3", "input": "slowly", "output": "1, 2, 3"},
    {"instruction": "Ünïcode ✓", "input": "ça va", "output": "naïve café"},
]
RECIPE = {
    "model": {"name_or_path": "qlora-lite:tiny-llama", "quantization": {"blocksize": 64}},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "data": {"path": "rows.jsonl", "format": "alpaca", "max_seq_len": 64},
    "train": {"lr": 1e-4, "max_steps": 3},
    "output": {"dir": "runs/x"},
}


def windows(text: str) -> bytes:
    """The file as Notepad or a spreadsheet saves it: UTF-8 byte-order mark, CRLF line ends."""
    return codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode("utf-8")


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file as an interrupted copy would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def csv_text(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- files from the wild


@pytest.mark.parametrize("suffix,render", [
    (".jsonl", lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
    (".json", lambda rows: json.dumps(rows, indent=2, ensure_ascii=False) + "\n"),
    (".csv", csv_text),
])
def test_bom_and_crlf_data_files_read_as_the_clean_file(tmp_path, suffix, render):
    clean, win = tmp_path / f"clean{suffix}", tmp_path / f"win{suffix}"
    clean.write_text(render(ROWS), encoding="utf-8")
    win.write_bytes(windows(render(ROWS)))
    assert win.read_bytes().startswith(codecs.BOM_UTF8) and b"\r\n" in win.read_bytes()
    rows_clean, _ = load_rows(str(clean))
    rows_win, _ = load_rows(str(win))
    assert rows_clean == ROWS  # the multi-line cell keeps "\n" in every format
    assert rows_win == rows_clean


def test_utf16_json_from_notepad_reads_and_latin1_is_named(tmp_path):
    p = tmp_path / "u16.json"
    p.write_bytes(json.dumps(ROWS, ensure_ascii=False).encode("utf-16"))  # with its BOM
    assert load_rows(str(p))[0] == ROWS
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n' * 3 + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(QloraError, match=r"latin1.jsonl': line 4 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_rows(str(bad))


def test_bom_and_crlf_recipe_loads_as_the_clean_one(tmp_path):
    import yaml

    text = "# a recipe saved on Windows\n" + yaml.safe_dump(RECIPE, sort_keys=False)
    (tmp_path / "clean.yaml").write_text(text)
    (tmp_path / "win.yaml").write_bytes(windows(text))
    assert load_recipe(tmp_path / "win.yaml") == load_recipe(tmp_path / "clean.yaml") == recipe_from_dict(RECIPE)


# ---------------------------------------------------------------- a checkpoint, file by file


class Toy(torch.nn.Module):
    """The smallest model with a LoRA target: no transformers, milliseconds."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)


def toy_training_state():
    model = Toy()
    attach_lora(model, LoraConfig(r=2, alpha=4), targets=["q_proj"], dtype=torch.float32)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.fixture
def checkpoint(tmp_path):
    model, opt, sched = toy_training_state()
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "tokens": 10}
    return save_checkpoint(tmp_path / "run", model, LoraConfig(r=2, alpha=4), "toy", opt, sched, state, keep_last=2)


def test_an_intact_checkpoint_loads(checkpoint):
    assert load_checkpoint(checkpoint, *toy_training_state())["step"] == 1


CHECKPOINT_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt", "rng.pt", "trainer_state.json"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_file_is_named_with_the_way_out(checkpoint, name, damage):
    cut(checkpoint / name, 0.5 if damage == "truncated" else 0.0)
    with pytest.raises(QloraError) as e:
        load_checkpoint(checkpoint, *toy_training_state())
    msg = str(e.value)
    assert str(checkpoint / name) in msg and "truncated or corrupt" in msg
    assert f"delete {str(checkpoint)!r} to resume from the checkpoint before it" in msg


@pytest.mark.parametrize("name,other", [
    ("optimizer.pt", "scheduler.pt"), ("scheduler.pt", "optimizer.pt"), ("rng.pt", "optimizer.pt"),
    ("trainer_state.json", "adapter/adapter_config.json"),
    ("adapter/adapter_model.safetensors", "rng.pt"), ("adapter/adapter_config.json", "optimizer.pt"),
])
def test_a_checkpoint_file_of_the_wrong_kind_is_named(checkpoint, name, other):
    (checkpoint / name).write_bytes((checkpoint / other).read_bytes())
    with pytest.raises(QloraError) as e:
        load_checkpoint(checkpoint, *toy_training_state())
    assert str(checkpoint / name) in str(e.value) and "delete" in str(e.value)


def test_torch_load_never_runs_code_and_never_advises_it(tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    with pytest.raises(QloraError) as e:
        torch_load(tmp_path / "evil.pt", "fix it")
    assert "weights_only" not in str(e.value) and "not a torch.save file" in str(e.value)


# ---------------------------------------------------------------- adapters, run folders, base weights


@pytest.fixture
def adapter_dir(tmp_path):
    model, _, _ = toy_training_state()
    save_adapter(model, tmp_path / "adapter", LoraConfig(r=2, alpha=4), "qlora-lite:tiny-llama")
    return tmp_path / "adapter"


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_truncated_adapter_files_are_named(adapter_dir, name):
    cut(adapter_dir / name)
    with pytest.raises(QloraError, match="truncated or corrupt") as e:
        read_adapter_config(adapter_dir)
        read_adapter_weights(adapter_dir)
    assert str(adapter_dir / name) in str(e.value) and "checkpoints/step-N/adapter" in str(e.value)


def test_adapter_config_of_the_wrong_kind_is_named(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(QloraError, match="its JSON is a list, not a mapping"):
        read_adapter_config(adapter_dir)
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(QloraError, match="has no 'r'"):
        read_adapter_config(adapter_dir)


def test_generate_with_a_truncated_adapter_config_is_one_line(adapter_dir):
    # The case from the issue: it used to end in a JSONDecodeError traceback.
    cut(adapter_dir / "adapter_config.json")
    r = CliRunner().invoke(main, ["generate", "qlora-lite:tiny-llama", "--adapter", str(adapter_dir),
                                  "--prompt", "hi", "--max-new-tokens", "1"])
    assert r.exit_code == 2, r.output
    assert f"error: {str(adapter_dir / 'adapter_config.json')!r} is truncated or corrupt" in r.output
    assert "Traceback" not in r.output


def run_folder(tmp_path, adapter_dir) -> Path:
    run = tmp_path / "run"
    save_recipe(recipe_from_dict(RECIPE), run / "recipe.yaml")
    (run / "adapter").mkdir()
    for f in adapter_dir.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    return run


@pytest.mark.parametrize("cut_at", ["  r: 4\n  alp", "train:\n  l", "  name_or_path: [qlora"])
def test_a_truncated_run_recipe_is_named(tmp_path, adapter_dir, cut_at):
    run = run_folder(tmp_path, adapter_dir)
    text = (run / "recipe.yaml").read_text()
    if cut_at.endswith("[qlora"):  # a corrupt line rather than a cut
        text = text.replace("  name_or_path: qlora", cut_at)
    else:
        prefix = cut_at.rsplit("\n", 1)[0]
        text = text[: text.index(prefix) + len(cut_at)]
    (run / "recipe.yaml").write_text(text)
    with pytest.raises(QloraError) as e:
        resolve_source(run)
    assert str(run / "recipe.yaml") in str(e.value)


def test_truncated_base_safetensors_and_index_are_named(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(64)}, str(base / "model.safetensors"))
    cut(base / "model.safetensors")
    with pytest.raises(QloraError, match=r"model.safetensors' is truncated or corrupt .*--base dequantized"):
        CheckpointReader(base, ExitStack())
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model.saf')
    with pytest.raises(QloraError, match=r"index.json' is truncated or corrupt"):
        CheckpointReader(base, ExitStack())


def test_truncated_config_json_for_estimate_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "intermediate_si')
    with pytest.raises(QloraError, match=r"config.json' is truncated or corrupt \(not valid JSON"):
        load_arch(str(tmp_path))


def test_read_yaml_reports_line_and_column(tmp_path):
    (tmp_path / "r.yaml").write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(QloraError, match=r"r.yaml' is truncated or corrupt \(not valid YAML: .* at line \d+ column \d+\); fix"):
        read_yaml(tmp_path / "r.yaml", "fix")


# ---------------------------------------------------------------- logs and caches


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert last_logged_loss(log) == 1.5
    truncate_metrics(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


@pytest.mark.parametrize("damage", ["truncated", "not a cache"])
def test_a_damaged_data_cache_is_rebuilt(tmp_path, capsys, damage):
    tok = build_tiny_tokenizer()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    cfg = DataConfig(path=str(data), format="alpaca", max_seq_len=64, eval_split=0.0)
    first, _, s1 = build_datasets(cfg, tok, 0, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    if damage == "truncated":
        cut(cache)
    else:
        cache.write_bytes(save({"input_ids": torch.zeros(3, dtype=torch.int32)}))
    again, _, s2 = build_datasets(cfg, tok, 0, tmp_path / "cache")
    assert not s1.from_cache and not s2.from_cache and again == first
    assert f"warning: {str(cache)!r}" in capsys.readouterr().err
    third, _, s3 = build_datasets(cfg, tok, 0, tmp_path / "cache")  # the rebuilt cache is whole
    assert s3.from_cache and third == first
