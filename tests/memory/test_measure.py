"""`qlora-lite profile` and `qlora-lite estimate` end to end on CPU."""

import json

import pytest
from click.testing import CliRunner

from qlora_lite.cli import main
from qlora_lite.errors import QloraError
from qlora_lite.memory.measure import parse_modes
from qlora_lite.memory.tracker import CATEGORIES


@pytest.fixture()
def recipe(tmp_path, tiny_llama):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {tiny_llama}}}\nlora: {{r: 4, alpha: 8}}\n"
                    "train: {micro_batch_size: 1, grad_accum: 2}\n")
    return path


def test_profile_writes_reports(recipe, tmp_path):
    out = tmp_path / "prof"
    res = CliRunner().invoke(main, ["profile", str(recipe), "--modes", "qlora,full", "--steps", "2",
                                    "--seq-len", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    by = {r["mode"]: r for r in report["results"]}
    assert set(by) == {"qlora", "full"}
    for r in by.values():
        assert set(r["peak"]["bytes"]) == set(CATEGORIES)
        assert r["peak"]["total"] == sum(r["peak"]["bytes"].values()) > 0
    q, f = by["qlora"]["peak"]["bytes"], by["full"]["peak"]["bytes"]
    assert q["lora_params"] > 0 and f["lora_params"] == 0
    assert q["base_weights"] < f["base_weights"]  # NF4 linears vs bf16
    assert f["optimizer_state"] == 4 * f["gradients"]  # fp32 Adam state vs bf16 grads
    md = (out / "report.md").read_text()
    assert "qlora/full" in md and "total at peak" in md
    assert (out / "memory.png").stat().st_size > 0


def test_estimate_cli_table_and_json():
    runner = CliRunner()
    res = runner.invoke(main, ["estimate", "llama-2-7b", "--seq-len", "2048", "--gpu-mem", "24GiB"])
    assert res.exit_code == 0, res.output
    assert "predicted peak" in res.output and "fits in 24.00 GiB" in res.output
    res = runner.invoke(main, ["estimate", "mistral-7b", "--json"])
    assert json.loads(res.output)["modes"]["qlora"]["total"] > 0
    res = runner.invoke(main, ["estimate", "no-such-model"])
    assert res.exit_code == 2 and "shipped config" in res.output


def test_parse_modes():
    assert parse_modes("qlora, full") == ["qlora", "full"]
    with pytest.raises(QloraError, match="--modes"):
        parse_modes("qlora,fast")


def test_a_mode_predicted_not_to_fit_is_reported_not_run(recipe, tmp_path):
    from qlora_lite.memory.measure import predicted_peak
    from qlora_lite.recipe import load_recipe

    r = load_recipe(str(recipe))
    qlora, full = (predicted_peak(r, m, 16, 1, "cpu") for m in ("qlora", "full"))
    limit = (qlora + full) // 2  # qlora fits, full does not
    out = tmp_path / "prof"
    res = CliRunner().invoke(main, ["profile", str(recipe), "--modes", "qlora,full", "--steps", "1",
                                    "--seq-len", "16", "--out", str(out), "--memory-limit", f"{limit / 2**20}MiB"])
    assert res.exit_code == 0, res.output
    by = {x["mode"]: x for x in json.loads((out / "report.json").read_text())["results"]}
    assert "skipped" not in by["qlora"] and by["qlora"]["peak"]["total"] > 0
    assert by["full"]["skipped"].startswith("predicted") and by["full"]["predicted_total"] == full
    md = (out / "report.md").read_text()
    assert "Not measured" in md and "(predicted)" in md
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}/report.md" in res.output


def test_a_profiled_mode_leaves_no_parameters_alive(recipe):
    import gc

    import torch

    from qlora_lite.memory.measure import measure_mode
    from qlora_lite.recipe import load_recipe

    def live_params():
        gc.collect()
        return sum(isinstance(o, torch.nn.Parameter) for o in gc.get_objects())

    r = load_recipe(str(recipe))
    measure_mode(r, "qlora", steps=1, seq_len=8)  # warm-up: imports and caches that live on
    before = live_params()
    result = measure_mode(r, "full", steps=1, seq_len=8)
    assert result["trainable_params"] > 0
    assert live_params() == before
