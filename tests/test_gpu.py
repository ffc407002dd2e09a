"""CUDA checks: skipped without a GPU (CI has none); run them wherever one is at hand."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_steps_on_cuda_report_allocator_peak(tmp_path):
    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.loop import train

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


def packed_attention_grads(kernel: str, seed: int = 0):
    """Output and q/k/v gradients of random bf16 q/k/v (GQA: 8 on 2 heads) through one packed-row kernel on CUDA."""
    from qlora_lite.ops.packed_kernels import KERNELS, PackedRows

    g = torch.Generator().manual_seed(seed)
    rows = PackedRows([[(0, 100), (100, 101), (101, 400), (400, 512)], [(0, 37), (37, 512)]], 512)
    q = torch.randn(2, 8, 512, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2, 512, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(2))
    w = torch.randn(2, 512, 8, 64, generator=g).to("cuda", torch.bfloat16)
    out = KERNELS[kernel](q, k, v, rows, 0.0, 0.125)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    return out.float(), torch.cat([t.flatten().float() for t in grads])


@pytest.mark.parametrize("kernel", ["sdpa_padded", "flash_varlen", "torch_varlen"])
def test_one_launch_packed_kernels_match_per_sample_sdpa_on_cuda(kernel):
    from qlora_lite.ops.packed_kernels import torch_varlen_available

    if kernel == "flash_varlen":
        pytest.importorskip("flash_attn")
    if kernel == "torch_varlen" and not torch_varlen_available():
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    want_out, want = packed_attention_grads("per_sample")
    out, got = packed_attention_grads(kernel)
    assert torch.isfinite(got).all()
    assert float((out - want_out).norm() / want_out.norm()) < 1e-2  # bf16 kernels round differently
    assert float((got - want).norm() / want.norm()) < 2e-2
