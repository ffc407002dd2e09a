# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The CPU demo end to end: train (eval loss and a generation before vs after), then merge the
# adapter into a plain Hugging Face model, check it against the 4-bit base + adapter, and ask it.
demo: install
	$(BIN)/qlora-lite run recipes/tiny-cpu-sft.yaml --demo --overwrite
	$(BIN)/qlora-lite export runs/tiny-cpu-sft --out runs/tiny-cpu-sft-merged --verify --overwrite
	$(BIN)/qlora-lite generate runs/tiny-cpu-sft-merged --prompt "What is the capital of Norway?"

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs .cache
