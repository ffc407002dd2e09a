"""DPO and ORPO (train/objectives.py, train/reference.py) against TRL on one batch: loss, logged
metrics and adapter gradients within 1e-4 in fp32; then what TRL does not check: packing, chunking,
accumulation and the two references."""

from __future__ import annotations

import pytest
import torch
from preference_reference import trl_dpo_one_batch, trl_orpo_one_batch

from qlora_lite.data.batching import collate_pairs
from qlora_lite.lora.layer import attach_lora, lora_modules
from qlora_lite.model.loader import load_model
from qlora_lite.recipe import LoraConfig, ModelConfig, QuantizationConfig
from qlora_lite.train.objectives import DPO, ORPO, detached_sums, scaled_loss, step_metrics
from qlora_lite.train.reference import Reference, build_reference
from qlora_lite.train.step import to_device

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": list(MODULES)}
PAIRS = [
    {"prompt_ids": [5, 17, 42], "chosen_ids": [7, 8, 9, 10], "rejected_ids": [11, 12]},
    {"prompt_ids": [100, 101], "chosen_ids": [200], "rejected_ids": [201, 202, 203]},
    {"prompt_ids": [1, 30, 31, 32, 33], "chosen_ids": [40, 41, 2], "rejected_ids": [50, 51, 52, 53, 2]},
]
TOL = dict(rtol=1e-4, atol=1e-4)


def sample(p: dict) -> dict:
    """Our pair sample for TRL's ids: each side is prompt + completion, labels on the completion."""
    prompt = p["prompt_ids"]
    return {side: {"input_ids": prompt + p[f"{side}_ids"], "labels": [-100] * len(prompt) + p[f"{side}_ids"]}
            for side in ("chosen", "rejected")}


def adapter_values(model) -> dict:
    """Nonzero adapters (B = 0 would make the policy its reference): seeded, in module order."""
    g = torch.Generator().manual_seed(123)
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = torch.randn(m.r, m.in_features, generator=g) * 0.1
        out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, m.r, generator=g) * 0.1
    return out


def fp32_model(path):
    m = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=False,
                               quantization=QuantizationConfig(bits=16, compute_dtype="float32")))
    attach_lora(m, LoraConfig(**LORA, dtype="float32"))
    values = adapter_values(m)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(values[name])
    return m.train(), values


def ours(model, objective, rows, packed=False, chunk=0):
    """Loss, metrics and gradients of one step over `rows` micro-batches (lists of pair samples)."""
    model.zero_grad(set_to_none=True)
    batches = [collate_pairs([[s] for s in row] if not packed else [row], 0, packed=packed,
                             nll_on_prompt=getattr(objective, "nll_on_prompt", False)) for row in rows]
    units = {}
    for b in batches:
        for u, n in objective.batch_units(b).items():
            units[u] = units.get(u, 0) + n
    sums = None
    for b in batches:
        terms, stats = objective.loss(model, to_device(b, "cpu"), chunk)
        scaled_loss(objective, terms, units).backward()
        sums = detached_sums(terms, stats) if sums is None else sums + detached_sums(terms, stats)
    loss, metrics = step_metrics(objective, sums.tolist(), units)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, metrics, grads


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return fp32_model(tiny_llama)


