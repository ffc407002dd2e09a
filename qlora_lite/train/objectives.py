"""What a training step minimises: next-token cross-entropy (SFT) or a preference loss (DPO, ORPO).

An objective turns one micro-batch into sums and says what each is divided by:

    sums, stats = objective.loss(model, batch, chunk_size)
        sums: one 0-d tensor per `objective.terms` entry (unit, weight); the step's loss is the
              sum over terms of weight * sum / (the global step's count of `unit`)
        stats: a 1-D tensor of sums, one per `objective.stats` entry (name, unit), or None
    objective.units(rows) / objective.batch_units(batch) -> {unit: count}, read on the host

Sums, not means: gradient accumulation and data-parallel ranks divide by the counts of the whole
global step (train/step.py), as SFT has always divided by the step's trained tokens, so a step of
4 micro-batches of 2 pairs trains what one micro-batch of 8 pairs would. With one micro-batch the
numbers are TRL's (tests/train/test_preference.py): DPO's loss and rewards are means over pairs,
ORPO's NLL a mean over the chosen tokens and its odds-ratio term a mean over pairs.

Units: "tokens" (labelled completion tokens; SFT's trained tokens), "pairs", "nll_tokens" (the
chosen tokens ORPO's NLL is taken on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batching import PAIRS, REFERENCE_LOGPS, TARGET_COMPLETION, TARGET_SEQUENCE
from ..data.dataset import IGNORE_INDEX
from ..ops.loss import causal_lm_loss, token_logps

# TRL's metric names, in the order the loss functions stack them.
REWARD_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def labelled(labels: list[int]) -> int:
    """Tokens of one sample that carry a label after the one-token shift."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


