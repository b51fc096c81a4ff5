"""What both sides of the bench share: the snippet, percentiles, container clean-up.

Imported by bench/__main__.py (the project's venv) and by bench/peers.py (the
peers' venv), so it needs nothing but the standard library and the Docker SDK.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import docker
import docker.errors

# The same snippet for every sandbox measured, and what it must print.
SNIPPET = "print(1 + 1)"
EXPECTED_STDOUT = "2"

# Containers the peer benchmarks create carry this label where the peer lets us
# set one, and a name with this prefix where it lets us choose the name.
PEER_LABEL = "legion.bench"
PEER_NAME_PREFIX = "legion-bench-"


async def timed(n: int, fn: Callable[[], Awaitable[object]], warmup: int = 3) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then ``n`` times timed; their :func:`summary`."""
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return dict(summary(samples))


def summary(samples: list[float]) -> dict[str, float]:
    """n, p50/p90/p99 and mean in milliseconds (nearest-rank on the sorted samples)."""
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


def remove_peer_containers(images: list[str]) -> list[str]:
    """Force-remove every container the peer benchmarks may have left; their names.

    Found three ways, since not every peer lets us label or name its
    containers: our label, our name prefix, and descent from a peer image.
    """
    client = docker.from_env()
    found: dict[str, Any] = {}
    queries: list[dict[str, str | list[str] | bool]] = [
        {"label": PEER_LABEL},
        {"name": PEER_NAME_PREFIX},
    ]
    queries += [{"ancestor": image} for image in images]
    for query in queries:
        try:
            for container in client.containers.list(all=True, filters=query):
                found[str(container.id)] = container
        except docker.errors.APIError:
            continue  # e.g. an ancestor image that does not exist (yet)
    removed = []
    for container in found.values():
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.NotFound:
            pass  # auto-removed meanwhile
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
    return removed
