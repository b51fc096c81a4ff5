"""Clients in other languages talk to the same real `legion serve` subprocess
as the controller-service tests (tests/server/conftest.py): its agents, its
fake model on loopback, its tokens. Here: the Node.js client's set-up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import missing
from tests.server.conftest import (  # noqa: F401 - fixtures, used by name
    Served,
    fake_model,
    legion_cli,
    served,
    server_env,
    tokens,
)

HERE = Path(__file__).parent


@pytest.fixture(scope="package")
def node() -> str:
    """The node binary, with the client's packages installed (`make test` does it)."""
    found = shutil.which("node")
    if found is None:
        missing("node is not installed (apt-get install nodejs npm): the Node client cannot run")
    if not (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            "the Node client's packages are not installed: `make test` installs them "
            "(or `npm install` in tests/interop)",
            pytrace=False,
        )
    return found
