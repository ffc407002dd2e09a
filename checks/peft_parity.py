"""Logit parity with peft: our NF4 + LoRA model vs transformers 4-bit + peft LoRA, same adapter values.

    python checks/peft_parity.py [--work-dir /tmp/peft-parity]

Prints, per architecture, the max/mean |logit difference| and our adapter file size. peft is the
reference here (a test/bench extra), never a runtime dependency.
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args()

    import peft
    from transformers import AutoModelForCausalLM

    from qlora_lite.lora.files import save_adapter
    from qlora_lite.lora.layer import attach_lora, lora_modules
    from qlora_lite.model.loader import bnb_config, disable_cpu_weight_packing, load_model
    from qlora_lite.model.tiny import build_tiny_model
    from qlora_lite.recipe import LoraConfig, ModelConfig, QuantizationConfig

    work = args.work_dir or tempfile.mkdtemp(prefix="peft-parity-")
    lora = LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.0)
    for arch in ("llama", "mistral", "qwen2"):
        path = build_tiny_model(f"{work}/{arch}", arch=arch)
        x = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
        logits = {}
        for dtype in (torch.bfloat16, torch.float32):
            ours = load_model(ModelConfig(name_or_path=path, gradient_checkpointing=False))
            attach_lora(ours, lora, dtype=dtype)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # the same bf16-representable adapter values for both dtypes
                for m in lora_modules(ours).values():
                    for w, std in ((m.lora_A.weight, 0.1), (m.lora_B.weight, 0.05)):
                        w.copy_((torch.randn(w.shape, generator=g) * std).to(torch.bfloat16))
                logits[dtype] = ours(x).logits.float()
            if dtype == torch.bfloat16:  # the adapter as training writes it
                size = save_adapter(ours, f"{work}/{arch}-adapter", lora, path)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig()),
                                                    device_map="cpu", dtype=torch.bfloat16)
        # Both sides on bitsandbytes' training kernel: its CPU inference repacking rounds the scales.
        disable_cpu_weight_packing(base)
        ref = peft.get_peft_model(base, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM"))
        sd = ref.state_dict()
        with torch.no_grad():
            for name, m in lora_modules(ours).items():
                for ab in ("lora_A", "lora_B"):
                    sd[f"base_model.model.{name}.{ab}.default.weight"].copy_(getattr(m, ab).weight)
            want = ref(input_ids=x).logits.float()
        for dtype, got in logits.items():
            d = (got - want).abs()
            print(f"{arch:8s} ours ({str(dtype)[6:]} adapters) vs peft (fp32 adapters): max|logit| {want.abs().max():.3f}  "
                  f"max|diff| {d.max():.4g}  mean|diff| {d.mean():.3g}  "
                  f"argmax agree {(got.argmax(-1) == want.argmax(-1)).float().mean():.3f}")
        print(f"{arch:8s} adapter_model.safetensors: {size:,} bytes (bf16, r={lora.r}, all-linear)")


if __name__ == "__main__":
    main()
