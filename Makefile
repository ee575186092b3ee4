# `make test` and `make demo` set everything up from a bare Python 3.11.
# (tests/conftest.py gives the tests 8 fake CPU devices; the demo runs on what is there.)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo bench clean shellcheck

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

test: $(VENV)/.installed-test shellcheck
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(BIN)/isr-dpo demo --workdir=runs/demo

bench: $(VENV)/.installed-test
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache runs

# The launcher tests lint the shell scripts; Debian's shellcheck, when apt is there.
shellcheck:
	@command -v shellcheck >/dev/null || (command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1) || \
	  echo "shellcheck unavailable: its lint test will skip"
