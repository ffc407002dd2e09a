"""The Hugging Face side of bench/peers.py: transformers + peft + TRL, as documented, or tuned.

`default` is the QLoRA paper / PEFT / TRL recipe: BitsAndBytesConfig, prepare_model_for_kbit_training
(which upcasts every non-quantized weight to fp32 and turns on reentrant checkpointing),
LoraConfig(all-linear), SFTTrainer on prompt/completion rows with padded batches.
`tuned` is that stack as an expert would set it up on this hardware: no prepare_model_for_kbit_training
(bf16 stays bf16), non-reentrant gradient checkpointing, and TRL packing=True (best-fit packed rows,
padding-free, loss still on completions only).
peft and trl are imported here only; this file runs inside a worker process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

REFERENCES = ("default", "tuned")


def reference_worker(spec: dict, lora: dict, callbacks=()) -> dict:
    """Train one run of the HF stack from a bench spec; returns counts, time and per-step losses.

    Args:
        spec (dict): the run (bench/peers.py's spec; "optim" and "max_steps" optional).
        lora (dict): r, alpha, dropout.
        callbacks (list[TrainerCallback]): more callbacks for the Trainer (bench/gpu_speed.py's clock).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_lite.data.templates import alpaca_prompt

    tuned = spec.get("reference", "default") == "tuned"
    set_seed(spec["seed"])  # the adapters are initialised before the Trainer seeds anything
    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = json.loads(Path(spec["rows"]).read_text())
    # qlora-lite starts every Alpaca row with BOS; a tokenizer that does not add it itself (SmolLM2's)
    # gets it written into the prompt, so both sides train the same ids.
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = tokenizer.bos_token if tokenizer.bos_token and not adds_bos else ""
    dataset = Dataset.from_list([{"prompt": bos + alpaca_prompt(r["instruction"], r.get("input") or ""),
                                  "completion": r["output"]} for r in rows])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if cuda else "cpu"})
    if not tuned:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    extra = {"packing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} if tuned else {}
    config = SFTConfig(
        output_dir=str(Path(spec["out"]) / "trl"), per_device_train_batch_size=1 if tuned else spec["batch"],
        gradient_accumulation_steps=spec["accum"], num_train_epochs=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, optim=spec.get("optim", "paged_adamw_32bit"), weight_decay=0.0,
        max_steps=spec.get("max_steps", -1),
        max_grad_norm=1.0, max_length=spec["max_seq_len"], bf16=True, gradient_checkpointing=True,
        logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], disable_tqdm=True,
        use_cpu=not cuda, dataloader_num_workers=0, **extra,
    )
    steps: list[list] = []  # per optimizer step: [response tokens so far, loss]
    counts = {"tokens": 0, "trained": 0}

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Still the collated CPU batch here, so counting costs no device sync. Packed rows carry
            # no attention_mask: every position is a real token.
            mask = inputs.get("attention_mask")
            counts["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            counts["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    clock: list[list] = []  # per optimizer step: [tokens so far, seconds since on_train_begin]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            counts["train_s"] = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                steps.append([counts["trained"], float(logs["loss"])])
                clock.append([counts["tokens"], time.perf_counter() - self.t0])

    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=peft_config, callbacks=[Clock(), *callbacks])
    trainer.train()
    trainer.model.save_pretrained(str(Path(spec["out"]) / "adapter"))  # PEFT format, scored by peers_score.py
    # Turn cumulative counts into per-step response tokens, as qlora-lite logs them.
    per_step = [[b[0] - a[0], b[1]] for a, b in zip([[0, 0]] + steps, steps)]
    step_clock = [[b[0] - a[0], b[1] - a[1]] for a, b in zip([[0, 0.0]] + clock, clock)]  # [tokens, s] per step
    return {"tokens": counts["tokens"], "trained_tokens": counts["trained"], "train_s": counts["train_s"],
            "steps": per_step, "step_clock": step_clock}
