"""`legion serve` as a real subprocess, and a fake model it talks to.

The model is a FakeOpenAIServer on loopback in this process; it answers by
the run's task:

- ``#code <python>``: ``eval_and_complete`` that code (the sandbox runs it);
- ``#json <value>``: ``return`` that JSON value;
- ``#loop``: ``eval_and_continue`` forever (MaxIterationsReached);
- ``#babble``: no action at all (MaxRetriesReached);
- ``#refuse``: HTTP 400 (ModelError);
- anything else: ``return`` the task itself.

The task is the run's first user message, or, for a long-lived agent's later
turn, the newest one when it starts with ``#``.

Each server runs with pool size 0, so every container labelled with its pid
belongs to a run; teardown stops it with SIGTERM and fails if it does not
exit 0 or leaves a container behind.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import pytest

import legion
from legion.sandbox.docker_backend import LABEL, OWNER_LABEL
from legion.testing import FakeOpenAIServer, Reply, action

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "tests.server.agents:REGISTRY"


def script(messages: list[dict[str, Any]]) -> Reply | str:
    task = str(messages[1]["content"])
    latest = messages[-1]
    if latest["role"] == "user" and str(latest["content"]).startswith("#"):
        task = str(latest["content"])  # a long-lived agent's turn: its own task
    # Files given to the run are named after the task: not part of the script.
    task = task.split("\n\n[Files for this task", 1)[0]
    if task.startswith("#code "):
        return action("eval_and_complete", task.removeprefix("#code "))
    if task.startswith("#json "):
        return action("return", result=json.loads(task.removeprefix("#json ")))
    if task == "#loop":
        return action("eval_and_continue", "1 + 1")
    if task == "#babble":
        return "I would rather not use JSON today."
    if task == "#refuse":
        return Reply(status=400, error_message="this model refuses the request")
    return action("return", result=task)


@pytest.fixture(scope="session")
def fake_model() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(script) as server:
        yield server


def _pump(stream: IO[str], into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@dataclass
class ServerProcess:
    """A running `legion serve` subprocess."""

    process: subprocess.Popen[str]
    address: str
    stderr: Path
    stdout: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def containers(self) -> list[str]:
        """Ids of the containers (any state) that this server process started."""
        prefix = f"{socket.gethostname()}/{self.pid}/"
        client = docker.from_env(timeout=30)
        try:
            rows = client.api.containers(all=True, filters={"label": LABEL})
        finally:
            client.close()
        return [r["Id"] for r in rows if r["Labels"].get(OWNER_LABEL, "").startswith(prefix)]

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait for it to exit; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"legion serve ignored signal {signum} for {timeout:g} s"
            ) from None


def server_env(fake_model: FakeOpenAIServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LEGION_TOKENS", "LEGION_SERVER_TOKEN")}
    env.update(
        LEGION_MODEL="openai/fake-model",
        LEGION_API_BASE=fake_model.url,
        LEGION_API_KEY="sk-test",
        LEGION_POOL_SIZE="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def legion_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the `legion` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "legion.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_server(
    args: list[str],
    env: dict[str, str],
    log_dir: Path,
    *,
    timeout: float = 90,
    command: str = "serve",
) -> ServerProcess:
    """Start `legion COMMAND --agents REGISTRY ARGS` (``serve``, or ``mcp``
    with ``--http``) and wait until it says where it listens."""
    stderr = log_dir / f"{command}-{secrets.token_hex(4)}.log"
    if command == "serve" and "--store" not in args:  # never the user's own state directory
        args = [*args, "--store", str(log_dir / f"conversations-{secrets.token_hex(4)}.db")]
    listening = re.compile(rf"legion {command}: listening on (\S+)")
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "legion.cli", command, "--agents", REGISTRY, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    printed: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            process.wait()
            pytest.fail(
                f"legion {command} did not listen within {timeout:g} s: {stderr.read_text()}"
            )
        if line is None:
            code = process.wait()
            pytest.fail(
                f"legion {command} exited with {code} before listening: {stderr.read_text()}"
            )
        printed.append(line)
        if found := listening.search(line):
            return ServerProcess(process, found.group(1), stderr, printed)


def stop_cleanly(server: ServerProcess) -> None:
    """SIGTERM; the server must exit 0 and leave no container (removed here if it did)."""
    code = server.stop()
    left = server.containers()
    if left:
        client = docker.from_env(timeout=30)
        for container_id in left:
            client.api.remove_container(container_id, force=True)
        client.close()
    assert code == 0, f"legion serve exited with {code}: {server.log()[-3000:]}"
    assert not left, f"legion serve left containers behind: {left}"


@dataclass(frozen=True)
class Tokens:
    alice: str
    bob: str
    carol: str
    """carol may have one run in flight at a time."""


@pytest.fixture(scope="session")
def tokens() -> Tokens:
    return Tokens(
        *(f"tok-{name}-{secrets.token_urlsafe(16)}" for name in ("alice", "bob", "carol"))
    )


def write_token_file(where: Path, tokens: Tokens) -> Path:
    """A token table for alice, bob and carol (who may have one run in flight),
    each with a vault holding their user name."""
    token_file = where / "tokens.toml"
    token_file.write_text(
        f'["{tokens.alice}"]\nname = "alice"\nvault = {{ user = "alice" }}\n\n'
        f'["{tokens.bob}"]\nname = "bob"\nvault = {{ user = "bob" }}\n\n'
        f'["{tokens.carol}"]\nname = "carol"\nmax_concurrent_runs = 1\n'
        'vault = { user = "carol" }\n'
    )
    return token_file


@dataclass(frozen=True)
class Served:
    server: ServerProcess
    tokens: Tokens

    @property
    def address(self) -> str:
        return self.server.address


@pytest.fixture(scope="session")
def served(
    docker_ready: None,
    fake_model: FakeOpenAIServer,
    tokens: Tokens,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """One `legion serve` with tokens for alice, bob and carol, on a free loopback port."""
    where = tmp_path_factory.mktemp("served")
    token_file = write_token_file(where, tokens)
    server = start_server(
        ["--listen", "127.0.0.1:0", "--tokens", str(token_file), "--grace-seconds", "2"],
        server_env(fake_model),
        where,
    )
    try:
        yield Served(server, tokens)
    finally:
        stop_cleanly(server)


@pytest.fixture
async def alice(served: Served) -> AsyncIterator[legion.Client]:
    """A client of the shared server with alice's token."""
    async with legion.Client(served.address, token=served.tokens.alice) as client:
        yield client


@pytest.fixture
async def bob(served: Served) -> AsyncIterator[legion.Client]:
    """A client of the shared server with bob's token."""
    async with legion.Client(served.address, token=served.tokens.bob) as client:
        yield client
