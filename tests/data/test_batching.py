"""Batching: padding to the batch max, length grouping, packing with per-sample attention."""

from __future__ import annotations

import random

import pytest
import torch

from qlora_lite.data.batching import collate, pack_rows, packed_attention_mask, plan_batches
from qlora_lite.data.dataset import IGNORE_INDEX


def fake_samples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 200) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def flat(plan):
    return sorted(i for batch in plan for row in batch for i in row)


def test_collate_pads_to_batch_max():
    samples = fake_samples([5, 9, 3])
    batch = collate([[s] for s in samples], pad_id=0)
    assert batch["input_ids"].shape == (3, 9)  # the longest sample, not max_seq_len
    assert batch["attention_mask"].tolist()[2] == [1] * 3 + [0] * 6
    assert batch["labels"][0, 5:].eq(IGNORE_INDEX).all() and batch["input_ids"][0, 5:].eq(0).all()
    assert batch["input_ids"][1].tolist() == samples[1]["input_ids"]
    assert batch["labels"][1].tolist() == samples[1]["labels"]
    assert batch["position_ids"][0].tolist() == list(range(9))
    assert all(v.dtype == torch.long for v in batch.values())


def test_plan_is_deterministic_and_covers_every_sample():
    rng = random.Random(1)
    samples = fake_samples([rng.randrange(4, 100) for _ in range(103)])
    a = plan_batches(samples, 4, seed=7, epoch=0, group_by_length=True)
    assert a == plan_batches(samples, 4, seed=7, epoch=0, group_by_length=True)
    assert a != plan_batches(samples, 4, seed=7, epoch=1, group_by_length=True)
    assert a != plan_batches(samples, 4, seed=8, epoch=0, group_by_length=True)
    assert flat(a) == list(range(103)) and all(len(b) <= 4 for b in a)
    plain = plan_batches(samples, 4, seed=7, epoch=0)
    assert flat(plain) == list(range(103))

    def spread(plan):
        lens = [[len(samples[r[0]]["input_ids"]) for r in b] for b in plan]
        return sum(max(x) - min(x) for x in lens) / len(lens)

    assert spread(a) < spread(plain) / 3  # grouped batches hold similar lengths
    longest = max(range(103), key=lambda i: len(samples[i]["input_ids"]))
    assert longest in [r[0] for r in a[0]]  # an OOM shows on the first step
    eval_plan = plan_batches(samples, 10, seed=7, epoch=3, shuffle=False)
    assert [r[0] for b in eval_plan for r in b] == list(range(103))


def test_pack_rows_fit_capacity():
    rng = random.Random(2)
    lengths = [rng.randrange(5, 60) for _ in range(200)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= sum(lengths) / 128 * 1.1 + 1  # best fit wastes little
    samples = fake_samples(lengths)
    plan = plan_batches(samples, 2, seed=0, epoch=0, packing=True, max_seq_len=128)
    assert plan == plan_batches(samples, 2, seed=0, epoch=0, packing=True, max_seq_len=128)
    assert flat(plan) == list(range(200))


def test_packed_collate_positions_labels_mask():
    samples = fake_samples([4, 3])
    batch = collate([[samples[0], samples[1]], [samples[1]]], pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch["labels"][0, 4] == IGNORE_INDEX  # not predicted from the previous sample
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 7, 7)
    allowed = mask[0, 0] == 0
    assert allowed[5].tolist() == [False] * 4 + [True, True, False]
    assert allowed[3].tolist() == [True] * 4 + [False] * 3
    # padding rows attend only to themselves, so no softmax row is all -inf
    assert (mask[1, 0] == 0).sum(-1).min() >= 1
    assert packed_attention_mask(torch.tensor([[0, 0, -1]]), torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, num_layers=2, intermediate_size=128)
    return lambda impl: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl,packed_mask", [("sdpa", "4d"), ("eager", "4d"), ("sdpa", "position_ids"), ("eager", "position_ids")])
def test_packed_logits_equal_unpacked(tiny_llama, impl, packed_mask):
    model = tiny_llama(impl)
    samples = fake_samples([7, 12, 5, 9], seed=3)
    packed = collate([samples[:3], samples[3:]], pad_id=0, packed_mask=packed_mask)
    assert ("attention_mask" in packed) == (packed_mask == "4d")
    # Without a mask, transformers finds the samples from position_ids only when no KV cache
    # is made; the config's use_cache=True would make one, so training passes use_cache=False.
    packed["use_cache"] = False
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "labels"})
        row, at = 0, 0
        for k, s in enumerate(samples):
            if k == 3:
                row, at = 1, 0
            n = len(s["input_ids"])
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(out.logits[row, at : at + n], alone, atol=1e-5, rtol=1e-5)
            at += n
        # and the loss over packed rows equals the token-weighted loss over samples
        packed_loss = model(**packed).loss
        single = [model(**collate([[s]], pad_id=0), use_cache=False) for s in samples]
        counts = [sum(t != IGNORE_INDEX for t in s["labels"][1:]) for s in samples]
        expected = sum(o.loss * c for o, c in zip(single, counts)) / sum(counts)
        torch.testing.assert_close(packed_loss, expected, atol=1e-5, rtol=1e-5)
