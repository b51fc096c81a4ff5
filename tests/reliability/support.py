"""Helpers for the reliability tests: a runtime of the test's own whose
containers are checked gone at the end, and the controller's footprint
(asyncio tasks, open file descriptors, threads) measured around a series of
faults."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

import legion
from legion.sandbox.docker_backend import LABEL

WARMUP = 1
"""Faults injected before the baseline is taken: lazily made resources
(executor threads, litellm's clients) reach their steady size during these."""
DOCKER_POOLS = 25
"""docker-py keeps a connection pool, with its keep-alive socket, per distinct
URL (``/containers/<id>/json``, ``/containers/<id>/kill``...), up to this many
per client (``docker.constants.DEFAULT_NUM_POOLS``), evicting the least
recently used. Every new container makes new URLs, so until a client has
used this many, its socket count grows by design: see :func:`fill_docker_pools`."""
FAULTS = 5
"""Faults injected between the two measurements. Any per-fault leak of a
task, a descriptor or a thread grows the footprint by at least this much."""


@dataclass(frozen=True)
class Footprint:
    """What the controller process holds right now."""

    tasks: int
    fds: int
    threads: int

    @classmethod
    def now(cls) -> Footprint:
        gc.collect()  # sockets and pipes dropped but not yet collected are not leaks
        return cls(
            tasks=len(asyncio.all_tasks()),
            fds=len(os.listdir("/proc/self/fd")),
            threads=threading.active_count(),
        )

    def __sub__(self, other: Footprint) -> Footprint:
        return Footprint(
            tasks=self.tasks - other.tasks,
            fds=self.fds - other.fds,
            threads=self.threads - other.threads,
        )

    def within(self, baseline: Footprint) -> bool:
        return (
            self.tasks <= baseline.tasks
            and self.fds <= baseline.fds
            and self.threads <= baseline.threads
        )


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` on the loop (no threads) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def settle(
    runtime: legion.SandboxRuntime,
    *,
    live: int,
    baseline: Footprint | None = None,
    timeout: float = 15.0,
    grace: float = 4.0,
) -> Footprint:
    """Wait for the work a fault leaves in flight to end (container removals,
    the pool refilling, handler threads of a fake model server), then measure.

    Fails unless the runtime is back to exactly ``live`` containers within
    ``timeout``. With a baseline, then waits up to ``grace`` more seconds for
    the footprint to come back down to it, and returns whatever it is then:
    the caller asserts on the growth.
    """
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: len(runtime.live_containers) == live, timeout, "")
    assert len(runtime.live_containers) == live, (
        f"the runtime holds {len(runtime.live_containers)} containers at rest, expected {live}: "
        f"{sorted(c[:12] for c in runtime.live_containers)}"
    )
    if runtime.pool_size:
        await asyncio.wait_for(runtime.warm(), timeout)
    deadline = time.monotonic() + grace
    while True:
        await asyncio.sleep(0.05)
        now = Footprint.now()
        if baseline is None or now.within(baseline) or time.monotonic() > deadline:
            return now


def _fill_pools(client: docker.DockerClient) -> None:
    for i in range(DOCKER_POOLS + 5):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.inspect_container(f"legion-reliability-no-such-container-{i}")


async def fill_docker_pools(*clients: docker.DockerClient) -> None:
    """Bring each Docker client to its steady number of sockets (one per pool,
    DOCKER_POOLS pools), so that what a fault series adds is the controller's
    own growth, not docker-py's bounded cache filling up."""
    for client in clients:
        await asyncio.to_thread(_fill_pools, client)


async def fill_default_executor() -> None:
    """Start every thread of the loop's default executor (which the runtime's
    Docker calls use): it starts them one at a time, on demand, up to a fixed
    maximum (at most 32), and keeps them."""
    await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.02) for _ in range(40)))


async def fault_series(
    name: str,
    runtime: legion.SandboxRuntime,
    one_fault: Callable[[int], Awaitable[None]],
    *,
    live: int,
    docker_client: docker.DockerClient | None = None,
) -> Footprint:
    """Inject a fault WARMUP times, measure, FAULTS more times, measure again;
    assert the footprint did not grow with the number of faults. Returns the growth.

    ``docker_client`` is the test's own client, if it uses one during the faults."""
    for i in range(WARMUP):
        await one_fault(i)
    clients = [runtime.backend.client] + ([docker_client] if docker_client else [])
    await fill_docker_pools(*clients)
    await fill_default_executor()
    before = await settle(runtime, live=live)
    for i in range(FAULTS):
        await one_fault(WARMUP + i)
    after = await settle(runtime, live=live, baseline=before)
    growth = after - before
    print(
        f"\n[leaks] {name}: {FAULTS} faults; before {before}; after {after}; growth "
        f"tasks={growth.tasks:+d} fds={growth.fds:+d} threads={growth.threads:+d}"
    )
    assert growth.tasks < FAULTS, f"{name}: asyncio tasks grew by {growth.tasks}"
    assert growth.fds < FAULTS, f"{name}: open file descriptors grew by {growth.fds}"
    assert growth.threads < FAULTS, f"{name}: threads grew by {growth.threads}"
    return growth


def labelled_containers(client: docker.DockerClient) -> list[dict[str, Any]]:
    """``docker ps -a --filter label=legion.sandbox``, as the engine's API reports it."""
    rows: list[dict[str, Any]] = client.api.containers(all=True, filters={"label": LABEL})
    return rows


@dataclass
class Tracked:
    """A runtime of the test's own and the ids of every container it was seen using."""

    runtime: legion.SandboxRuntime
    seen: set[str] = field(default_factory=set)

    def note(self, sandbox: legion.Sandbox) -> str:
        container_id = sandbox.container_id
        assert container_id is not None, "the sandbox has no container"
        self.seen.add(container_id)
        return container_id


@contextlib.asynccontextmanager
async def tracked_runtime(client: docker.DockerClient, **options: Any) -> AsyncIterator[Tracked]:
    """A started runtime; after the block, checks it was left with no container,
    by its own account and by the engine's."""
    runtime = legion.SandboxRuntime(**options)
    tracked = Tracked(runtime)
    async with runtime:
        yield tracked
    assert runtime.live_containers == frozenset(), runtime.live_containers
    ours = [
        f"{row['Id'][:12]} {row.get('Names')} {row.get('State')}"
        for row in labelled_containers(client)
        if row.get("Labels", {}).get(LABEL) == runtime.id or row["Id"] in tracked.seen
    ]
    assert ours == [], f"containers left behind: {ours}"


async def kill_container(client: docker.DockerClient, container_id: str) -> None:
    """``docker kill`` (SIGKILL), from outside the controller."""
    await asyncio.to_thread(lambda: client.containers.get(container_id).kill())


async def container_exists(client: docker.DockerClient, container_id: str) -> bool:
    def look() -> bool:
        return bool(client.api.containers(all=True, filters={"id": container_id}))

    return await asyncio.to_thread(look)
