"""The seams hold: one module per outside engine."""

from __future__ import annotations

import re
from pathlib import Path

import legion

PACKAGE = Path(legion.__file__).parent
DOCKER_IMPORT = re.compile(r"^\s*(import docker\b|from docker\b)", re.MULTILINE)
# The Docker backend; and image building (the runner's, environments') and
# `legion doctor`, which talk to the engine about images and the machine, not
# about sandboxes.
MAY_IMPORT_DOCKER = {
    "sandbox/docker_backend.py",
    "sandbox/image.py",
    "sandbox/environment.py",
    "doctor.py",
}


def test_only_the_docker_backend_imports_docker_py() -> None:
    importers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if DOCKER_IMPORT.search(path.read_text())
    }
    assert "sandbox/docker_backend.py" in importers  # the grep itself works
    assert importers <= MAY_IMPORT_DOCKER, importers - MAY_IMPORT_DOCKER


def test_the_runtime_takes_any_backend() -> None:
    from legion.sandbox import SandboxBackend, SandboxRuntime
    from legion.sandbox.docker_backend import DockerBackend

    runtime = SandboxRuntime(pool_size=0)
    assert isinstance(runtime.backend, DockerBackend)
    assert isinstance(runtime.backend, SandboxBackend)
    chosen = DockerBackend(image="legion-sandbox:chosen", runtime_id="r" * 32)
    runtime = SandboxRuntime(backend=chosen, pool_size=0)
    assert runtime.backend is chosen and runtime.id == "r" * 32
    assert runtime.image == "legion-sandbox:chosen"
