"""bench/profile_step.py on the tiny model: timing, page faults, the profile and the A/B all report."""

from __future__ import annotations

import json


def test_profile_step_reports_time_faults_ops_and_the_kept_weights_ab(tmp_path, capsys):
    import profile_step

    from qlora_lite.data.demo_rows import demo_rows

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo_rows(40, seed=0)))
    r = profile_step.main(["--model", "qlora-lite:tiny-llama", "--data", str(data), "--rows", "40",
                           "--max-seq-len", "128", "--steps", "2", "--profile", "--ab", "keep-dequantized",
                           "--rounds", "2", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(r))
    assert r["step_s"] > 0 and r["minor_faults_per_step"] >= 0
    # CPU under checkpointing: every NF4 linear keeps its weight, so 2 dequantizations each a step.
    assert r["nf4_linears"] > 0 and r["dequantize_4bit_per_step"] == 2 * r["nf4_linears"]
    assert "aten::mm" in r["self_cpu_share"] and 0 < sum(r["self_cpu_share"].values()) <= 1
    assert all(len(v) == 2 and min(v) > 0 for v in r["ab"]["rounds_s"].values())
