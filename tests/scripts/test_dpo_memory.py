"""bench/dpo_memory.py end to end on a tiny model: the three sides train the same pairs, two peaks each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole training runs: `make test` only, not `make test-fast`

pytest.importorskip("trl")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]


def test_dpo_sft_and_trl_train_the_same_tokens_and_report_both_peaks(tmp_path):
    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.model.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden_size=64, num_layers=1, chat_template=True)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo_rows(40, seed=0)))
    cmd = [sys.executable, str(REPO / "bench/dpo_memory.py"), "--model", model, "--data", str(data), "--pairs", "1",
           "--steps", "2", "--max-seq-len", "128", "--threads", "1", "--work-dir", str(tmp_path / "w"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    runs = {r["side"]: r for r in report["runs"]}
    assert set(runs) == {"dpo", "sft", "trl"}
    # The same pairs on every side: the same tokens trained, counted by each stack itself.
    assert runs["dpo"]["tokens"] == runs["sft"]["tokens"] == runs["trl"]["tokens"] > 0
    # A fresh adapter is its reference: DPO's first losses are log 2 on both DPO sides.
    assert abs(runs["dpo"]["loss"] - 0.6931) < 0.01 and abs(runs["trl"]["loss"] - 0.6931) < 0.01
    for r in runs.values():
        # The tracker counts the weights it was given and what training made on top of them.
        weights = r["tracker_at_peak"]["bytes"]["base_weights"]
        assert 0 < weights < r["tracker_peak_bytes"] < r["peak_rss_bytes"]
    s = report["summary"]
    for short in ("tracker", "rss"):
        assert s[f"dpo_over_trl_{short}"] > 0 and s[f"dpo_over_sft_{short}"] > 0
