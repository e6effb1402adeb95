# Set-up and entry points. Every target creates .venv on first use and installs what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The CPU build first, so that nothing pulls a multi-GB CUDA build of torch.
TORCH := torch==2.13.0

.PHONY: demo test bench install clean

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/rmsprop demo

test: $(INSTALLED)
	$(BIN)/python -m pytest

# The optimizer-step benchmark (docs/benchmark.md); takes minutes, torch.compile most of them.
bench: $(INSTALLED)
	$(BIN)/rmsprop bench --json out/benchmark.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
