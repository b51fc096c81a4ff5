"""The ``data`` environment (numpy, pandas, matplotlib): its cold start, and
the first run's latency from asking for a sandbox to the result of code that
imports pandas and groups 10,000 rows, three ways:

- ``data_first_run_cold``: no warm pool, a container started for the run;
- ``data_first_run_warm``: from a warm pool whose containers import nothing
  ahead (``preload=()``);
- ``data_first_run_preloaded``: from a warm pool whose containers imported
  numpy, pandas and matplotlib.pyplot ahead (the recipe's preload list).

And what a warm container holds in memory, without and with preload.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import docker

import legion
from legion.sandbox import environment

from .common import CheckFailed, Measures, check, summary

FIRST_RUN = (
    "import numpy as np, pandas as pd, matplotlib.pyplot as plt\n"
    "df = pd.DataFrame({'g': np.arange(10_000) % 7, 'v': np.arange(10_000)})\n"
    "int(df.groupby('g').v.sum().sum())"
)
EXPECTED = sum(range(10_000))


async def _first_run(runtime: legion.SandboxRuntime, image: str | None) -> float:
    start = time.perf_counter()
    async with legion.Sandbox(runtime=runtime, image=image) as sandbox:
        result = await sandbox.run(FIRST_RUN)
        took = time.perf_counter() - start
        check(result.value, EXPECTED, "the first run's groupby total", error=result.error)
    return took


async def cold_start(n: int) -> dict[str, Any]:
    """Asking for a sandbox of the data image until its runner said Hello."""
    samples = []
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        for _ in range(n):
            start = time.perf_counter()
            async with legion.Sandbox(runtime=runtime, image="data") as sandbox:
                await sandbox.start()
                samples.append(time.perf_counter() - start)
    return dict(summary(samples))


async def first_run_cold(n: int) -> dict[str, Any]:
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        samples = [await _first_run(runtime, "data") for _ in range(n)]
    return dict(summary(samples))


def _memory_mib(container_id: str) -> float:
    stats = docker.from_env().api.stats(container_id, stream=False)
    usage = stats.get("memory_stats", {})
    used = usage.get("usage", 0) - usage.get("stats", {}).get("total_inactive_file", 0)
    return round(float(used) / (1024 * 1024), 1)


async def first_run_warm(n: int, preload: tuple[str, ...] | None) -> tuple[dict[str, Any], float]:
    """From a pool of one (``preload=None``: the image's own list); and the
    memory of a warm container, before anything runs in it."""
    samples = []
    memory = 0.0
    async with legion.SandboxRuntime(pool_size=1, image="data", preload=preload) as runtime:
        for index in range(n):
            await runtime.warm()  # measure a pool container, not a start
            if index == 0:
                (warm,) = [s for s in await runtime.sandboxes(memory=False) if not s.in_use]
                memory = await asyncio.to_thread(_memory_mib, warm.container_id)
            samples.append(await _first_run(runtime, None))
    return dict(summary(samples)), memory


async def measure(smoke: bool, log: Measures) -> tuple[dict[str, Any], dict[str, float]]:
    """Measures (``data_*``) and rates (the warm containers' memory in MiB)."""
    measures: dict[str, Any] = {}
    rates: dict[str, float] = {}
    n = 2 if smoke else 10

    async def build() -> str:
        return await asyncio.to_thread(
            environment.build_environment, recipe="data", progress=lambda _: None
        )

    if await log.run("data_image", build) is None:
        return measures, rates

    for name, cold in (("data_cold_start", cold_start), ("data_first_run_cold", first_run_cold)):
        value = await log.run(name, functools.partial(cold, n))
        if value is not None:
            measures[name] = value
    for name, preload in (("data_first_run_warm", ()), ("data_first_run_preloaded", None)):
        found = await log.run(name, functools.partial(first_run_warm, n, preload))
        if found is not None:
            measures[name], rates[f"{name}_idle_memory_mib"] = found
    if "data_first_run_preloaded" in measures and "data_first_run_warm" in measures:
        preloaded = measures["data_first_run_preloaded"]["p50_ms"]
        if preloaded >= measures["data_first_run_warm"]["p50_ms"]:
            log.record(
                "data_preload_gain",
                CheckFailed(
                    f"a preloaded first run ({preloaded:.0f} ms) is no faster than one "
                    f"without preload ({measures['data_first_run_warm']['p50_ms']:.0f} ms)"
                ),
            )
    return measures, rates
