"""bench/attention_kernels.py on a tiny shape: every kernel timed, and each agrees with per_sample."""

from __future__ import annotations

import json


def test_the_attention_bench_times_each_kernel_and_checks_its_agreement(tmp_path, capsys):
    import attention_kernels

    from qlora_lite.data.demo_rows import demo_rows

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo_rows(60, seed=0)))
    attention_kernels.main(["--data", str(data), "--samples", "60", "--seq-len", "128", "--rows", "2", "--rounds", "2",
                          "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--layers", "1", "--vocab", "300",
                          "--device", "cpu", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert set(res["median_s"]) == set(res["attention_median_s"]) == {"per_sample", "sdpa_padded"}  # no FA2 on CPU
    assert all(len(v) == 2 and min(v) > 0 for v in res["rounds_s"].values())
    assert res["shape"]["samples_per_row"] > 1  # packed rows, not single samples
    a = res["agreement"]["sdpa_padded"]
    assert a["grads_finite"] and a["loss_rel_diff"] < 1e-3 and 0 < a["grad_rel_diff"] < 0.05  # bf16 rounding