@dataclass
class SFT:
    """Next-token cross-entropy on the labelled tokens, averaged over the step's trained tokens."""

    name = "sft"
    loss_unit = "tokens"
    terms = (("tokens", 1.0),)
    stats = ()
    pairs = False

    def units(self, rows) -> dict:
        # Packing masks the first token of every later sample in a row, which is never labelled
        # after the shift anyway: the count is the same packed or not.
        return {"tokens": sum(labelled(s["labels"]) for row in rows for s in row)}

    def batch_units(self, batch: dict) -> dict:
        return {"tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch: dict, chunk_size: int):
        loss_sum, _ = causal_lm_loss(model, batch, chunk_size)
        return [loss_sum], None


@dataclass
class Preference:
    """What DPO and ORPO share: pairs in, per-sequence log-probs of the completions."""

    beta: float = 0.1
    nll_on_prompt: bool = False  # ORPO with data.train_on: all: the chosen prompt is in the NLL (TRL's way)
    loss_unit = "pairs"
    pairs = True

    def units(self, rows) -> dict:
        pairs = [p for row in rows for p in row]
        chosen = [labelled(p["chosen"]["labels"]) for p in pairs]
        nll = [len(p["chosen"]["input_ids"]) - 1 for p in pairs] if self.nll_on_prompt else chosen
        return {"pairs": len(pairs), "tokens": sum(chosen) + sum(labelled(p["rejected"]["labels"]) for p in pairs),
                "nll_tokens": sum(nll)}

    def batch_units(self, batch: dict) -> dict:
        n, seq, done = batch[PAIRS], batch[TARGET_SEQUENCE], batch[TARGET_COMPLETION]
        return {"pairs": n, "tokens": int(done.sum()), "nll_tokens": int((seq < n).sum())}


def sequence_logps(token: torch.Tensor, batch: dict, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of each pair's completion: sums over its tokens, or per-token means."""
    n, seq, done = batch[PAIRS], batch[TARGET_SEQUENCE], batch[TARGET_COMPLETION]
    out = token.new_zeros(2 * n).index_add(0, seq, torch.where(done, token, 0.0))
    if mean:
        out = out / token.new_zeros(2 * n).index_add(0, seq, done.to(token.dtype)).clamp(min=1.0)
    return out[:n], out[n:]


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor, logps_c: torch.Tensor,
                 logps_r: torch.Tensor) -> list[torch.Tensor]:
    """Sums over the pairs of REWARD_STATS (divided by the step's pairs when logged)."""
    c, r = chosen.detach(), rejected.detach()
    return [c.sum(), r.sum(), (c > r).float().sum(), (c - r).sum(), logps_c.detach().sum(), logps_r.detach().sum()]


@dataclass
class DPO(Preference):
    """Direct preference optimisation against a frozen reference (train/reference.py).

    sigmoid: -(1 - eps) log s(beta z) - eps log s(-beta z), z = (log pi(y_w) - log ref(y_w))
    - (log pi(y_l) - log ref(y_l)) with log-probs summed over the completion; eps is
    `label_smoothing` (conservative DPO). ipo: (z' - 1 / (2 beta))^2 with z' from per-token means
    (TRL's length-normalised IPO). Rewards: beta x the summed log-ratios.
    """

    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    reference: object = None  # reference.Reference: the log-probs when the batch has none precomputed
    name = "dpo"
    terms = (("pairs", 1.0),)
    stats = tuple((s, "pairs") for s in REWARD_STATS)

    def loss(self, model, batch: dict, chunk_size: int):
        ref = batch.get(REFERENCE_LOGPS)
        if ref is None:  # before the policy's forward: a reference adapter is swapped in and out
            ref = self.reference.logps(model, batch, chunk_size)
        n = batch[PAIRS]
        ref_c, ref_r = ref[:n].float(), ref[n:].float()
        token = token_logps(model, batch, chunk_size)
        pi_c, pi_r = sequence_logps(token, batch)
        ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
        if self.loss_type == "ipo":
            counts = batch[TARGET_SEQUENCE].new_zeros(2 * n).index_add(0, batch[TARGET_SEQUENCE],
                                                                      batch[TARGET_COMPLETION].long())
            counts = counts.clamp(min=1).to(token.dtype)
            z = ratio_c / counts[:n] - ratio_r / counts[n:]
            losses = (z - 1 / (2 * self.beta)) ** 2
        else:
            z = self.beta * (ratio_c - ratio_r)
            eps = self.label_smoothing
            losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps if eps else -F.logsigmoid(z)
        stats = reward_stats(self.beta * ratio_c, self.beta * ratio_r, pi_c, pi_r)
        return [losses.sum()], torch.stack(stats)


@dataclass
class ORPO(Preference):
    """Odds-ratio preference optimisation: no reference; NLL(chosen) - beta * mean log s(log odds ratio).

    log odds = (m_w - m_l) - (log(1 - e^m_w) - log(1 - e^m_l)) with m the per-token mean
    log-probs of the completions. Rewards: beta x those means (TRL's ORPO metrics).
    """

    name = "orpo"

    @property
    def terms(self):
        return (("nll_tokens", 1.0), ("pairs", -self.beta))

    stats = (("nll_loss", "nll_tokens"), ("log_odds_ratio", "pairs"), ("log_odds_chosen", "pairs"),
             *((s, "pairs") for s in REWARD_STATS))

    def loss(self, model, batch: dict, chunk_size: int):
        n = batch[PAIRS]
        token = token_logps(model, batch, chunk_size)
        nll = -torch.where(batch[TARGET_SEQUENCE] < n, token, 0.0).sum()
        mean_c, mean_r = sequence_logps(token, batch, mean=True)
        log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
        ratio = F.logsigmoid(log_odds)
        stats = [nll.detach(), ratio.detach().sum(), log_odds.detach().sum(),
                 *reward_stats(self.beta * mean_c, self.beta * mean_r, mean_c, mean_r)]
        return [nll, ratio.sum()], torch.stack(stats)


def build_objective(train, data=None, reference=None):
    """The recipe's objective: train.objective with its beta, label_smoothing and loss_type.

    Args:
        train (TrainConfig): the recipe's train section.
        data (DataConfig | None): data.train_on decides ORPO's NLL tokens. Default None.
        reference (reference.Reference | None): DPO's reference. Default None.
    """
    if train.objective == "dpo":
        return DPO(beta=train.beta, label_smoothing=train.label_smoothing, loss_type=train.loss_type,
                   reference=reference)
    if train.objective == "orpo":
        return ORPO(beta=train.beta, nll_on_prompt=data is not None and data.train_on == "all")
    return SFT()


def step_metrics(objective, sums: list[float], units: dict) -> tuple[float, dict]:
    """(the step's loss, {stat: mean}) from what the device summed, read back in one go.

    Args:
        objective: the run's objective.
        sums (list[float]): each term's sum, then each stat's, in the objective's order.
        units (dict): the global step's counts per unit.
    """
    k = len(objective.terms)
    loss = sum(w * s / max(units[u], 1) for (u, w), s in zip(objective.terms, sums[:k]))
    return loss, {name: s / max(units[u], 1) for (name, u), s in zip(objective.stats, sums[k:])}


def detached_sums(terms: list, stats: torch.Tensor | None) -> torch.Tensor:
    """One micro-batch's term sums, then its statistics, as one fp32 vector (the step adds them up)."""
    out = torch.stack([t.detach().float() for t in terms])
    return out if stats is None else torch.cat([out, stats.detach().float()])


def scaled_loss(objective, sums: list, units: dict) -> torch.Tensor:
    """What one micro-batch backpropagates: its share of the step's loss (`step_metrics` on tensors)."""
    out = None
    for (u, w), s in zip(objective.terms, sums):
        part = s / max(units[u], 1) if w == 1 else s * (w / max(units[u], 1))
        out = part if out is None else out + part
    return out
