"""bench/peers.py end to end on a tiny model: both stacks train the same tokens, one table."""

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


@pytest.mark.slow
def test_one_pair_on_a_tiny_model(tmp_path):
    from qlora_lite.data.demo_rows import demo_rows

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo_rows(40, seed=0)))
    cmd = [sys.executable, str(REPO / "bench/peers.py"), "--data", str(data), "--work-dir", str(tmp_path / "w"),
           "--pairs", "1", "--rows", "12", "--hidden", "64", "--layers", "1", "--vocab", "400", "--threads", "1",
           "--eval-rows", "30:40", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    ref, lite = (next(r for r in report["runs"] if r["side"] == side) for side in ("reference", "qlora-lite"))
    # The same rows, template, truncation and response masks on both sides.
    assert (ref["tokens"], ref["trained_tokens"]) == (lite["tokens"], lite["trained_tokens"])
    assert sum(n for n, _ in ref["steps"]) == ref["trained_tokens"] == sum(n for n, _ in lite["steps"])
    for r in (ref, lite):
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 and 0 < r["loss_at_tokens"] < 20
        # The judge: each adapter scored on held-out rows, on one base, by the same code.
        assert 0 < r["eval_loss"] < 20 and r["base_eval_loss"] == ref["base_eval_loss"]
    shown = subprocess.run([sys.executable, str(REPO / "bench/peers.py"), "--show", "/dev/stdin"],
                           input=out.stdout, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.stdout.strip().splitlines()[-1].startswith("qlora-lite/reference (default): tokens/s")
