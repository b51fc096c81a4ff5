"""`legion mcp` driven by the official `mcp` SDK's own client, as users would:
the command as a subprocess, over stdio and over streamable HTTP, against the
test's fake model. After each server exits, no container it started is left.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import docker
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from legion.sandbox.docker_backend import LABEL, OWNER_LABEL
from legion.testing import FakeOpenAIServer

from .conftest import (
    REGISTRY,
    ROOT,
    ServerProcess,
    Tokens,
    legion_cli,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)

pytestmark = pytest.mark.docker

SERVING_PID = re.compile(r"event='mcp_serving'.* pid=(\d+)")


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [group]


def text_of(result: types.CallToolResult) -> str:
    assert result.content, result
    first = result.content[0]
    assert isinstance(first, types.TextContent), first
    return first.text


def _containers_of(pid: int) -> list[str]:
    """Containers (any state) that the `legion mcp` process ``pid`` started
    (as ServerProcess.containers, for a process the SDK's client started)."""
    prefix = f"{socket.gethostname()}/{pid}/"
    client = docker.from_env(timeout=30)
    try:
        rows = client.api.containers(all=True, filters={"label": LABEL})
    finally:
        client.close()
    return [r["Id"] for r in rows if r["Labels"].get(OWNER_LABEL, "").startswith(prefix)]


@asynccontextmanager
async def stdio_session(
    env: dict[str, str], log: Path, *extra: str
) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "legion.cli", "mcp", "--agents", REGISTRY, *extra],
        env=env,
        cwd=ROOT,
    )
    with log.open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def _pid_in(log: Path) -> int:
    found = SERVING_PID.search(log.read_text(errors="replace"))
    assert found, f"legion mcp never said it was serving: {log.read_text()[-3000:]}"
    return int(found.group(1))


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/status")
        try:
            if "State:\tZ" in status.read_text():
                return True
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def test_stdio_lists_the_agents_and_runs_them(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    log = tmp_path / "mcp-stdio.log"
    async with stdio_session(server_env(fake_model), log) as session:
        listed = await session.list_tools()
        tools = {tool.name: tool for tool in listed.tools}
        assert sorted(tools) == ["Coder", "Counter", "Echo", "Editor", "Keeper"]
        assert tools["Echo"].description == "Says what it is told."
        assert tools["Echo"].input_schema["required"] == ["task"]

        said = await session.call_tool("Echo", {"task": "hello over stdio"})
        assert not said.is_error and text_of(said) == "hello over stdio"
        # Code runs in a sandbox; the vault of the stdio principal (LOCAL) is empty.
        computed = await session.call_tool("Coder", {"task": "#code sum(range(10))"})
        assert not computed.is_error and text_of(computed) == "45"
        counted = await session.call_tool("Counter", {"task": "#json 7"})
        assert text_of(counted) == "7"
        failed = await session.call_tool("Echo", {"task": "#refuse"})
        assert failed.is_error and text_of(failed).startswith("ModelError")
        # A conversation-scoped agent answers one run per call.
        kept = await session.call_tool("Keeper", {"task": "#code x = 5; x * 2"})
        assert not kept.is_error and text_of(kept) == "10"
        with pytest.raises(Exception, match="no agent named 'Nobody'"):
            await session.call_tool("Nobody", {"task": "hi"})
        with pytest.raises(Exception, match="'task' is a required property"):
            await session.call_tool("Echo", {"job": "hi"})
        pid = _pid_in(log)
    # Closing stdin ends the server: it exits by itself and leaves no container.
    assert _gone(pid), "legion mcp kept running after its client closed stdin"
    assert "mcp_stopped" in log.read_text()
    assert _containers_of(pid) == []


async def test_stdio_runs_as_the_principal_of_its_token(
    docker_ready: None, fake_model: FakeOpenAIServer, tokens: Tokens, tmp_path: Path
) -> None:
    token_file = write_token_file(tmp_path, tokens)
    log = tmp_path / "mcp-stdio-alice.log"
    env = server_env(fake_model, LEGION_SERVER_TOKEN=tokens.alice)
    async with stdio_session(env, log, "--tokens", str(token_file)) as session:
        who = await session.call_tool("Coder", {"task": "#code Profile.user()"})
        assert text_of(who) == "alice"
        pid = _pid_in(log)
    assert _gone(pid)
    assert _containers_of(pid) == []


def test_stdio_refuses_a_wrong_token(fake_model: FakeOpenAIServer, tokens: Tokens, tmp_path: Path):
    token_file = write_token_file(tmp_path, tokens)
    env = server_env(fake_model, LEGION_SERVER_TOKEN="not-a-token")
    done = legion_cli("mcp", "--agents", REGISTRY, "--tokens", str(token_file), env=env)
    assert done.returncode == 2, done.stderr
    assert "unknown token" in done.stderr
    missing = legion_cli(
        "mcp", "--agents", REGISTRY, "--tokens", str(token_file), env=server_env(fake_model)
    )
    assert missing.returncode == 2 and "give --token" in missing.stderr


def test_http_refuses_a_public_address_without_tokens(fake_model: FakeOpenAIServer) -> None:
    done = legion_cli(
        "mcp", "--agents", REGISTRY, "--http", "0.0.0.0:0", env=server_env(fake_model)
    )
    assert done.returncode == 2
    assert "refusing to serve MCP on 0.0.0.0:0 without tokens" in done.stderr


def start_mcp_http(
    args: list[str], env: dict[str, str], log_dir: Path, *, timeout: float = 90
) -> ServerProcess:
    """Start `legion mcp --agents REGISTRY ARGS` (with ``--http``) and wait
    until it says where it listens."""
    return start_server(args, env, log_dir, timeout=timeout, command="mcp")


@asynccontextmanager
async def http_session(url: str, token: str | None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def test_http_runs_each_caller_as_their_principal_and_refuses_a_wrong_token(
    docker_ready: None, fake_model: FakeOpenAIServer, tokens: Tokens, tmp_path: Path
) -> None:
    token_file = write_token_file(tmp_path, tokens)
    server = start_mcp_http(
        ["--http", "127.0.0.1:0", "--tokens", str(token_file), "--grace-seconds", "2"],
        server_env(fake_model),
        tmp_path,
    )
    try:
        url = server.address
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
        async with http_session(url, tokens.alice) as alice:
            listed = await alice.list_tools()
            assert sorted(t.name for t in listed.tools) == [
                "Coder",
                "Counter",
                "Echo",
                "Editor",
                "Keeper",
            ]
            said = await alice.call_tool("Echo", {"task": "hello over HTTP"})
            assert text_of(said) == "hello over HTTP"
            who = await alice.call_tool("Coder", {"task": "#code Profile.user()"})
            assert not who.is_error and text_of(who) == "alice"
        async with http_session(url, tokens.bob) as bob:
            who = await bob.call_tool("Coder", {"task": "#code Profile.user()"})
            assert text_of(who) == "bob"

        # A wrong token, or none, never reaches the MCP server: 401 at the door.
        initialize = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "probe", "version": "0"},
            },
        }
        accept = {"Accept": "application/json, text/event-stream"}
        async with httpx2.AsyncClient(timeout=30) as raw:
            for headers in ({"Authorization": "Bearer not-a-token"}, {}):
                answer = await raw.post(url, json=initialize, headers={**headers, **accept})
                assert answer.status_code == 401, answer.text
                assert json.loads(answer.text)["error"] == "invalid_token"
            allowed = await raw.post(
                url, json=initialize, headers={"Authorization": f"Bearer {tokens.bob}", **accept}
            )
            assert allowed.status_code == 200, allowed.text
        # The SDK's client, given a wrong token, fails to start its session.
        with pytest.raises(BaseExceptionGroup) as refused:
            async with http_session(url, "not-a-token") as wrong:
                await wrong.list_tools()
        leaves = _leaves(refused.value)
        assert leaves and all(isinstance(e, MCPError) for e in leaves), leaves
        assert "mcp_call_refused" in server.log() and "unknown token" in server.log()
    finally:
        stop_cleanly(server)


