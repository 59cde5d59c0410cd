# tmem-testbed: everything a fresh machine needs is set up by these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSDEPS_STAMP := $(VENV)/.system-packages
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all test stress testbed image bench profile fuzz typecheck doctor deps clean

all: test

$(SYSDEPS_STAMP): ci/system-packages.txt ci/install-system-packages.sh
	ci/install-system-packages.sh
	@mkdir -p $(VENV) && touch $@

$(VENV_STAMP): pyproject.toml $(wildcard host/tmem_host/*/_*.c) $(SYSDEPS_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

deps: $(VENV_STAMP)

image: deps
	$(PY) -m tmem_host.vm.image build

# --durations: the slowest tests in every run's output, so the suite's cost stays visible.
test: image
	$(PY) -m pytest -m "not stress" --durations=25 $(PYTEST_ARGS)

# Guest runs near the agent's deadlock bound (no cgroup, 1.5-2x guest RAM).
stress: image
	$(PY) -m pytest -m stress $(PYTEST_ARGS)

typecheck: deps
	$(PY) -m mypy

bench: deps
	$(PY) -m tmem_host.bench

# Where tmemd's time goes on each hot path (py-spy samples; docs/PERFORMANCE.md).
profile: deps
	$(PY) -m tmem_host.bench --profile

fuzz: deps
	$(PY) -m tmem_host.fuzz --frames 1000000

doctor: deps
	$(VENV)/bin/tmem-testbed doctor

testbed: image
	$(VENV)/bin/tmem-testbed run scenarios/default.toml

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .hypothesis
