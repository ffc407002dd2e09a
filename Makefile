# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)


$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/qlora-lite run recipes/tiny-cpu-sft.yaml --demo

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs .cache
