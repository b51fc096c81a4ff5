"""`make bench`: how fast the sandbox path is, measured in one run on this machine.

Writes bench/results/<timestamp>.json and prints a table (p50/p90/p99, and
ratios against a plain `docker run --rm` of the same image measured in the
same run). `--smoke` runs a few iterations of each, for the test suite.

    python -m bench [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker

import legion

RESULTS = Path(__file__).resolve().parent / "results"


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "p50_ms": pct(0.5) * 1e3,
        "p90_ms": pct(0.9) * 1e3,
        "p99_ms": pct(0.99) * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


async def _timed(n: int, fn: Callable[[], Awaitable[object]], warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def echo(payload: str) -> int:
    """The host tool the tool-call benchmarks call."""
    return len(payload)


async def bench_warm(runtime: legion.SandboxRuntime, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with legion.Sandbox(runtime=runtime, tools=[echo]) as sandbox:

        async def trivial() -> None:
            assert (await sandbox.run("1 + 1")).value == 2

        async def tool_tiny() -> None:
            assert (await sandbox.run("echo('x')")).value == 1

        await sandbox.run("big = 'x' * (1024 * 1024)")

        async def tool_1mib() -> None:
            assert (await sandbox.run("echo(big)")).value == 1024 * 1024

        results["warm_exec"] = _summary(await _timed(n, trivial))
        tool = _summary(await _timed(n, tool_tiny))
        # The tool call alone: a run with a call, less a run without.
        tool["call_only_p50_ms"] = tool["p50_ms"] - results["warm_exec"]["p50_ms"]
        results["exec_with_tool_call"] = tool
        results["exec_with_tool_call_1mib"] = _summary(await _timed(max(3, n // 10), tool_1mib))
        results["idle_memory_mib"] = _container_memory_mib(sandbox.container_id)
    return results


def _container_memory_mib(container_id: str | None) -> float | None:
    if container_id is None:
        return None
    stats = docker.from_env().api.stats(container_id, stream=False)
    usage = stats.get("memory_stats", {})
    used = usage.get("usage", 0) - usage.get("stats", {}).get("total_inactive_file", 0)
    return round(float(used) / (1024 * 1024), 1)


async def bench_pool_acquire(n: int) -> dict[str, Any]:
    samples = []
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        for _ in range(n):
            await runtime.warm()  # measure a pop, not a start
            start = time.perf_counter()
            lease = await runtime.acquire()
            samples.append(time.perf_counter() - start)
            await runtime.release(lease)
    return _summary(samples)


async def bench_cold(n: int) -> dict[str, Any]:
    samples = []
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        for _ in range(n):
            start = time.perf_counter()
            async with legion.Sandbox(runtime=runtime) as sandbox:
                assert (await sandbox.run("1")).value == 1
                samples.append(time.perf_counter() - start)
    return _summary(samples)


def bench_docker_run(n: int, image: str) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(
            ["docker", "run", "--rm", "--network", "none", image, "python3", "-c", "print(1 + 1)"],
            check=True,
            capture_output=True,
        )
        samples.append(time.perf_counter() - start)
    return _summary(samples)


def _table(results: dict[str, Any]) -> str:
    rows = [("measure", "n", "p50 ms", "p90 ms", "p99 ms")]
    for name, value in results["measures"].items():
        if isinstance(value, dict):
            rows.append(
                (
                    name,
                    str(value["n"]),
                    f"{value['p50_ms']:.2f}",
                    f"{value['p90_ms']:.2f}",
                    f"{value['p99_ms']:.2f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"idle sandbox memory: {results['measures']['idle_memory_mib']} MiB")
    for name, ratio in results["ratios"].items():
        lines.append(f"{name}: {ratio:.0f}x")
    return "\n".join(lines)


async def main_async(smoke: bool) -> dict[str, Any]:
    n = 5 if smoke else 200
    measures: dict[str, Any] = {}
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        measures.update(await bench_warm(runtime, n))
        image = runtime.image
    measures["pool_acquire"] = await bench_pool_acquire(3 if smoke else 30)
    measures["cold_start_to_first_result"] = await bench_cold(2 if smoke else 15)
    measures["docker_run_rm_baseline"] = bench_docker_run(2 if smoke else 10, image)
    baseline = measures["docker_run_rm_baseline"]["p50_ms"]
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
            "docker": docker.from_env().version().get("Version"),
        },
        "image": image,
        "smoke": smoke,
        "measures": measures,
        "ratios": {
            "docker run --rm / warm exec (p50)": baseline / measures["warm_exec"]["p50_ms"],
            "docker run --rm / cold start (p50)": baseline
            / measures["cold_start_to_first_result"]["p50_ms"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few iterations of each")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    args = parser.parse_args(argv)
    print("bench: measuring (the full run takes about a minute)...", file=sys.stderr)
    results = asyncio.run(main_async(args.smoke))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"{stamp}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
