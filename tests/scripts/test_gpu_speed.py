"""bench/gpu_speed.py end to end on a tiny model on the CPU: every run reports, the files are written."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # whole training runs, each in its own process
pytest.importorskip("trl")
pytest.importorskip("peft")


def test_the_gpu_speed_bench_runs_both_stacks_and_the_full_shape_and_writes_its_report(tmp_path):
    import gpu_speed

    from qlora_lite.data.demo_rows import demo_rows

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo_rows(80, seed=0)))
    gpu_speed.main(["--data", str(data), "--out", str(tmp_path / "out"), "--rows", "80", "--max-seq-len", "128",
                    "--steps", "4", "--warmup", "1", "--workloads", "w1", "--hidden", "64", "--layers", "1",
                    "--vocab", "400", "--full-layers", "1", "--full-seq", "64", "--full-steps", "3",
                    "--device", "cpu"])
    report = json.loads((tmp_path / "out" / "gpu_speed.json").read_text())
    assert list(report["runs"]) == ["w1 qlora-lite", "w1 reference", "w1 qlora-lite (again)", "7B qlora-lite"]
    for label, r in report["runs"].items():
        assert "error" not in r, (label, r.get("error"))
        assert r["steps"] in (3, 4) and r["tokens_per_s"] > 0 and r["step_p90_s"] >= r["step_median_s"] > 0
        assert r["profile"]["ops_dispatched"] > 0  # the profiled last step
    assert 0 < report["ratios"]["w1"]["tokens_per_s"]
    assert report["runs"]["7B qlora-lite"]["flop_per_token"] > 0
    assert "| w1 reference |" in (tmp_path / "out" / "gpu_speed.md").read_text()
