"""Shared fixtures. Tests that need Docker take the ``runtime`` fixture (or
``docker_ready``). Without an engine or image they skip, unless
LEGION_REQUIRE_DOCKER=1 (CI), which turns that skip into a failure."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import docker
import pytest

import legion
from legion.sandbox import image as legion_image
from legion.sandbox.docker_backend import LABEL, OWNER_LABEL, owner_alive, owner_id
from legion.testing import forbid_model_requests

REQUIRE_DOCKER = os.environ.get("LEGION_REQUIRE_DOCKER") == "1"


def _docker_problem() -> str | None:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        return f"no Docker engine answers ({exc}); run `make test`, which starts one"
    tag = legion_image.image_tag()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return f"the sandbox image {tag} is not built; run `make image`"
    return None


def missing(problem: str) -> NoReturn:
    """Skip the test for want of something it needs; under
    LEGION_REQUIRE_DOCKER=1 (CI, where everything must run) fail instead."""
    if REQUIRE_DOCKER:
        pytest.fail(f"LEGION_REQUIRE_DOCKER=1 but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def docker_ready() -> None:
    problem = _docker_problem()
    if problem is not None:
        missing(problem)


@pytest.fixture(scope="session")
def docker_client(docker_ready: None) -> docker.DockerClient:
    return docker.from_env(timeout=60)


@pytest.fixture(scope="session")
def gvisor_ready(docker_client: docker.DockerClient) -> None:
    """runsc registered with the engine (scripts/ensure-gvisor); skips without
    it, or fails under LEGION_REQUIRE_DOCKER=1 (CI)."""
    if "runsc" in docker_client.info().get("Runtimes", {}):
        return
    missing("runsc is not registered with the Docker engine; run scripts/ensure-gvisor")


CONTAINER_RUNTIME = os.environ.get("LEGION_TEST_RUNTIME") or None
"""``runsc``: the shared runtime's sandboxes run under gVisor (`make test`
runs the core integration suite a second time that way)."""


@pytest.fixture(scope="session")
async def runtime(docker_ready: None) -> AsyncIterator[legion.SandboxRuntime]:
    """One runtime with a warm pool, shared by the whole session."""
    if CONTAINER_RUNTIME == "runsc":
        client = docker.from_env(timeout=30)
        if "runsc" not in client.info().get("Runtimes", {}):
            pytest.fail("LEGION_TEST_RUNTIME=runsc but runsc is not registered", pytrace=False)
    limits = legion.SandboxLimits(runtime=CONTAINER_RUNTIME)
    async with legion.SandboxRuntime(pool_size=2, limits=limits) as rt:
        yield rt


def ensure_data_image() -> str:
    """The tag of the ``data`` environment (numpy, pandas, matplotlib), built
    when missing (about 30 s here; a no-op when its tag exists). Skips, or
    fails under LEGION_REQUIRE_DOCKER=1, when it cannot be built."""
    from legion.sandbox import environment

    try:
        return environment.build_environment(recipe="data")
    except legion.LegionError as exc:
        missing(f"the data environment cannot be built here: {exc}")


@pytest.fixture(scope="session")
def data_image(docker_ready: None) -> str:
    """:func:`ensure_data_image`, once per session."""
    return ensure_data_image()


@pytest.fixture(scope="session")
async def data_runtime(data_image: str) -> AsyncIterator[legion.SandboxRuntime]:
    """A runtime whose image is ``data``, under the default limits: its warm
    container has numpy, pandas and matplotlib.pyplot imported (preload)."""
    limits = legion.SandboxLimits(runtime=CONTAINER_RUNTIME)
    async with legion.SandboxRuntime(pool_size=1, limits=limits, image="data") as rt:
        yield rt


@pytest.fixture
async def sandbox(runtime: legion.SandboxRuntime) -> AsyncIterator[legion.Sandbox]:
    async with legion.Sandbox(runtime=runtime) as sb:
        yield sb


def legion_containers() -> list[str]:
    """Containers with the project's label that this test process (or a
    process that has died, such as a test's child) is responsible for.
    Containers of another live controller on this engine are not ours."""
    client = docker.from_env(timeout=30)
    mine = owner_id()
    return [
        c["Names"][0]
        for c in client.api.containers(all=True, filters={"label": LABEL})
        if c["Labels"].get(OWNER_LABEL) == mine or not owner_alive(c["Labels"].get(OWNER_LABEL, ""))
    ]


@pytest.fixture(scope="session", autouse=True)
def _no_real_model_requests() -> Iterator[None]:
    """The suite never reaches a model vendor: only loopback api_bases work.
    Set LEGION_ALLOW_MODEL_REQUESTS=1 to allow them explicitly."""
    if os.environ.get("LEGION_ALLOW_MODEL_REQUESTS") == "1":
        yield
        return
    with forbid_model_requests():
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_container_left_behind() -> object:
    """Fails the session if any container with the project's label remains."""
    yield
    if _docker_problem() is not None:
        return
    left = legion_containers()
    assert not left, f"containers left behind by the test session: {left}"
