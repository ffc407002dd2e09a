"""Per-sample attention for packed rows: the same loss and gradients as the block-diagonal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_lite.data.batching import collate
from qlora_lite.lora.layer import attach_lora, lora_modules, lora_parameters
from qlora_lite.model.loader import load_model
from qlora_lite.ops.attention import sample_bounds, use_packed_attention
from qlora_lite.ops.loss import causal_lm_loss
from qlora_lite.ops.packed_kernels import causal_attention
from qlora_lite.recipe import LoraConfig, ModelConfig


def sample(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]}


def adapted_model(path):
    model = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=True))
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return model.train()


def loss_and_grads(model, batch):
    for p in lora_parameters(model):
        p.grad = None
    loss, n = causal_lm_loss(model, batch, chunk_size=0)
    (loss / n).backward()
    return (loss / n).item(), torch.cat([p.grad.flatten().float() for p in lora_parameters(model)])


def test_sample_bounds_split_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert sample_bounds(pos) == [[(0, 3), (3, 5), (5, 10)], [(0, 10)]]


@pytest.mark.parametrize("n", [1, 7, 64, 600])
def test_causal_attention_matches_sdpa(n):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v).float(), want, atol=2e-2, rtol=2e-2)


def test_packed_rows_train_like_the_block_diagonal_mask(tiny_llama):
    rows = [[sample(20, 0), sample(33, 1), sample(9, 2)], [sample(40, 3), sample(15, 4)]]
    model = adapted_model(tiny_llama)
    want_loss, want_grads = loss_and_grads(model, collate(rows, 0, mask_dtype=torch.bfloat16))
    use_packed_attention(model)
    loss, grads = loss_and_grads(model, collate(rows, 0, packed_mask="position_ids"))
    assert loss == pytest.approx(want_loss, rel=2e-3)
    assert (grads - want_grads).norm() / want_grads.norm() < 2e-2


def test_sample_bounds_are_read_once_per_forward_and_kept_nowhere(tiny_llama, monkeypatch):
    """Two layers, recomputed under checkpointing: one read per forward, no module-level cache."""
    import qlora_lite.ops.attention as attention

    calls = []
    real = attention.sample_bounds
    monkeypatch.setattr(attention, "sample_bounds", lambda pos: calls.append(pos) or real(pos))
    before = {k: v for k, v in vars(attention).items() if not k.startswith("__")}
    model = adapted_model(tiny_llama)
    use_packed_attention(model)
    use_packed_attention(model)  # a second call adds no second hook
    rows = [[sample(20, 0), sample(33, 1)], [sample(40, 3)]]
    for _ in range(2):
        loss_and_grads(model, collate(rows, 0, packed_mask="position_ids"))
    assert len(calls) == 2
    assert {k: v for k, v in vars(attention).items() if not k.startswith("__")} == before


def test_eval_and_unpacked_batches_are_unchanged(tiny_llama):
    model = adapted_model(tiny_llama)
    batch = collate([[sample(30, 5)], [sample(12, 6)]], 0)  # right padding, 2D mask
    want_train, _ = loss_and_grads(model, batch)
    with torch.no_grad():
        want_eval = causal_lm_loss(model.eval(), batch, 0)[0].item()
    use_packed_attention(model)
    with torch.no_grad():
        assert causal_lm_loss(model, batch, 0)[0].item() == pytest.approx(want_eval, rel=1e-3)
    loss, _ = loss_and_grads(model.train(), batch)
    assert loss == pytest.approx(want_train, rel=2e-3)


def test_a_packed_training_run_logs_the_dense_mask_loss(tmp_path):
    import json

    from qlora_lite.data.dataset import build_datasets
    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.model.loader import load_tokenizer
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.batches import plan_epoch
    from qlora_lite.train.loop import train

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(40, seed=2)))
    recipe = recipe_from_dict({
        "model": {"name_or_path": "qlora-lite:tiny-llama"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "format": "alpaca", "max_seq_len": 128, "eval_split": 0.0, "packing": True},
        "train": {"seed": 1, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "log_every": 1,
                  "eval_every": 0, "save_every": 0, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "run")},
    })
    train(recipe)
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    # B = 0 at step 1, so the logged loss is the base model's on the first batch, dense-masked.
    samples, _, _ = build_datasets(recipe.data, load_tokenizer(recipe.model), 1, None)
    rows = [[samples[i] for i in row] for row in plan_epoch(samples, recipe, 0)[0]]
    assert any(len(row) > 1 for row in rows)
    batch = collate(rows, 0, mask_dtype=torch.bfloat16)
    with torch.no_grad():
        loss, n = causal_lm_loss(load_model(recipe.model).train(), batch, recipe.train.loss_chunk_size)
    assert first["step"] == 1 and first["loss"] == pytest.approx(loss.item() / n, rel=2e-3)


@pytest.mark.parametrize("n", [7, 600])
def test_grouped_query_heads_attend_without_copies_like_repeated_ones(n):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, 8, n, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, n, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                          v.float().repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v).float(), want, atol=2e-2, rtol=2e-2)


def test_host_batch_gives_label_positions_and_bounds_without_reading_the_device():
    from qlora_lite.ops.loss import chunked_cross_entropy, label_positions

    rows = [[sample(20, 0), sample(9, 2)], [sample(15, 4)]]
    batch = collate(rows, 0, packed_mask="position_ids")
    assert sample_bounds(batch["position_ids"])[0] == [(0, 20), (20, 29)]
    hidden = torch.randn(2, batch["labels"].shape[1], 16)
    weight = torch.randn(320, 16)
    want = chunked_cross_entropy(hidden, weight, batch["labels"], 8)
    got = chunked_cross_entropy(hidden, weight, batch["labels"], 8, label_positions(batch["labels"]))
    assert got[1] == want[1] and torch.equal(got[0], want[0])


def test_packed_training_builds_no_block_mask(tiny_llama, monkeypatch):
    import transformers.masking_utils as mu

    model = adapted_model(tiny_llama)
    use_packed_attention(model)
    built = []
    real = mu.ALL_MASK_ATTENTION_FUNCTIONS[model.config._attn_implementation]

    def spy(*a, **k):
        out = real(*a, **k)
        built.append(out)
        return out

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, model.config._attn_implementation, spy)
    causal_lm_loss(model, collate([[sample(20, 0), sample(30, 1)]], 0, packed_mask="position_ids"), 0)
    assert all(m is None for m in built)  # in training the mask function is not even called
