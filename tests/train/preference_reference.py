"""Test reference for preference tuning: what TRL's DPO and ORPO trainers compute on exactly one batch.

qlora-lite's own DPO/ORPO is compared with these numbers (loss, TRL's logged metrics, LoRA gradients). TRL is
used only here, as a reference for tests; qlora-lite never imports it at run time.

Both functions build the real trainer (trl 1.16) around a plain fp32 model with a PEFT LoRA adapter, collate
`pairs` with the trainer's own data collator (the token ids are used exactly as given: no BOS/EOS added, no
truncation, right padding), call the trainer's `compute_loss` once in train mode, backpropagate, and read the
adapter gradients. No optimizer step is taken. Everything runs on CPU in fp32 with dropout off, so the numbers
are deterministic.

`pairs`: [{"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}, ...], already tokenized.
`lora`: {"r": int, "alpha": float, "dropout": float, "target_modules": [str]}.
`adapter_init`: optional {key: tensor} for every lora_A/lora_B weight, keys as in a PEFT adapter file
("base_model.model.<module path>.lora_A.weight") or without the "base_model.model." prefix; loaded into the
"default" adapter before the step (PEFT starts lora_B at zero, which would make the policy equal the reference).
Gradients come back under "<module path>.lora_A.weight" / ".lora_B.weight" (no prefix, no ".default").
"""

from __future__ import annotations

import os
import tempfile

import torch

_PEFT_PREFIX = "base_model.model."


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load_model_and_tokenizer(model_dir: str, seed: int):
    """The fp32 model, and a word-level tokenizer "t<id>" <-> id over its vocabulary. The tokenizer only lets the
    trainers construct (they tokenize a one-row placeholder dataset); the batch itself is built from ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, set_seed

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else pad_id
    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token=f"t{pad_id}"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}", unk_token=f"t{pad_id}"
    )
    return model, tokenizer


def _placeholder_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "t3 t4", "chosen": " t5", "rejected": " t6"}])


def _peft_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _short_name(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX).replace(".default.", ".")


def _load_adapter(peft_model, adapter_init: dict[str, torch.Tensor] | None) -> None:
    """Copy `adapter_init` into the "default" adapter; every lora_A/lora_B weight must be given, nothing else."""
    if adapter_init is None:
        return
    params = {_short_name(n): p for n, p in peft_model.named_parameters() if ".default." in n and "lora_" in n}
    given = {_short_name(k): v for k, v in adapter_init.items()}
    if set(given) != set(params):
        raise KeyError(
            f"adapter_init keys do not match the adapter: missing {sorted(set(params) - set(given))}, "
            f"unexpected {sorted(set(given) - set(params))}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(given[name].to(p.dtype))


def _adapter_grads(peft_model) -> dict[str, torch.Tensor]:
    return {
        _short_name(n): p.grad.detach().clone()
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" in n
    }


def _common_args(out_dir: str, beta: float, seed: int, n_pairs: int) -> dict:
    return {
        "output_dir": out_dir,
        "beta": beta,
        "seed": seed,
        "per_device_train_batch_size": n_pairs,
        "bf16": False,  # TRL defaults to bf16=True
        "fp16": False,
        "gradient_checkpointing": False,  # TRL defaults to True
        "disable_dropout": True,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
    }


def trl_dpo_one_batch(model_dir: str, pairs: list[dict], lora: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                      seed: int = 0, adapter_init: dict[str, torch.Tensor] | None = None) -> dict:
    """TRL DPOTrainer (trl 1.16) with a PEFT LoRA model (reference = the adapter disabled) on one batch of `pairs`.

    The batch is `trainer.data_collator(pairs)` (TRL's DataCollatorForPreference: rows [chosen..., rejected...],
    each prompt+completion, right padded, `completion_mask` on the completion ids) and the step is
    `trainer.compute_loss(model, batch)` then `loss.backward()`. For loss_type "sigmoid":
    loss = mean(-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))), with pi/ref the SUM of the completion
    tokens' log-probs (label_smoothing is not used by "sigmoid" in trl 1.16).

    Returns {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", ... (every metric TRL logs for this step, as floats: also "entropy",
    "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"), "grads": {name: tensor}}.
    rewards/* = beta * (policy - reference) summed logps, averaged over pairs; logps/* = policy sums, averaged.
    """
    _offline()
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _load_model_and_tokenizer(model_dir, seed)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **_common_args(out_dir, beta, seed, len(pairs)),
            loss_type=[loss_type],
            max_length=None,  # no truncation: score exactly the ids given
            precompute_ref_log_probs=False,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=_placeholder_dataset(),
                             processing_class=tokenizer, peft_config=_peft_config(lora))
        peft_model = trainer.model
        _load_adapter(peft_model, adapter_init)
        batch = trainer.data_collator(
            [{k: list(p[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]
        )
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(peft_model, batch)
        loss.backward()
        result = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
        result["loss"] = loss.item()
        result["grads"] = _adapter_grads(peft_model)
    return result


def trl_orpo_one_batch(model_dir: str, pairs: list[dict], lora: dict, beta: float = 0.1, seed: int = 0,
                       adapter_init: dict[str, torch.Tensor] | None = None) -> dict:
    """trl.experimental.orpo ORPOTrainer (trl 1.16) with a PEFT LoRA model on one batch of `pairs`.

    The batch is `trainer.data_collator(features)` (DPODataCollatorWithPadding) on features in the format the
    trainer's `tokenize_row` produces, but from the given ids (its own tokenization would add BOS and EOS):
    chosen_input_ids = prompt + chosen, chosen_labels = [-100] * len(prompt) + chosen (same for rejected),
    right padded. The step is `trainer.compute_loss(model, batch, return_outputs=True)` then `loss.backward()`.
    TRL computes: logps = per-pair MEAN log-prob of the completion tokens;
    log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr))); nll_loss = cross-entropy averaged over every
    non-pad token of the chosen rows after the first, PROMPT INCLUDED, pooled over the batch (not per pair);
    loss = nll_loss - beta * mean(logsigmoid(log_odds)).

    Returns {"loss", "nll_loss", "log_odds_ratio" (= mean logsigmoid(log_odds)), "log_odds_chosen"
    (= mean log_odds), "rewards/chosen", "rewards/rejected" (beta * mean logps), "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grads": {...}}.
    """
    _offline()
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = _load_model_and_tokenizer(model_dir, seed)
    with tempfile.TemporaryDirectory() as out_dir:
        args = ORPOConfig(**_common_args(out_dir, beta, seed, len(pairs)), max_length=1024,
                           remove_unused_columns=False)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=_placeholder_dataset(),
                              processing_class=tokenizer, peft_config=_peft_config(lora))
        peft_model = trainer.model
        _load_adapter(peft_model, adapter_init)
        features = []
        for p in pairs:
            prompt, row = list(p["prompt_ids"]), {}
            row["prompt_input_ids"], row["prompt_attention_mask"] = prompt, [1] * len(prompt)
            for side in ("chosen", "rejected"):
                completion = list(p[f"{side}_ids"])
                row[f"{side}_input_ids"] = prompt + completion
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
                row[f"{side}_labels"] = [-100] * len(prompt) + completion
            features.append(row)
        batch = trainer.data_collator(features)
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss, metrics = trainer.compute_loss(peft_model, batch, return_outputs=True)
        loss.backward()
        result = {k: float(v) for k, v in metrics.items()}
        result["loss"] = loss.item()
        result["grads"] = _adapter_grads(peft_model)
    return result
