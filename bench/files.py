"""File throughput through the channel: ``sandbox.files.write`` and ``read``
of 1 MiB and 32 MiB, in MiB/s (p50 of the runs), so a slowdown of the
chunked transfer shows."""

from __future__ import annotations

import functools
import os
import time

import legion

from .common import Measures, check

MiB = 1024 * 1024


async def file_throughput(runtime: legion.SandboxRuntime, size: int, n: int) -> dict[str, float]:
    data = os.urandom(size)
    writes: list[float] = []
    reads: list[float] = []
    async with legion.Sandbox(runtime=runtime) as sandbox:
        await sandbox.files.write("warm.bin", b"x")
        for _ in range(n):
            # A write goes to a new file and is renamed over the old one, so
            # overwriting needs room for both: remove it first.
            if any(f.path == "blob.bin" for f in await sandbox.files.list()):
                await sandbox.files.remove("blob.bin")
            start = time.perf_counter()
            await sandbox.files.write("blob.bin", data)
            writes.append(size / MiB / (time.perf_counter() - start))
            start = time.perf_counter()
            back = await sandbox.files.read("blob.bin")
            reads.append(size / MiB / (time.perf_counter() - start))
            check(back == data, True, "the bytes read back equal those written")
    return {
        "write_mib_per_s_p50": sorted(writes)[len(writes) // 2],
        "read_mib_per_s_p50": sorted(reads)[len(reads) // 2],
    }


async def measure(runtime: legion.SandboxRuntime, smoke: bool, log: Measures) -> dict[str, float]:
    """Rates (shown beside the other rates): ``files_<size>_<write|read>_mib_per_s_p50``."""
    out: dict[str, float] = {}
    for label, size in (("1mib", MiB), ("32mib", 32 * MiB)):
        name = f"files_{label}"
        n = 2 if smoke else (20 if size == MiB else 5)
        value = await log.run(name, functools.partial(file_throughput, runtime, size, n))
        out.update({f"{name}_{key}": rate for key, rate in (value or {}).items()})
    return out
