"""Where a cold start's time goes (issue 17): ``python -m bench.coldstart``.

A cold start to the first result is, in order: the engine creating the
container, the engine starting it, the runner's interpreter starting and
importing what it needs, the runner dialling the channel and saying Hello,
and the first exec. This measures each with the sandbox's own container
configuration, ``n`` times, and prints their p50s:

- ``create``: ``containers.create`` with the sandbox's configuration;
- ``start``: ``container.start()`` of that created container;
- ``started_to_hello``: from ``start`` returning to the runner's Hello;
- ``first_exec``: ``print(1 + 1)`` once connected;
- ``total``: the whole ``Sandbox`` start plus the first exec, as the bench's
  ``cold_start_to_first_result`` measures it;
- ``runner_import`` and ``import_grpc``: a fresh ``python3 -c 'import ...'`` in
  the image, less a bare interpreter start (``python_start``), by
  ``docker exec`` in one idle container.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import legion
from legion.sandbox.docker_backend import DockerBackend
from legion.sandbox.runtime import SandboxRuntime


class _TimedBackend(DockerBackend):
    """The Docker backend, with its create and start timed apart."""

    phases: dict[str, list[float]]

    async def start(self, request: Any) -> str:
        config = self.container_config(request)

        def create_and_start() -> tuple[str, float, float, float]:
            begun = time.perf_counter()
            container = self.client.containers.create(**config)
            created = time.perf_counter()
            try:
                container.start()
            except Exception:
                container.remove(force=True)
                raise
            return str(container.id), begun, created, time.perf_counter()

        container_id, begun, created, started = await asyncio.wrap_future(
            self._submit(create_and_start)
        )
        self.phases["create"].append(created - begun)
        self.phases["start"].append(started - created)
        self.phases["_started_at"].append(started)
        return container_id


async def phases(n: int) -> dict[str, float]:
    """The p50 of each phase in milliseconds."""
    found: dict[str, list[float]] = {
        k: [] for k in ("create", "start", "_started_at", "started_to_hello", "first_exec", "total")
    }
    probe = SandboxRuntime(pool_size=0)
    backend = _TimedBackend(image=probe.image, runtime_id=probe.id)
    backend.phases = found
    async with SandboxRuntime(pool_size=0, backend=backend) as runtime:
        for _ in range(n):
            begun = time.perf_counter()
            async with legion.Sandbox(runtime=runtime) as sandbox:
                await sandbox.start()
                connected = time.perf_counter()
                found["started_to_hello"].append(connected - found["_started_at"][-1])
                result = await sandbox.run("print(1 + 1)")
                done = time.perf_counter()
                if result.stdout.strip() != "2":
                    raise RuntimeError(f"print(1 + 1) printed {result.stdout!r}: {result.error}")
                found["first_exec"].append(done - connected)
                found["total"].append(done - begun)
        imports = await _imports(runtime, max(3, n // 2))
    del found["_started_at"]
    out = {k: round(statistics.median(v) * 1000, 1) for k, v in found.items()}
    out.update(imports)
    return out


async def _imports(runtime: SandboxRuntime, n: int) -> dict[str, float]:
    lease = await runtime.acquire()
    try:
        container = runtime.backend.client.containers.get(lease.container_id)  # type: ignore[attr-defined]

        def timed(code: str) -> float:
            samples = []
            for _ in range(n):
                begun = time.perf_counter()
                ran = container.exec_run(["python3", "-c", code], user="nobody")
                samples.append(time.perf_counter() - begun)
                if ran.exit_code != 0:
                    raise RuntimeError(f"python3 -c {code!r} failed: {ran.output[-300:]!r}")
            return statistics.median(samples) * 1000

        bare = await asyncio.to_thread(timed, "pass")
        runner = await asyncio.to_thread(timed, "import legion_runner.runner")
        grpc = await asyncio.to_thread(timed, "import grpc")
    finally:
        await runtime.release(lease)
    return {
        "python_start": round(bare, 1),
        "runner_import": round(runner - bare, 1),
        "import_grpc": round(grpc - bare, 1),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    for name, ms in asyncio.run(phases(n)).items():
        print(f"{name:>18}: {ms:7.1f} ms")


if __name__ == "__main__":
    main()
