"""The packed attention kernels give the per-sample path's loss and gradients; one rule picks them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_lite.data.batching import collate
from qlora_lite.errors import QloraError
from qlora_lite.ops.attention import BOUNDS_KWARG, KERNEL_ENV, attention_kernel, use_packed_attention
from qlora_lite.ops.loss import causal_lm_loss
from qlora_lite.ops.packed_kernels import PackedRows, padded_bucket, per_sample, sdpa_padded
from qlora_lite.train.step import to_device

# Rows of 1..4 samples (one of length 1), batch 2: the shorter row is right-padded.
ROWS = {"4+1": [[9, 23, 1, 14], [31]], "2+3": [[17, 5], [12, 30, 8]]}


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale=None, causal=False):
    """flash_attn_varlen_func in pure torch: causal SDPA on each cu_seqlens slice of [T, H, D]."""
    assert cu_q.dtype == torch.int32 and cu_q.device == q.device and cu_q is cu_k
    assert isinstance(max_q, int) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    assert causal and dropout_p == 0.0 and q.shape[0] == int(cu_q[-1])
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale,
                                           enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def reference_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                           enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn (torch 2.13's signature) in pure torch."""
    assert window_size == (-1, 0) and enable_gqa == (k.shape[1] != q.shape[1])
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale=scale, causal=True)


def reference_torch_varlen_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
    """varlen_attn as torch 2.10 and 2.11 declare it: `is_causal`, no `enable_gqa`."""
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale=scale, causal=is_causal)


