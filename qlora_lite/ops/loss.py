"""Cross-entropy and token log-probabilities from hidden states, in chunks: full fp32 logits are
never materialised.

For a 32k vocabulary and 2k tokens the plain loss holds B*T*V fp32 logits and their
gradient (~0.5 GB per sequence); here only `chunk_size` rows of logits live at a time,
and only for tokens that carry a label (the response tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.dataset import IGNORE_INDEX

# On CPU, torch's bf16 matmul (oneDNN) caches a primitive per shape, and for the output
# projection each holds a scratchpad the size of its weight: a new count of response tokens every
# step grew a SmolLM2-135M run (vocab 49,152) by ~20 MB a step, 290 MB in 15 steps. Padding the
# loss rows to a multiple of this bounds the shapes (8 of them for 512-token rows); a padded row
# has a zero hidden state and an ignored target, so it adds nothing to the loss or gradients.
CPU_LOSS_ROW_MULTIPLE = 64


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of tokens it covers: minus the sum of
    `chunked_token_logps`, so SFT and the preference losses score tokens by one rule.

    Args:
        hidden (Tensor): [B, T, H] final hidden states.
        weight (Tensor): [V, H] output embedding (lm_head) weight.
        labels (Tensor): [B, T] token ids, IGNORE_INDEX where no loss; shifted here.
        chunk_size (int): tokens per chunk; 0 computes all logits at once. Default 1024.
        positions (Tensor | None): `label_positions(labels)` computed on the host batch, so
            selecting the labelled rows needs no device-to-host sync. Default: computed here.

    Returns:
        (loss_sum, n_tokens): divide by the step's token count, not the micro-batch's, so
        gradient accumulation weights every trained token equally. No labelled token gives a
        zero that still backpropagates (every rank's backward must run).
    """
    logps = chunked_token_logps(hidden, weight, labels, chunk_size, positions)
    return -logps.sum(), int(logps.shape[0])  # a shape, known on the host


def _chunk_logps(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # log p(target) = -cross_entropy per row: the fused log-softmax, no [rows, V] log-prob tensor kept.
    return -F.cross_entropy((h @ weight.T).float(), target, reduction="none", ignore_index=IGNORE_INDEX)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-probabilities of the labelled next tokens, in label order, computed in chunks.

    SFT sums them (`chunked_cross_entropy`), the preference losses per sequence; only
    `chunk_size` rows of logits exist at a time, in the policy's backward (recomputed per
    chunk) and in the reference pass under no_grad alike (trl #3168: full-vocabulary logits of
    the reference pass took 17 GB on a 4-bit 0.5B).

    Args:
        hidden (Tensor): [B, T, H] final hidden states.
        weight (Tensor): [V, H] output embedding weight.
        labels (Tensor): [B, T] token ids, IGNORE_INDEX where no log-prob is wanted; shifted here.
        chunk_size (int): rows per chunk; 0 computes all at once. Default 1024.
        positions (Tensor | None): `label_positions(labels)` from the host batch. Default: computed here.

    Returns: [n] fp32, one per labelled token, in the row-major order of `labels[:, 1:]`.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = (target != IGNORE_INDEX).nonzero().squeeze(1)
    h, target = h.index_select(0, positions), target.index_select(0, positions)
    n = int(target.shape[0])
    pad = -n % CPU_LOSS_ROW_MULTIPLE if h.device.type == "cpu" else 0  # bounded matmul shapes, as above
    if pad:
        h, target = F.pad(h, (0, 0, 0, pad)), F.pad(target, (0, pad), value=IGNORE_INDEX)
    if chunk_size <= 0 or n + pad <= chunk_size:
        return _chunk_logps(h, weight, target)[:n]
    step = checkpoint if torch.is_grad_enabled() else (lambda f, *a, **_: f(*a))
    parts = [step(_chunk_logps, h[i:i + chunk_size], weight, target[i:i + chunk_size], use_reentrant=False)
             for i in range(0, n + pad, chunk_size)]
    return torch.cat(parts)[:n]


def token_logps(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """Run the decoder and return `chunked_token_logps` of the batch's labelled tokens.

    Args:
        model: a Hugging Face causal LM (LoRA-wrapped or not).
        batch (dict): input_ids, labels, and optionally attention_mask / position_ids.
        chunk_size (int): see `chunked_token_logps`.
    """
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    positions = batch.get(LABEL_POSITIONS)
    if not plain_linear_head(model):  # the model shapes its logits: let it, then gather
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        target = batch["labels"][:, 1:].reshape(-1)
        if positions is None:
            positions = (target != IGNORE_INDEX).nonzero().squeeze(1)
        logits, target = logits.reshape(-1, logits.shape[-1]).index_select(0, positions), target.index_select(0, positions)
        return -F.cross_entropy(logits, target, reduction="none")
    out = model.get_decoder()(**inputs, use_cache=False)
    return chunked_token_logps(out.last_hidden_state, model.get_output_embeddings().weight, batch["labels"],
                               chunk_size, positions)


def causal_lm_loss(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Run the decoder, then the summed next-token cross-entropy and its token count
    (minus the sum of `token_logps`).

    Args:
        model: a Hugging Face causal LM (LoRA-wrapped or not).
        batch (dict): input_ids, labels, and optionally attention_mask / position_ids.
        chunk_size (int): see `chunked_token_logps`.
    """
    logps = token_logps(model, batch, chunk_size)
    return -logps.sum(), int(logps.shape[0])


# What the decoder takes from a batch; `packed_sample_bounds` is read once per forward by the
# packed attention (attention.BOUNDS_KWARG).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "packed_sample_bounds")
LABEL_POSITIONS = "label_positions"


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the shifted targets that carry a loss (call it on the host batch)."""
    return (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


# Config fields with which a model's logits are more than hidden @ lm_head.weight.T.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def plain_linear_head(model) -> bool:
    """True when logits = hidden @ W.T exactly, so the chunked loss computes the model's loss."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return False
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return all(getattr(cfg, k, None) in (None, 1, 1.0) for k in LOGIT_TRANSFORMS)
