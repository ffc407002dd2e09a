"""CUDA checks: skipped without a GPU (CI has none); run them wherever one is at hand."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_steps_on_cuda_report_allocator_peak(tmp_path):
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.tiny import demo_rows
    from qlora_lite.train import train

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(64)))
    r = recipe_from_dict({
        "model": {"name_or_path": "qlora-lite:tiny-llama"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": str(data), "format": "alpaca", "max_seq_len": 64},
        "train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "device": "cuda", "eval_every": 0,
                  "save_every": 0},
        "output": {"dir": str(tmp_path / "run")},
    })
    torch.cuda.reset_peak_memory_stats()
    s = train(r)
    assert s["device"] == "cuda" and s["steps"] == 3
    assert 0 < s["peak_memory_bytes"] == torch.cuda.max_memory_allocated()
    assert s["train_loss"] == s["train_loss"]  # finite, not NaN


def test_nf4_on_cuda_agrees_with_the_cpu_backend():
    import bitsandbytes.functional as F

    w = torch.randn(128, 256, dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w.cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
    qc, state_c = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    # The two backends round independently; allow the rare tie that lands on the other code.
    assert (q.cpu() == qc).float().mean() > 0.999
    assert (F.dequantize_4bit(q, state).cpu() - F.dequantize_4bit(qc, state_c)).abs().max() < 0.5
