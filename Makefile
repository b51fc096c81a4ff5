# Quick start: `make demo`, then `make test`. Both set up everything they need:
# a virtualenv, a Docker engine (installed and started when none answers and
# this is root on Debian; gVisor registered beside runc where it can be), and
# the sandbox image.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.legion-installed
# The Node.js interop client's packages (tests/interop), installed by npm.
NODE_STAMP := tests/interop/node_modules/.legion-installed
# The dashboard's browser test (tests/dashboard): playwright-core, installed by
# npm, drives Debian's chromium.
BROWSER_STAMP := tests/dashboard/node_modules/.legion-installed
# The MCP reference servers (tests/mcp): server-memory and server-everything,
# installed by npm and run with node by tests/integration/test_mcp.py.
MCP_STAMP := tests/mcp/node_modules/.legion-installed
CHROMIUM := /usr/bin/chromium

.PHONY: demo test bench image environments protos lint docker setup interop mcp-servers browser clean

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

# The shipped environments (sandbox_image/recipes/): content-addressed, so a
# no-op (under a second) unless a recipe or the runner changed; a build takes
# about 30 s here (pip download on the host, installed offline in the build).
environments: image
	@$(VENV)/bin/legion image build --recipe data

demo: image
	@$(PY) examples/agent_demo.py

# npm packages of a Node.js test folder (tests/interop, tests/dashboard).
tests/%/node_modules/.legion-installed: tests/%/package.json tests/%/.npmrc
	@if command -v npm >/dev/null 2>&1; then \
		echo "make: installing the npm packages of tests/$* (npm install)..."; \
		cd tests/$* && npm install --no-audit --no-fund --loglevel=error && touch node_modules/.legion-installed; \
	else \
		echo "make: npm not found, so tests/$* cannot be set up (apt-get install nodejs npm)"; \
	fi

interop: $(NODE_STAMP)
	@true

mcp-servers: $(MCP_STAMP)
	@true

# Debian's chromium, installed only when it is missing and this is root on Debian.
browser: $(BROWSER_STAMP)
	@if [ -x $(CHROMIUM) ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing Debian's chromium for the dashboard's browser test (apt-get install chromium)..."; \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "make: chromium could not be installed; the dashboard's browser test will be skipped"; \
	else \
		echo "make: $(CHROMIUM) is missing (apt-get install chromium as root); the dashboard's browser test will be skipped"; \
	fi

# The core integration suite, run a second time with every sandbox of the
# shared runtime under gVisor (runsc) when the engine has it.
GVISOR_SUITE := tests/integration/test_sandbox.py tests/integration/test_agent.py \
	tests/integration/test_live.py tests/integration/test_snapshot.py \
	tests/integration/test_subagents.py tests/integration/test_human.py \
	tests/integration/test_files.py tests/integration/test_artifacts.py \
	tests/integration/test_run_files.py

test: image environments interop mcp-servers browser
	@$(PY) -m pytest
	@if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then \
		echo "make: the core integration suite again, every sandbox under gVisor (runsc)..."; \
		LEGION_TEST_RUNTIME=runsc $(PY) -m pytest -q -p no:cacheprovider $(GVISOR_SUITE); \
	elif [ "$${LEGION_REQUIRE_GVISOR:-}" = 1 ]; then \
		echo "make: LEGION_REQUIRE_GVISOR=1 but runsc is not registered (scripts/ensure-gvisor)" >&2; exit 1; \
	else \
		echo "make: runsc is not registered with the engine; the gVisor pass is skipped"; \
	fi

bench: image environments
	@$(PY) -m bench

protos: setup
	@$(PY) scripts/gen-protos.py

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check controller sandbox_image tests examples scripts bench
	@$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/interop/node_modules \
		tests/dashboard/node_modules tests/mcp/node_modules