async def test_http_limits_runs_per_principal_and_drains_on_sigterm(
    docker_ready: None, fake_model: FakeOpenAIServer, tokens: Tokens, tmp_path: Path
) -> None:
    token_file = write_token_file(tmp_path, tokens)
    server = start_mcp_http(
        ["--http", "127.0.0.1:0", "--tokens", str(token_file), "--grace-seconds", "1"],
        server_env(fake_model),
        tmp_path,
    )
    try:
        async with http_session(server.address, tokens.carol) as carol:
            slow = asyncio.ensure_future(
                carol.call_tool("Coder", {"task": "#code import time; time.sleep(120)"})
            )
            deadline = time.monotonic() + 60
            while not _containers_of(server.pid):  # the run's sandbox is up
                assert time.monotonic() < deadline, server.log()[-3000:]
                await asyncio.sleep(0.2)
            # carol may have one run in flight.
            second = await carol.call_tool("Echo", {"task": "and another"})
            assert second.is_error and "carol already has 1 runs in flight" in text_of(second)
            server.process.send_signal(signal.SIGTERM)
            cut = await asyncio.wait_for(slow, 60)
            assert cut.is_error and "shutting down" in text_of(cut)
    finally:
        stop_cleanly(server)


def _processes_marked(mark: str, *, wait: float = 0) -> list[int]:
    """Live processes with LEGION_TEST_MARK=mark in their environment (waiting
    up to ``wait`` seconds for there to be none)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                marked = f"LEGION_TEST_MARK={mark}".encode() in environ.read_bytes()
                if marked and "State:\tZ" not in (environ.parent / "status").read_text():
                    found.append(int(environ.parent.name))
            except OSError:
                continue
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


async def test_an_agents_own_mcp_server_is_closed_when_legion_mcp_exits(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    mark = secrets.token_hex(8)
    log = tmp_path / "mcp-relay.log"
    env = server_env(fake_model, LEGION_TEST_MARK=mark)
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "legion.cli", "mcp", "--agents", "tests.server.mcp_agents:REGISTRY"],
        env=env,
        cwd=ROOT,
    )
    with log.open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            said = await session.call_tool("Relay", {"task": "#code Echo.echo(text='relayed')"})
            assert not said.is_error and text_of(said) == "relayed"
            assert _processes_marked(mark), "the agent's MCP server is not running"
            pid = _pid_in(log)
    assert _gone(pid)
    assert _processes_marked(mark, wait=10) == [], "legion mcp left its agent's MCP server"
    assert _containers_of(pid) == []


def test_stdio_exits_cleanly_on_sigterm(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    log = tmp_path / "mcp-sigterm.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "legion.cli", "mcp", "--agents", REGISTRY],
            cwd=ROOT,
            env=server_env(fake_model, LEGION_POOL_SIZE="1"),  # a warm container to remove
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 90
        while not SERVING_PID.search(log.read_text(errors="replace")):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        warm_deadline = time.monotonic() + 60
        while not _containers_of(process.pid) and time.monotonic() < warm_deadline:
            time.sleep(0.2)
        assert _containers_of(process.pid), "the warm pool never started a container"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _containers_of(process.pid) == []


async def test_https_with_client_certificates(
    docker_ready: None, fake_model: FakeOpenAIServer, tokens: Tokens, tmp_path: Path
) -> None:
    from .test_serve import _certificate, _key, _pem_key

    ca_key, server_key, client_key = _key(), _key(), _key()
    files = {
        "ca.pem": _certificate("Legion test CA", ca_key, ca=True),
        "server.pem": _certificate("legion mcp", server_key, ("Legion test CA", ca_key)),
        "server.key": _pem_key(server_key),
        "client.pem": _certificate("a client", client_key, ("Legion test CA", ca_key)),
        "client.key": _pem_key(client_key),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    token_file = write_token_file(tmp_path, tokens)
    server = start_mcp_http(
        [
            *("--http", "127.0.0.1:0", "--tokens", str(token_file)),
            *("--tls-cert", str(tmp_path / "server.pem")),
            *("--tls-key", str(tmp_path / "server.key")),
            *("--tls-client-ca", str(tmp_path / "ca.pem")),
        ],
        server_env(fake_model),
        tmp_path,
    )
    try:
        url = server.address
        assert url.startswith("https://127.0.0.1:"), url
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        trusted.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        headers = {"Authorization": f"Bearer {tokens.alice}"}
        async with (
            httpx2.AsyncClient(headers=headers, verify=trusted, timeout=60) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            said = await session.call_tool("Echo", {"task": "hello over HTTPS"})
            assert text_of(said) == "hello over HTTPS"
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        no_client_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        for why, verify in (("no client certificate", no_client_cert), ("plaintext", True)):
            target = url if why != "plaintext" else url.replace("https://", "http://")
            async with httpx2.AsyncClient(headers=headers, verify=verify, timeout=30) as raw:
                with pytest.raises(httpx2.TransportError):
                    await raw.post(target, json=initialize)
    finally:
        stop_cleanly(server)
