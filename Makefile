# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing: torch pinned below, then torch-scatter and torch-cluster
# built from source against that torch (they ship no wheels for it), then vig_pyg in editable mode.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_SCATTER_VERSION ?= 2.1.2
TORCH_CLUSTER_VERSION ?= 1.6.3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Built extension wheels are kept outside the checkout, keyed by torch version, so that a fresh
# clone (CI) or a second set-up installs them in seconds instead of compiling for 15 minutes.
WHEEL_DIR ?= $(HOME)/.cache/vig_pyg/wheels/torch-$(TORCH_VERSION)
STAMP := $(VENV)/.vig_pyg-installed
LINT_PATHS := vig_pyg tests examples benchmarks

.PHONY: all demo test test-slow lint format setup wheels kernels docs clean-venv

all: test

setup: $(STAMP)

demo: $(STAMP) kernels
	$(PY) -m vig_pyg.demo

test: $(STAMP) lint kernels
	$(PY) -m pytest -q

test-slow: $(STAMP) kernels
	$(PY) -m pytest -q -m slow --runslow

# The optional compiled CPU kernels (kNN top-k, neighbour max), built for this torch into
# ~/.cache/vig_pyg/ops once per source version (about 20 s; afterwards this only loads them). ninja comes
# from the venv.
kernels: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m vig_pyg kernels --build

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-$(TORCH_VERSION): | $(PY)
	$(PIP) install --quiet torch==$(TORCH_VERSION) numpy setuptools wheel
	touch $@

# Each extension's setup.py imports torch and compiles serially, so the two wheels are built side by side.
# Order-only on the venv: a kept wheel is reused by a new venv with the same torch, never rebuilt.
$(WHEEL_DIR)/.torch_scatter-$(TORCH_SCATTER_VERSION): | $(VENV)/.torch-$(TORCH_VERSION)
	mkdir -p $(WHEEL_DIR)
	$(PIP) wheel --quiet --no-build-isolation --no-deps -w $(WHEEL_DIR) torch-scatter==$(TORCH_SCATTER_VERSION)
	touch $@

$(WHEEL_DIR)/.torch_cluster-$(TORCH_CLUSTER_VERSION): | $(VENV)/.torch-$(TORCH_VERSION)
	mkdir -p $(WHEEL_DIR)
	$(PIP) wheel --quiet --no-build-isolation --no-deps -w $(WHEEL_DIR) torch-cluster==$(TORCH_CLUSTER_VERSION)
	touch $@

wheels: $(WHEEL_DIR)/.torch_scatter-$(TORCH_SCATTER_VERSION) $(WHEEL_DIR)/.torch_cluster-$(TORCH_CLUSTER_VERSION)

# pip prefers the kept wheels over the registry's source archives; their dependencies (scipy) come from
# the registry.
$(STAMP): pyproject.toml $(VENV)/.torch-$(TORCH_VERSION)
	$(MAKE) -j2 wheels
	$(PIP) install --quiet --find-links $(WHEEL_DIR) \
		torch-scatter==$(TORCH_SCATTER_VERSION) torch-cluster==$(TORCH_CLUSTER_VERSION)
	$(PIP) install --quiet -e '.[test,docs,export,train,kernels]'
	touch $@

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

clean-venv:
	rm -rf $(VENV)
