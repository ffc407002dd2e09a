"""DPO's reference: the model the policy's log-ratios are measured against, and its log-probs.

Both references run on the one model in memory, with no second copy of the base weights:

- "base": the base with the adapters disabled (lora.layer.adapters_disabled), for fresh adapters
  (they start at B = 0, so the policy starts equal to its reference);
- "adapter": with `lora.init_from`, that adapter frozen: its tensors are kept aside and swapped
  into the adapter parameters for the reference pass while a trainable copy of it learns. After
  SFT the reference is base + SFT adapter, not the bare base (LLaMA-Factory #913, trl #1263).

The reference pass runs in eval mode (no dropout) under no_grad, before the policy's forward of
the same micro-batch: the swap writes the parameters in place, which autograd allows only while
no graph has saved them. Which reference a run uses is written to its folder (reference.json)
and checked on resume.

With `train.precompute_reference` the log-probs of every pair are computed once before training,
kept in the run folder (reference_logps.safetensors, reused by a resume) and carried by the pairs
(data/batching.collate_pairs), so a step runs the policy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.batching import collate_pairs
from ..errors import QloraError
from ..lora.layer import adapters_disabled, lora_modules
from ..ops.loss import token_logps
from ..utils.atomic import atomic_write_bytes, atomic_write_json
from ..utils.readers import file_sha256
from .step import to_device

REFERENCE_RECORD = "reference.json"
REFERENCE_LOGPS_FILE = "reference_logps.safetensors"


@dataclass
class Reference:
    """DPO's reference model.

    Args:
        kind (str): "base" (adapters disabled) or "adapter" (a frozen adapter, lora.init_from).
        source (str | None): the adapter folder of an "adapter" reference. Default None.
        sha256 (str | None): its weights file's hash, checked on resume. Default None.
        tensors (dict | None): parameter -> its frozen value, for "adapter". Default None.
    """

    kind: str
    source: str | None = None
    sha256: str | None = None
    tensors: dict | None = None

    def describe(self) -> dict:
        """What reference.json records."""
        if self.kind == "base":
            return {"reference": "base", "description": "the base model with the adapters disabled"}
        return {"reference": "adapter", "description": f"the adapter {self.source}, frozen",
                "adapter": self.source, "sha256": self.sha256}

    @contextlib.contextmanager
    def active(self, model):
        """Within the block `model` computes the reference: eval mode, adapters off or swapped."""
        training = model.training
        model.eval()  # no dropout in the reference
        try:
            if self.kind == "base":
                with adapters_disabled(model):
                    yield model
            else:
                with swapped(self.tensors):
                    yield model
        finally:
            model.train(training)

    @torch.no_grad()
    def logps(self, model, batch: dict, chunk_size: int) -> torch.Tensor:
        """[2 * pairs] fp32 reference log-probs of a collated pair batch (chosen first)."""
        from .objectives import sequence_logps

        with self.active(model):
            chosen, rejected = sequence_logps(token_logps(model, batch, chunk_size), batch)
        return torch.cat([chosen, rejected])


@contextlib.contextmanager
def swapped(tensors: dict):
    """Copy `tensors` ({parameter: value}) into their parameters for the block, then back, bit for bit."""
    with torch.no_grad():
        saved = [(p, p.detach().clone()) for p in tensors]
        for p, value in tensors.items():
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def build_reference(model, adapter_dir: Path | None) -> Reference:
    """The run's reference: the adapter the model was initialised from (its current values, frozen
    copies: call before any step), else the base with the adapters disabled."""
    if adapter_dir is None:
        return Reference("base")
    from ..lora.files import WEIGHTS_NAME

    tensors = {}
    for m in lora_modules(model).values():
        for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector):
            if p is not None:
                tensors[p] = p.detach().clone()
    return Reference("adapter", str(adapter_dir), file_sha256(Path(adapter_dir) / WEIGHTS_NAME), tensors)


def record_reference(run_dir: Path, reference: Reference, precomputed: bool, resume: bool) -> None:
    """Write reference.json; on resume first check the reference is the one the run started with."""
    path = run_dir / REFERENCE_RECORD
    record = dict(reference.describe(), precomputed=precomputed)
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("sha256") != record.get("sha256") or saved.get("reference") != record.get("reference"):
            raise QloraError(f"--resume: the DPO reference changed: the run started with {saved.get('description')} "
                             f"(sha256 {saved.get('sha256')}), now {record['description']} (sha256 "
                             f"{record.get('sha256')}); restore that adapter or start a new run.")
    atomic_write_json(path, record)


# ---------------------------------------------------------------- precomputed log-probs


def data_key(pairs: list[dict], reference: Reference, extra: dict) -> str:
    """A hash of what decides the reference log-probs: the pairs' tokens, the reference, the model."""
    h = hashlib.sha256(json.dumps([reference.describe(), extra], sort_keys=True).encode())
    for p in pairs:
        for side in ("chosen", "rejected"):
            h.update(json.dumps([p[side]["input_ids"], p[side]["labels"]]).encode())
    return h.hexdigest()


def compute_logps(reference: Reference, model, pairs: list[dict], batch_size: int, pad_id: int, chunk_size: int,
                  device: str, autocast, world) -> list[list[float]]:
    """[[chosen, rejected]] reference log-probs of `pairs`, in order. Data-parallel ranks split the
    batches and gather the results; every rank runs as many forwards (FSDP's collectives)."""
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    mine = list(range(world.rank, len(batches), world.size))
    rounds = -(-len(batches) // world.size)
    out = {}
    for k in range(rounds):
        index = mine[k] if k < len(mine) else None
        rows = [[p] for p in batches[index if index is not None else 0]]  # a spare forward keeps ranks in step
        batch = to_device(collate_pairs(rows, pad_id), device)
        with autocast:
            values = reference.logps(model, batch, chunk_size).double().cpu()
        if index is not None:
            n = len(rows)
            out[index] = [[float(values[i]), float(values[n + i])] for i in range(n)]
    merged = {}
    for part in world.gather_objects(out):
        merged.update(part)
    return [v for i in range(len(batches)) for v in merged[i]]


def precompute_reference(run, reference: Reference) -> None:
    """Attach reference log-probs ("reference": [chosen, rejected]) to every train and eval pair,
    from the run folder's file when it matches, else computed now and written there."""
    from safetensors.torch import load_file, save

    cfg, world = run.recipe, run.world
    q = cfg.model.quantization
    extra = {"model": cfg.model.name_or_path, "revision": cfg.model.revision, "bits": q.bits,
             "compute_dtype": q.compute_dtype, "quant_type": q.quant_type, "double_quant": q.double_quant}
    key = data_key(run.train_set + run.eval_set, reference, extra)
    path = run.run_dir / REFERENCE_LOGPS_FILE
    values = None
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                values = load_file(str(path))["logps"].tolist()
    if values is None:
        if world.main:
            print(f"reference: computing the log-probs of {len(run.train_set) + len(run.eval_set)} pairs once")
        t = cfg.train
        # Train and eval pairs apart, each batched from its start as training and eval batch them
        # (same padding: the held-out rewards start at exactly 0 when the policy is its reference).
        values = [v for part in (run.train_set, run.eval_set) if part
                  for v in compute_logps(reference, run.model, part, t.micro_batch_size, run.tokenizer.pad_token_id,
                                         t.loss_chunk_size, run.device, run.autocast, world)]
        if world.main:
            atomic_write_bytes(path, save({"logps": torch.tensor(values, dtype=torch.float64)},
                                          metadata={"key": key}))
        world.barrier()
    for p, v in zip(run.train_set + run.eval_set, values):
        p["reference"] = v
