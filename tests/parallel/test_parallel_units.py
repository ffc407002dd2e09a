"""The pure parts of data-parallel training: who trains what, the resume rule, the per-GPU estimate."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.errors import QloraError
from qlora_lite.memory.estimate import estimate_mode
from qlora_lite.memory.estimate_inputs import Settings, load_arch
from qlora_lite.memory.estimate_parallel import block, fsdp_persistent
from qlora_lite.parallel.distributed import World, check_global_batch
from qlora_lite.train.objectives import SFT


def test_each_micro_batch_of_a_global_step_goes_to_exactly_one_rank():
    accum, size = 3, 4
    owners = [[r for r in range(size) if World(r, size, r, "ddp").keeps(accum)(n)] for n in range(2 * accum * size)]
    assert all(len(o) == 1 for o in owners)
    assert [o[0] for o in owners[: accum * size]] == [r for r in range(size) for _ in range(accum)]
    assert all(World().keeps(accum)(n) for n in range(10))


def test_resuming_with_another_world_size_must_keep_the_global_batch():
    check_global_batch(2, 1, World(0, 1, 0), 2)
    check_global_batch(1, 4, World(0, 2, 0, "ddp"), 2)
    with pytest.raises(QloraError, match=r"set --set train.grad_accum=2"):
        check_global_batch(2, 1, World(0, 1, 0), 1)
    with pytest.raises(QloraError, match=r"world size that divides 3"):
        check_global_batch(1, 3, World(0, 2, 0, "ddp"), 1)


def test_the_trained_count_of_the_plan_is_the_collated_batchs(tmp_path):
    """fit() divides by MicroBatch.units, counted on the samples (no collective, and for the other
    ranks' batches too); it must equal what the objective counts on the collated batch."""
    import json

    from qlora_lite.data.dataset import build_datasets
    from qlora_lite.data.demo_rows import demo_rows
    from qlora_lite.model.loader import load_tokenizer
    from qlora_lite.recipe import recipe_from_dict
    from qlora_lite.train.batches import micro_batches

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows(40, seed=2)))
    for packing in (False, True):
        cfg = recipe_from_dict({"model": {"name_or_path": "qlora-lite:tiny-llama"},
                                "data": {"path": str(tmp_path / "rows.jsonl"), "max_seq_len": 64, "packing": packing},
                                "train": {"micro_batch_size": 3}})
        tok = load_tokenizer(cfg.model)
        train_set, _, _ = build_datasets(cfg.data, tok, 0, tmp_path / "cache")
        stream = micro_batches(train_set, cfg, 0, 0, tok.pad_token_id, torch.bfloat16)
        for _ in range(8):
            m = next(stream)
            assert m.units == SFT().batch_units(m.batch) and m.trained > 0


def test_fsdp_holds_a_row_block_of_every_weight_and_one_gpu_holds_all():
    a = load_arch("llama-2-7b")
    one = estimate_mode(a, Settings(optimizer="adamw"), "qlora")["bytes"]
    whole = fsdp_persistent(a, Settings(optimizer="adamw", nproc=1, distributed="fsdp"), "qlora")
    assert {k: whole[k] for k in ("base_weights", "lora_params", "gradients")} == {
        k: one[k] for k in ("base_weights", "lora_params", "gradients")}
    # Per tensor (FSDP's shards) torch AdamW keeps a 4-byte step counter each; one process, one for its flat buffer.
    assert whole["optimizer_state"] - one["optimizer_state"] == 4 * (32 * 7 * 2 - 1)
    two = fsdp_persistent(a, Settings(optimizer="adamw", nproc=2, distributed="fsdp"), "qlora")
    assert 0.5 < two["base_weights"] / one["base_weights"] < 0.52  # quant constants stay whole
    assert two["lora_params"] == one["lora_params"] // 2  # every dim of llama-2-7b splits evenly
    assert block(7, 2) == 4 and block(8, 2) == 4


def test_ddp_per_gpu_is_one_process_and_fsdp_falls_with_gpus():
    a = load_arch("llama-2-70b")
    single = estimate_mode(a, Settings(optimizer="adamw"), "qlora")["total"]
    assert estimate_mode(a, Settings(optimizer="adamw", nproc=2, distributed="ddp"), "qlora")["total"] == single
    peaks = [estimate_mode(a, Settings(optimizer="adamw", nproc=g, distributed="fsdp"), "qlora")["total"] for g in (2, 4, 8)]
    assert single > peaks[0] > peaks[1] > peaks[2]


def test_a_per_gpu_estimate_with_offloaded_checkpoints_prints_each_rank_s_host_memory():
    """Each rank offloads its own layer inputs: the host bytes are one process's (a KeyError once)."""
    from click.testing import CliRunner

    from qlora_lite.cli import main

    for extra in (["--set", "train.distributed=fsdp"], ["--set", "train.distributed=ddp"]):
        r = CliRunner().invoke(main, ["estimate", "llama-2-70b", "--nproc", "2", *extra, "--set",
                                      "model.offload_activations=true", "--gpu-mem", "24GiB"])
        assert r.exit_code == 0, r.output
        assert "host RAM for offloaded checkpoints" in r.output
