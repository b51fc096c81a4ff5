"""The peers' side of `make bench`: the sandboxes users would pick instead of ours.

Runs in bench/.venv-peers (bench/peer_setup.py creates it), never in the
project's venv, as

    bench/.venv-peers/bin/python -m bench.peers --images JSON --out FILE [--smoke]

and writes its measurements to FILE as JSON, which bench/__main__.py merges
into the results and the table. Progress goes to stderr.

The peer libraries are imported with importlib, so this module is typed (and
mypy-checked in the project's venv, where they are not installed) without
their stubs: what they return is `Any` here.

Each peer runs the same snippet (common.SNIPPET, `print(1 + 1)`) and must print
2. Modes, each timed end to end per execution:

- `<peer> per run`: a new session/executor for each execution (set-up, the
  execution, tear-down), the way a one-shot tool call uses it; its phases are
  reported separately. Measured with the peer's default container stop (what
  users get: their containers' PID 1 ignores SIGTERM, so stopping waits the
  engine's full 10 s grace) and with SIGKILL as the stop signal.
- `<peer> in session`: many executions in one open session/executor.

A peer that cannot run is reported under "unavailable" with the reason; the
others still run. Every container started here is removed at the end, even on
errors (common.remove_peer_containers).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .common import (
    EXPECTED_STDOUT,
    PEER_LABEL,
    PEER_NAME_PREFIX,
    SNIPPET,
    remove_peer_containers,
    summary,
)

DISTRIBUTIONS = [
    "llm-sandbox",
    "autogen-core",
    "autogen-ext",
    "smolagents",
    "docker",
    "websocket-client",
    "requests",
]


def say(message: str) -> None:
    print(f"bench peers: {message}", file=sys.stderr, flush=True)


def _check(stdout: str, peer: str) -> None:
    if stdout.strip() != EXPECTED_STDOUT:
        raise RuntimeError(f"{peer} printed {stdout!r} for {SNIPPET!r}, not {EXPECTED_STDOUT!r}")


class Phases:
    """Per-execution timings of a per-run mode: set-up, execution, tear-down."""

    def __init__(self) -> None:
        self.setup: list[float] = []
        self.execute: list[float] = []
        self.teardown: list[float] = []

    def total(self) -> list[float]:
        return [a + b + c for a, b, c in zip(self.setup, self.execute, self.teardown, strict=True)]

    def report(self, what: str) -> dict[str, Any]:
        out: dict[str, Any] = dict(summary(self.total()))
        out["what"] = what
        out["phases"] = {
            "setup": summary(self.setup),
            "execute": summary(self.execute),
            "teardown": summary(self.teardown),
        }
        return out


def _in_session(n: int, run: Callable[[], None], what: str, warmup: int = 3) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    out: dict[str, Any] = dict(summary(samples))
    out["what"] = what
    return out


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- llm-sandbox --------------------------------------------------------------


def _llm_sandbox_session(image: str, sigkill: bool) -> Any:
    llm_sandbox = importlib.import_module("llm_sandbox")
    configs: dict[str, Any] = {"network_mode": "none", "labels": {PEER_LABEL: "llm-sandbox"}}
    if sigkill:
        configs["stop_signal"] = "SIGKILL"
    # skip_environment_setup: otherwise every session creates a venv in the
    # container and pip-upgrades it from an index (impossible offline).
    return llm_sandbox.SandboxSession(
        lang="python",
        image=image,
        skip_environment_setup=True,
        runtime_configs=configs,
        verbose=False,
    )


def bench_llm_sandbox(images: dict[str, str], n: dict[str, int]) -> dict[str, Any]:
    image = images["py"]
    out: dict[str, Any] = {}

    def run(session: Any) -> None:
        result = session.run(SNIPPET)
        _check(result.stdout, "llm-sandbox")

    def per_run(sigkill: bool, count: int) -> Phases:
        phases = Phases()
        for _ in range(count):
            session = _llm_sandbox_session(image, sigkill)
            start = time.perf_counter()
            session.open()
            try:
                opened = time.perf_counter()
                run(session)
                ran = time.perf_counter()
            finally:
                session.close()
            closed = time.perf_counter()
            phases.setup.append(opened - start)
            phases.execute.append(ran - opened)
            phases.teardown.append(closed - ran)
        return phases

    what = "SandboxSession per execution: open, run, close ({}); network none"
    say(f"llm-sandbox: a session per execution, SIGKILL stop ({n['per_run']} runs)...")
    out["llm-sandbox per run (SIGKILL stop)"] = per_run(True, n["per_run"]).report(
        what.format("stop_signal SIGKILL")
    )
    if n["per_run_default_stop"]:
        say(
            f"llm-sandbox: a session per execution, default stop "
            f"({n['per_run_default_stop']} runs, ~11 s each)..."
        )
        out["llm-sandbox per run (default stop)"] = per_run(
            False, n["per_run_default_stop"]
        ).report(what.format("default stop: SIGTERM, then SIGKILL after 10 s"))
    say(f"llm-sandbox: {n['in_session']} executions in one session...")
    session = _llm_sandbox_session(image, sigkill=True)
    session.open()
    try:
        out["llm-sandbox in session"] = _in_session(
            n["in_session"],
            lambda: run(session),
            "session.run() in one open SandboxSession (copies a file in, then docker exec)",
        )
    finally:
        session.close()
    return out


# --- AutoGen ------------------------------------------------------------------


class _AutoGen:
    """AutoGen's DockerCommandLineCodeExecutor.

    It takes no container options (network, stop signal, labels): the image's
    STOPSIGNAL is the only way to a quick stop, and its containers are on the
    default bridge network.
    """

    def __init__(self) -> None:
        self.executors = importlib.import_module("autogen_ext.code_executors.docker")
        self.core = importlib.import_module("autogen_core")
        code_executor = importlib.import_module("autogen_core.code_executor")
        self.blocks = [code_executor.CodeBlock(code=SNIPPET, language="python")]

    def executor(self, image: str) -> Any:
        name = f"{PEER_NAME_PREFIX}autogen-{uuid.uuid4().hex[:12]}"
        return self.executors.DockerCommandLineCodeExecutor(image=image, container_name=name)

    async def run(self, ex: Any) -> None:
        result = await ex.execute_code_blocks(self.blocks, self.core.CancellationToken())
        if result.exit_code != 0:
            raise RuntimeError(f"AutoGen exit code {result.exit_code}: {result.output[-500:]}")
        _check(result.output, "AutoGen")

    async def per_run(self, image: str, count: int) -> Phases:
        phases = Phases()
        for _ in range(count):
            ex = self.executor(image)
            start = time.perf_counter()
            await ex.start()
            try:
                started = time.perf_counter()
                await self.run(ex)
                ran = time.perf_counter()
            finally:
                await ex.stop()
            stopped = time.perf_counter()
            phases.setup.append(started - start)
            phases.execute.append(ran - started)
            phases.teardown.append(stopped - ran)
        return phases

    async def in_session(self, image: str, count: int, warmup: int = 3) -> dict[str, Any]:
        ex = self.executor(image)
        await ex.start()
        try:
            for _ in range(warmup):
                await self.run(ex)
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                await self.run(ex)
                samples.append(time.perf_counter() - start)
        finally:
            await ex.stop()
        out: dict[str, Any] = dict(summary(samples))
        out["what"] = (
            "execute_code_blocks() on one started executor "
            "(writes a file to a bind mount, then docker exec `timeout 60 python <file>`)"
        )
        return out


async def _bench_autogen(images: dict[str, str], n: dict[str, int]) -> dict[str, Any]:
    autogen = _AutoGen()
    out: dict[str, Any] = {}
    what = "DockerCommandLineCodeExecutor per execution: start, execute, stop ({}); bridge"
    say(f"AutoGen: an executor per execution, SIGKILL stop ({n['per_run']} runs)...")
    phases = await autogen.per_run(images["py_sigkill"], n["per_run"])
    out["autogen per run (SIGKILL stop)"] = phases.report(what.format("image STOPSIGNAL SIGKILL"))
    if n["per_run_default_stop"]:
        say(
            f"AutoGen: an executor per execution, default stop "
            f"({n['per_run_default_stop']} runs, ~11 s each)..."
        )
        phases = await autogen.per_run(images["py"], n["per_run_default_stop"])
        out["autogen per run (default stop)"] = phases.report(
            what.format("default stop: SIGTERM, then SIGKILL after 10 s")
        )
    say(f"AutoGen: {n['in_session']} executions on one executor...")
    out["autogen in session"] = await autogen.in_session(images["py_sigkill"], n["in_session"])
    return out


def bench_autogen(images: dict[str, str], n: dict[str, int]) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(_bench_autogen(images, n))
    return result


# --- smolagents ---------------------------------------------------------------


def bench_smolagents(images: dict[str, str], n: dict[str, int]) -> dict[str, Any]:
    remote = importlib.import_module("smolagents.remote_executors")
    monitoring = importlib.import_module("smolagents.monitoring")
    logger = monitoring.AgentLogger(level=monitoring.LogLevel.OFF)

    def executor(sigkill: bool) -> Any:
        # Jupyter Kernel Gateway in the container, reached over a port
        # published on loopback: it needs the bridge network (no --network none).
        kwargs: dict[str, Any] = {"labels": {PEER_LABEL: "smolagents"}}
        if sigkill:
            kwargs["stop_signal"] = "SIGKILL"
        return remote.DockerExecutor(
            additional_imports=[],
            logger=logger,
            host="127.0.0.1",
            port=_free_loopback_port(),
            image_name=images["jupyter"],
            build_new_image=False,
            container_run_kwargs=kwargs,
        )

    def run(ex: Any) -> None:
        _check(ex.run_code_raise_errors(SNIPPET).logs, "smolagents")

    def per_run(sigkill: bool, count: int) -> Phases:
        phases = Phases()
        for _ in range(count):
            start = time.perf_counter()
            ex = executor(sigkill)
            try:
                started = time.perf_counter()
                run(ex)
                ran = time.perf_counter()
            finally:
                ex.cleanup()
            stopped = time.perf_counter()
            phases.setup.append(started - start)
            phases.execute.append(ran - started)
            phases.teardown.append(stopped - ran)
        return phases

    out: dict[str, Any] = {}
    what = (
        "DockerExecutor per execution: start container + Jupyter kernel, run, cleanup ({}); "
        "bridge network, gateway on a loopback port"
    )
    say(f"smolagents: an executor per execution, SIGKILL stop ({n['per_run_smolagents']} runs)...")
    out["smolagents per run (SIGKILL stop)"] = per_run(True, n["per_run_smolagents"]).report(
        what.format("stop_signal SIGKILL")
    )
    say(f"smolagents: an executor per execution, default stop ({n['per_run_smolagents']} runs)...")
    out["smolagents per run (default stop)"] = per_run(False, n["per_run_smolagents"]).report(
        what.format("default stop: SIGTERM, which the gateway handles")
    )
    say(f"smolagents: {n['in_session']} executions on one executor...")
    ex = executor(sigkill=True)
    try:
        out["smolagents in session"] = _in_session(
            n["in_session"],
            lambda: run(ex),
            "run_code_raise_errors() on one executor (a new websocket to the kernel each time)",
        )
    finally:
        ex.cleanup()
    return out


# --- driver -------------------------------------------------------------------

PEERS: dict[str, Callable[[dict[str, str], dict[str, int]], dict[str, Any]]] = {
    "llm-sandbox": bench_llm_sandbox,
    "autogen": bench_autogen,
    "smolagents": bench_smolagents,
}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _reason(exc: BaseException) -> str:
    """The exception, and the root cause of its chain when that is another one."""

    def line(e: BaseException) -> str:
        return f"{type(e).__qualname__}: {' '.join(str(e).split())[:400]}"

    root = exc
    for _ in range(100):  # chains are short; this only guards against a cycle
        if (nxt := root.__cause__ or root.__context__) is None:
            break
        root = nxt
    return line(exc) if root is exc else f"{line(exc)} (root cause: {line(root)})"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so the finally below removes the containers


def run(images: dict[str, str], smoke: bool, only: list[str]) -> dict[str, Any]:
    if smoke:
        n = {"per_run": 1, "per_run_default_stop": 0, "per_run_smolagents": 1, "in_session": 3}
    else:
        n = {"per_run": 20, "per_run_default_stop": 3, "per_run_smolagents": 5, "in_session": 100}
    results: dict[str, Any] = {
        "versions": _versions(),
        "python": sys.version.split()[0],
        "counts": n,
        "measures": {},
        "unavailable": {},
        "durations_s": {},
    }
    tags = [images[k] for k in ("py", "py_sigkill", "jupyter")]
    try:
        for name in only:
            start = time.perf_counter()
            try:
                results["measures"].update(PEERS[name](images, n))
            except Exception as exc:
                say(f"{name} could not run: {_reason(exc)}")
                traceback.print_exc(file=sys.stderr)
                results["unavailable"][name] = _reason(exc)
            finally:
                results["durations_s"][name] = round(time.perf_counter() - start, 1)
                left = remove_peer_containers(tags)
                if left:
                    say(f"removed containers {name} left behind: {', '.join(left)}")
    finally:
        remove_peer_containers(tags)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--images", required=True, help="JSON: the peer image tags")
    parser.add_argument("--out", type=Path, required=True, help="file for the JSON results")
    parser.add_argument("--smoke", action="store_true", help="one or a few runs of each")
    parser.add_argument("--only", action="append", choices=sorted(PEERS), help="these peers")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The peers talk HTTP and websockets to their containers on loopback:
    # never through a proxy.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"]))
    results = run(json.loads(args.images), args.smoke, args.only or list(PEERS))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