def tiny_fp32_llama():
    """Two layers, 4 query heads on 2 key/value heads, fp32, checkpointed, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lite.model.loader import enable_gradient_checkpointing

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    enable_gradient_checkpointing(model)
    return model.train()


def packed_batch(lengths: list[list[int]]) -> dict:
    g = torch.Generator().manual_seed(sum(map(sum, lengths)))
    rows = [[{"input_ids": (ids := torch.randint(3, 320, (n,), generator=g).tolist()), "labels": ids}
             for n in row] for row in lengths]
    return collate(rows, 0, packed_mask="position_ids")


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, to_device(batch, "cpu"), chunk_size=0)
    (loss / n).backward()
    return (loss / n).item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_padded_and_varlen_kernels_train_like_the_per_sample_loop(rows):
    batch = packed_batch(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 2
    model = tiny_fp32_llama()
    use_packed_attention(model, kernel="per_sample")
    want_loss, want = loss_and_grads(model, batch)
    for kernel, fn in (("sdpa_padded", None), ("flash_varlen", reference_varlen),
                       ("torch_varlen", reference_torch_varlen), ("torch_varlen", reference_torch_varlen_2_10)):
        use_packed_attention(model, kernel=kernel, varlen_fn=fn)
        loss, got = loss_and_grads(model, batch)
        assert torch.isfinite(got).all(), kernel
        assert loss == pytest.approx(want_loss, abs=1e-6), kernel
        assert (got - want).abs().max() <= 1e-6, (kernel, float((got - want).abs().max()))


def test_the_padded_kernel_is_exact_on_grouped_heads_and_its_padding_gets_no_gradient():
    g = torch.Generator().manual_seed(3)
    rows = PackedRows([[(0, 5), (5, 6), (6, 20)], [(0, 20)]], 20)
    q = torch.randn(2, 6, 20, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 8, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 20, 6, 8, generator=g)
    grads = []
    for kernel in (per_sample, sdpa_padded):
        out = kernel(q, k, v, rows, 0.0, 0.3)
        grads.append((out, *torch.autograd.grad((out * w).sum(), (q, k, v))))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_packed_rows_give_cu_seqlens_and_padded_indices_from_the_host_bounds():
    rows = PackedRows([[(0, 3), (3, 7)], [(0, 4), (4, 7)]], 7)
    cu, max_len = rows.varlen_index(torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 11, 14] and max_len == 4
    gather, inverse, shapes = rows.padded_index(torch.device("cpu"))
    assert shapes == [(4, 4)]  # lengths 3 and 4 share the bucket (2, 4]
    assert gather.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 13]
    assert inverse.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert rows.padded_index(torch.device("cpu"))[0] is gather  # built once per forward


def test_samples_are_padded_within_power_of_two_length_buckets():
    rows = PackedRows([[(0, 1), (1, 3), (3, 40), (40, 512)], [(0, 300), (300, 310), (310, 512)]], 512)
    gather, inverse, shapes = rows.padded_index(torch.device("cpu"))
    # Lengths 1 and 2 share (1, 2], 472 and 300 share (256, 512]; 37, 10 and 202 are alone.
    assert sorted(shapes) == [(1, 10), (1, 37), (1, 202), (2, 2), (2, 472)]
    assert sum(n * m for n, m in shapes) == gather.numel()
    assert torch.equal(gather[inverse], torch.arange(2 * 512))  # every token comes back from its own slot
    assert [padded_bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 2, 3, 6, 7]


def test_one_layout_per_forward_reaches_every_layer(monkeypatch):
    import qlora_lite.ops.packed_kernels as pk

    seen = []
    real = pk.KERNELS["sdpa_padded"]
    monkeypatch.setitem(pk.KERNELS, "sdpa_padded", lambda q, k, v, rows, *a: seen.append(rows) or real(q, k, v, rows, *a))
    model = tiny_fp32_llama()
    use_packed_attention(model, kernel="sdpa_padded")
    batch = to_device(packed_batch(ROWS["2+3"]), "cpu")
    assert isinstance(batch[BOUNDS_KWARG], list)  # from the host batch, before the forward
    loss_and_grads(model, packed_batch(ROWS["2+3"]))
    assert len(seen) == 4 and all(r is seen[0] for r in seen)  # 2 layers, each recomputed once
    # Row 0's right padding (22..50) joins its last sample.
    assert seen[0].bounds == [[(0, 17), (17, 50)], [(0, 12), (12, 42), (42, 50)]]


def test_one_rule_picks_the_kernel(monkeypatch):
    import qlora_lite.ops.attention as attention

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert attention_kernel("cpu", torch.bfloat16) == attention.CPU_KERNEL
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: False)
    assert attention_kernel("cuda", torch.bfloat16) == "sdpa_padded"
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    assert attention_kernel("cuda", torch.bfloat16) == "torch_varlen"  # in torch itself: no package to install
    assert attention_kernel("cuda", torch.float32) == "sdpa_padded"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention_kernel("cuda", torch.bfloat16) == "flash_varlen"
    assert attention_kernel("cuda", torch.float16) == "flash_varlen"
    assert attention_kernel("cuda", torch.float32) == "sdpa_padded"  # FA2 takes half precision only
    assert attention_kernel("cpu", torch.bfloat16) == attention.CPU_KERNEL
    monkeypatch.setenv(KERNEL_ENV, "sdpa_padded")
    assert attention_kernel("cpu", torch.float32) == "sdpa_padded"
    assert attention_kernel("cpu", torch.float32, forced="per_sample") == "per_sample"


def test_a_kernel_that_cannot_run_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "flash")
    with pytest.raises(QloraError, match="Unknown packed attention kernel 'flash'.*flash_varlen"):
        attention_kernel("cpu", torch.float32)
    monkeypatch.setenv(KERNEL_ENV, "flash_varlen")
    with pytest.raises(QloraError, match=r"needs CUDA.*qlora-lite\[flash\].*cpu"):
        attention_kernel("cpu", torch.bfloat16)
    monkeypatch.setenv(KERNEL_ENV, "torch_varlen")
    with pytest.raises(QloraError, match=r"torch_varlen attention kernel needs CUDA.*torch >= 2.10.*cpu"):
        attention_kernel("cpu", torch.bfloat16)