def check_grads(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl_with_a_peft_adapter_and_the_adapter_disabled_as_reference(tiny_llama, policy, loss_type):
    model, values = policy
    want = trl_dpo_one_batch(tiny_llama, PAIRS, LORA, beta=0.1, loss_type=loss_type, adapter_init=values)
    loss, metrics, grads = ours(model, DPO(beta=0.1, loss_type=loss_type, reference=Reference("base")),
                                [[sample(p) for p in PAIRS]])
    assert loss == pytest.approx(want["loss"], abs=1e-4)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
        assert metrics[k] == pytest.approx(want[k], abs=1e-4), k
    check_grads(grads, want["grads"])


def test_the_parity_tolerance_catches_a_one_percent_change_of_beta(tiny_llama, policy):
    """The comparison above can fail: beta 0.101 against TRL's 0.1 moves the gradients past 1e-4."""
    model, values = policy
    want = trl_dpo_one_batch(tiny_llama, PAIRS, LORA, beta=0.1, loss_type="sigmoid", adapter_init=values)
    _, _, grads = ours(model, DPO(beta=0.101, reference=Reference("base")), [[sample(p) for p in PAIRS]])
    with pytest.raises(AssertionError):
        check_grads(grads, want["grads"])


def test_orpo_equals_trl_orpo(tiny_llama, policy):
    """TRL's ORPO takes its NLL on the whole chosen sequence, prompt included: data.train_on: all."""
    model, values = policy
    want = trl_orpo_one_batch(tiny_llama, PAIRS, LORA, beta=0.1, adapter_init=values)
    loss, metrics, grads = ours(model, ORPO(beta=0.1, nll_on_prompt=True), [[sample(p) for p in PAIRS]])
    assert loss == pytest.approx(want["loss"], abs=1e-4)
    for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
              "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[k] == pytest.approx(want[k], abs=1e-4), k
    check_grads(grads, want["grads"])


@pytest.mark.parametrize("objective", [DPO(reference=Reference("base")), ORPO(), ORPO(nll_on_prompt=True)],
                         ids=["dpo", "orpo", "orpo-nll-on-prompt"])
def test_packing_chunking_and_accumulation_train_what_one_padded_batch_trains(policy, objective):
    """Pairs packed into one row (chosen and rejected kept apart by their positions), log-probs in
    chunks of 5 rows, or one pair per micro-batch: the same step as one padded micro-batch."""
    model, _ = policy
    pairs = [sample(p) for p in PAIRS]
    want = ours(model, objective, [pairs])
    for got in (ours(model, objective, [pairs], packed=True), ours(model, objective, [pairs], chunk=5),
                ours(model, objective, [[p] for p in pairs])):
        assert got[0] == pytest.approx(want[0], abs=1e-5)
        assert got[1] == pytest.approx(want[1], abs=1e-5)
        check_grads(got[2], want[2])


def test_the_reference_pass_over_packed_pairs_keeps_each_sequence_to_itself(tiny_llama):
    """As training lays packed rows out (no mask: the packed attention splits them where positions
    restart), the reference pass in eval mode must split them too, not attend across a pair."""
    from qlora_lite.ops.attention import use_packed_attention

    model, _ = fp32_model(tiny_llama)
    use_packed_attention(model)
    pairs = [sample(p) for p in PAIRS]
    unpacked = to_device(collate_pairs([[p] for p in pairs], 0), "cpu")
    packed = to_device(collate_pairs([pairs], 0, packed=True, packed_mask="position_ids"), "cpu")
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    ref = Reference("base")
    torch.testing.assert_close(ref.logps(model, packed, 0), ref.logps(model, unpacked, 0), rtol=0, atol=1e-5)
    assert model.training  # the reference pass leaves the mode as it found it


def test_the_adapter_reference_is_the_initial_adapter_frozen_and_disabling_gives_the_base(tiny_llama, policy):
    model, _ = policy
    batch = to_device(collate_pairs([[sample(p)] for p in PAIRS], 0), "cpu")
    frozen = build_reference(model, None)
    assert frozen.kind == "base"
    plain = load_model(ModelConfig(name_or_path=tiny_llama, gradient_checkpointing=False,
                                   quantization=QuantizationConfig(bits=16, compute_dtype="float32")))
    attach_lora(plain, LoraConfig(**LORA, dtype="float32"))  # B = 0: the base
    torch.testing.assert_close(frozen.logps(model, batch, 0), Reference("base").logps(plain, batch, 0), rtol=0, atol=1e-5)

    initial = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}
    adapter = Reference("adapter", tensors=dict(initial))
    before = adapter.logps(model, batch, 0)
    with torch.no_grad():  # training moves the adapter; the reference stays where it started
        for p in initial:
            p.add_(0.05)
    after = adapter.logps(model, batch, 0)
    assert torch.equal(before, after)
    assert not torch.equal(after, Reference("base").logps(model, batch, 0))
    assert all(not torch.equal(p, initial[p]) for p in initial)  # the swap put the trained values back
    with torch.no_grad():
        for p, v in initial.items():
            p.copy_(v)
