# Set-up and entry points. Every target creates .venv on first use and installs what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The CPU build first, so that nothing pulls a multi-GB CUDA build of torch.
TORCH := torch==2.13.0

.PHONY: demo test install clean

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/rmsprop demo

# About 10 minutes on 2 cores; prints the tables of docs/memory.md.
.PHONY: bench-memory
bench-memory: $(INSTALLED)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/rmsprop bench-memory

test: $(INSTALLED)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
