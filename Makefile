# Quick start: `make demo`, then `make test`. Both set up everything they need:
# a virtualenv, a Docker engine (installed and started when none answers and
# this is root on Debian; gVisor registered beside runc where it can be), and
# the sandbox image.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.legion-installed

.PHONY: demo test bench image protos lint docker setup clean

$(STAMP): pyproject.toml
	@echo "make: setting up $(VENV) (Python packages; the first time takes a minute or two)..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

docker:
	@scripts/ensure-docker
	@scripts/ensure-gvisor

image: setup docker
	@$(VENV)/bin/legion image build

demo: image
	@$(PY) examples/agent_demo.py

test: image
	@$(PY) -m pytest

bench: image
	@$(PY) -m bench

protos: setup
	@$(PY) scripts/gen-protos.py

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check controller sandbox_image tests examples scripts bench
	@$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
