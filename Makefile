PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo bench lint conformance docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check refax tests benchmarks examples
	$(BIN)/ruff check refax tests benchmarks examples

test: $(VENV)/.installed-test lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

# ARGS="--devices 8" (data-parallel on 8 simulated CPU devices), ARGS="--processes 2", --epochs N,
# --out DIR, --quick
demo: $(VENV)/.installed-demo
	$(BIN)/python examples/demo.py $(ARGS)

# The reference's own NNX suite against refax; fails below the floor in docs/deviations.md.
conformance: $(VENV)/.installed-test
	$(BIN)/python .ci/conformance.py -n 2

# The documentation site (docs/site + mkdocs.yml) into site/; open site/index.html.
# --strict: a broken link or anchor, or a reference to a missing name, fails the build.
$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) site
