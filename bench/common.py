"""What both sides of the bench share: the snippet, percentiles, checks that
say what they saw, measures that fail on their own, container clean-up.

Imported by bench/__main__.py (the project's venv) and by bench/peers.py (the
peers' venv), so it needs nothing but the standard library and the Docker SDK.
"""

from __future__ import annotations

import fnmatch
import os
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import docker
import docker.errors

# The same snippet for every sandbox measured, and what it must print.
SNIPPET = "print(1 + 1)"
EXPECTED_STDOUT = "2"

# Containers the peer benchmarks create carry this label where the peer lets us
# set one, and a name with this prefix where it lets us choose the name.
PEER_LABEL = "legion.bench"
PEER_NAME_PREFIX = "legion-bench-"

FAIL_ENV = "LEGION_BENCH_FAIL"
"""Comma-separated measure names (shell patterns allowed) that fail on purpose
instead of running: how the tests show a failed measure is reported."""

T = TypeVar("T")


class CheckFailed(Exception):
    """A measure saw something other than what it must see."""


class InjectedFailure(Exception):
    """A measure named in LEGION_BENCH_FAIL, failed on purpose."""


def _shown(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check(seen: object, expected: object, what: str, *, error: object = None) -> None:
    """Raise :class:`CheckFailed` unless ``seen == expected``, saying both (and
    ``error``, such as a sandbox run's error, when there is one)."""
    if seen == expected:
        return
    detail = f" (error: {error})" if error else ""
    raise CheckFailed(f"{what}: expected {_shown(expected)}, got {_shown(seen)}{detail}")


class Measures:
    """Runs each measure on its own. One that raises (a failed check, any
    error) is recorded with its error's type and message, and the others still
    run; ``failures`` lists them for the results and the exit status.

    A measure may run others inside it (a group sharing one sandbox): theirs
    are recorded under their own names, and an error of the group's own set-up
    under the group's name.
    """

    def __init__(self, fail: str | None = None) -> None:
        self.failures: dict[str, dict[str, str]] = {}
        patterns = os.environ.get(FAIL_ENV, "") if fail is None else fail
        self._fail = [p.strip() for p in patterns.split(",") if p.strip()]

    async def run(self, name: str, measure: Callable[[], Awaitable[T]]) -> T | None:
        """``measure()``'s result, or None when it failed (then recorded)."""
        try:
            self._injected(name)
            return await measure()
        except Exception as exc:
            self.record(name, exc)
            return None

    def run_sync(self, name: str, measure: Callable[[], T]) -> T | None:
        """:meth:`run` for a measure that is not a coroutine."""
        try:
            self._injected(name)
            return measure()
        except Exception as exc:
            self.record(name, exc)
            return None

    def record(self, name: str, exc: BaseException) -> None:
        message = " ".join(str(exc).split())
        if len(message) > 2000:
            message = f"{message[:2000]}..."
        self.failures[name] = {"type": type(exc).__qualname__, "message": message}
        traceback.print_exception(exc, file=sys.stderr)
        print(f"bench: {name} failed: {type(exc).__qualname__}: {message}", file=sys.stderr)

    def _injected(self, name: str) -> None:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self._fail):
            raise InjectedFailure(f"{name} failed on purpose ({FAIL_ENV})")


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
