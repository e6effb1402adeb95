# Set-up and entry points. Every target creates .venv on first use and installs what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The CPU build first, so that nothing pulls a multi-GB CUDA build of torch.
TORCH := torch==2.13.0
# The Triton release on this machine's disk (tests/test_triton.py runs its interpreter); Linux only.
TRITON := "triton==3.8.0; sys_platform == 'linux'"
# Without its dependencies: they pull torchvision, whose PyPI build does not load
# with the CPU torch: tests/recipes/test_timm.py then skips, saying why, and .venv-frameworks
# loads only timm's RMSpropTF, which needs only torch.
TIMM := timm==1.0.31

.PHONY: demo test test-recipes bench install clean compare test-frameworks golden docs docs-serve

# torch is named with the extras so that none of them can replace the CPU build. --no-compile:
# Python compiles a module when it is first imported; pip compiling every module of the
# frameworks (transformers alone has thousands) took most of their install time.
$(INSTALLED): pyproject.toml setup.py Makefile $(wildcard src/rmsprop/backends/cpu/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) $(TRITON)
	$(BIN)/pip install --quiet --no-compile $(TORCH) -e '.[test,recipes,docs]'
	$(BIN)/pip install --quiet --no-compile --no-deps $(TIMM)
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/rmsprop demo

# The full study of RMSProp's claims (docs/results/): 43 CPU-minutes over one worker process per core;
# 36 minutes on 2 busy shared cores.
compare: $(INSTALLED)
	$(BIN)/rmsprop compare --out docs/results

# About 10 minutes on 2 cores; prints the tables of docs/memory.md.
.PHONY: bench-memory
bench-memory: $(INSTALLED)
	$(BIN)/pip install --quiet --no-compile $(TORCH) -e '.[bench]'
	$(BIN)/rmsprop bench-memory

# One pytest worker per core: much of a run is single-threaded compiling (torch.compile,
# the CPU kernel of the build-kernel test), and the workers share it out
# (2 cores: 7.3 minutes of tests instead of 11.6).
test: $(INSTALLED)
	$(BIN)/python -m pytest -n auto

# The framework recipes only (tests/recipes/; part of make test, where they add about 50 s to
# a fresh install and 46 CPU-seconds of tests on 2 cores).
test-recipes: $(INSTALLED)
	$(BIN)/python -m pytest -n auto -m recipes

# The documentation site, built into site/; --strict turns every warning (a broken link, a
# missing snippet or docstring) into a failure. CI runs it after the tests.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The optimizer-step benchmark (docs/benchmark.md); takes minutes, torch.compile most of them.
# bitsandbytes (the bench extra) for the peer column of the state-precision table.
bench: $(INSTALLED)
	$(BIN)/pip install --quiet --no-compile $(TORCH) -e '.[bench]'
	$(BIN)/rmsprop bench --json out/benchmark.json

# The frameworks that the presets reproduce, in a venv of their own: the live
# comparisons (pytest -m frameworks) and the golden vectors tests/golden/frameworks.json.
FW_VENV := .venv-frameworks
FW_INSTALLED := $(FW_VENV)/.installed
FRAMEWORKS := jax==0.10.2 optax==0.2.8 keras==3.15.1

$(FW_INSTALLED): pyproject.toml Makefile
	test -x $(FW_VENV)/bin/python || $(PYTHON) -m venv $(FW_VENV)
	$(FW_VENV)/bin/pip install --quiet $(TORCH)
	$(FW_VENV)/bin/pip install --quiet $(FRAMEWORKS)
	$(FW_VENV)/bin/pip install --quiet --no-deps $(TIMM)
	$(FW_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

test-frameworks: $(FW_INSTALLED)
	$(FW_VENV)/bin/python -m pytest -m frameworks

golden: $(FW_INSTALLED)
	$(FW_VENV)/bin/python tools/make_framework_vectors.py

clean:
	rm -rf $(VENV) $(FW_VENV) .pytest_cache .hypothesis site
