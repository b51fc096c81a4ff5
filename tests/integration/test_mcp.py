"""MCP servers as a tool source, against real servers nobody here wrote: the
reference servers from npm (server-memory, server-everything, installed by
`make test` into tests/mcp/node_modules and run with node, offline) and
mcp-server-git from PyPI. Sandbox code calls them as typed Python; every call
is checked and made on the controller."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import pytest

import legion
from legion.testing import ScriptedModel, action
from tests.conftest import missing

pytestmark = pytest.mark.docker

MODULES = Path(__file__).parents[1] / "mcp" / "node_modules" / "@modelcontextprotocol"
MEMORY = MODULES / "server-memory" / "dist" / "index.js"
EVERYTHING = MODULES / "server-everything" / "dist" / "index.js"
SERVERS = Path(__file__).parents[1] / "mcp" / "servers.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        missing("node is not installed (apt-get install nodejs npm)")
    if not MEMORY.is_file() or not EVERYTHING.is_file():
        pytest.fail(
            "the MCP reference servers are not installed: `make test` installs them "
            "(or `npm install` in tests/mcp)",
            pytrace=False,
        )
    return found


@pytest.fixture
async def memory(node: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = legion.MCP.stdio(
        node, [str(MEMORY)], env={"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")}
    )
    yield server
    await server.close()


async def test_memory_graph_built_in_a_loop_and_read_back_in_one_run(
    runtime: legion.SandboxRuntime, memory: legion.MCP
) -> None:
    assert memory.name == "Memory"  # from the package's name
    code = """
people = ["ada", "grace", "alan", "edsger", "barbara"]
for name in people:
    Memory.create_entities(entities=[
        {"name": name, "entityType": "person", "observations": [f"{name} wrote code"]}
    ])
for a, b in zip(people, people[1:]):
    Memory.create_relations(relations=[{"from": a, "to": b, "relationType": "knows"}])
graph = Memory.read_graph()
sorted(e["name"] for e in graph["entities"]), len(graph["relations"])
"""
    async with legion.Sandbox(tools=[memory], runtime=runtime) as sandbox:
        result = await sandbox.run(code)
    assert result.error is None, result.error
    assert result.value == [["ada", "alan", "barbara", "edsger", "grace"], 4]


# --- server-everything: every tool typed; structured, error, image, timeout ----------


async def _listed_by_the_sdk(command: str, args: list[str]) -> list[str]:
    """The server's tools as the SDK's own client lists them (the reference)."""
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from mcp import ClientSession

    params = StdioServerParameters(command=command, args=args)
    with open(os.devnull, "w") as quiet:  # noqa: ASYNC230 - opening /dev/null does not block
        async with (
            stdio_client(params, errlog=quiet) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return [t.name for t in (await session.list_tools()).tools]


@pytest.fixture
async def everything(node: str):  # type: ignore[no-untyped-def]
    server = legion.MCP.stdio(node, [str(EVERYTHING), "stdio"], timeout=2)
    yield server
    await server.close()


async def test_everything_lists_every_tool_with_a_typed_signature(
    node: str, everything: legion.MCP
) -> None:
    assert everything.name == "Everything"
    reference = await _listed_by_the_sdk(node, [str(EVERYTHING), "stdio"])
    definition = await everything.resolve()
    assert len(definition.functions) == len(reference) >= 10
    assert sorted(definition.functions) == sorted(n.replace("-", "_") for n in reference)
    for name, fn in definition.functions.items():
        ast.parse(f"def {name}{fn.signature}: ...")  # each one is Python
    functions = definition.functions
    assert functions["get_sum"].signature == "(a: float, b: float) -> Any"
    assert functions["get_structured_content"].signature == (
        "(location: Literal['New York', 'Chicago', 'Los Angeles']) -> dict[str, Any]"
    )
    assert "temperature" in functions["get_structured_content"].doc  # the outputSchema
    assert functions["trigger_long_running_operation"].signature == (
        "(duration: float = 10, steps: float = 5) -> Any"
    )

    class Assistant(legion.Agent):
        """Uses everything."""

        tools = [everything]

    prompt = legion.prompt_for(Assistant)
    assert "def Everything.get_sum(a: float, b: float) -> Any:" in prompt
    assert "Returns the sum of two numbers" in prompt


async def test_everything_results_errors_images_and_timeout_in_the_sandbox(
    runtime: legion.SandboxRuntime, everything: legion.MCP
) -> None:
    code = """
out = {}
out["sum"] = Everything.get_sum(a=2, b=3.5)
out["structured"] = Everything.get_structured_content(location="Chicago")
out["image"] = Everything.get_tiny_image()
try:
    Everything.gzip_file_as_resource(name="x.gz", data="http://127.0.0.1:9/nothing")
except ToolError as exc:
    out["error"] = [type(exc).__name__, str(exc)]
try:
    Everything.get_structured_content(location="Paris")
except ToolArgumentError as exc:
    out["bad"] = str(exc)
try:
    Everything.trigger_long_running_operation(duration=30, steps=3)
except ToolTimeout as exc:
    out["timeout"] = str(exc)
out["after"] = Everything.echo(message="still here")
out
"""
    async with legion.Sandbox(tools=[everything], runtime=runtime) as sandbox:
        started = time.monotonic()
        result = await sandbox.run(code, timeout=60)
        took = time.monotonic() - started
    assert result.error is None, result.error
    out = result.value
    assert out["sum"] == "The sum of 2 and 3.5 is 5.5."
    assert set(out["structured"]) == {"temperature", "conditions", "humidity"}
    texts = [p for p in out["image"] if isinstance(p, str)]
    [image] = [p for p in out["image"] if isinstance(p, dict)]
    assert texts and image["type"] == "image" and image["mime_type"] == "image/png"
    assert image["bytes"] > 100
    # The picture itself is an artifact of the run, shown to the user, never in the sandbox.
    assert image["shown"] is True
    [picture] = [a for a in result.artifacts if a.description.startswith("an image from")]
    assert picture.mime_type == "image/png" and len(picture.data) == image["bytes"]
    assert picture.data.startswith(b"\x89PNG")
    assert out["error"][0] == "MCPToolError" and "fetch failed" in out["error"][1]
    assert "location" in out["bad"] and "Paris" in out["bad"]
    assert "did not answer within 2 s" in out["timeout"]
    assert out["after"] == "Echo: still here"
    assert took < 20  # the 30 s operation was cut at 2 s


# --- mcp-server-git on a repository the test makes -------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@example.org", *args],
        check=True,
        capture_output=True,
    )


async def test_git_log_and_diff_come_back_as_text(
    runtime: legion.SandboxRuntime, tmp_path: Path
) -> None:
    git_server = Path(sys.executable).with_name("mcp-server-git")
    if not git_server.is_file():
        pytest.fail("mcp-server-git is not installed: pip install -e '.[dev]'", pytrace=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("first line\n")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "Add the notes")
    (repo / "notes.txt").write_text("first line\nsecond line\n")
    _git(repo, "commit", "-q", "-am", "Extend the notes")
    (repo / "notes.txt").write_text("first line\nsecond line, edited\n")
    server = legion.MCP.stdio(str(git_server), ["--repository", str(repo)])
    assert server.name == "Git"
    code = f"""
log = Git.git_log(repo_path={str(repo)!r}, max_count=5)
diff = Git.git_diff_unstaged(repo_path={str(repo)!r})
log, diff
"""
    try:
        async with legion.Sandbox(tools=[server], runtime=runtime) as sandbox:
            result = await sandbox.run(code)
    finally:
        await server.close()
    assert result.error is None, result.error
    log, diff = result.value
    assert isinstance(log, str) and isinstance(diff, str)
    assert log.index("Extend the notes") < log.index("Add the notes")
    assert "-second line" in diff and "+second line, edited" in diff


# --- per-principal auth over streamable HTTP --------------------------------------------

ALICE = "tok-alice-5b1f0c7e-never-in-a-sandbox"
BOB = "tok-bob-93d2aa41-never-in-a-sandbox"


@pytest.fixture
def whoami_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path / "whoami.jsonl"
    env = {**os.environ, "WHOAMI_TOKENS": json.dumps({ALICE: "alice", BOB: "bob"})}
    process = subprocess.Popen(
        [sys.executable, str(SERVERS), "http", str(port), str(log)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the whoami MCP server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", log
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a container's memory needs root")
async def test_each_principal_s_token_reaches_the_http_server_and_never_the_sandbox(
    whoami_server: tuple[str, Path], docker_client: docker.DockerClient
) -> None:
    from tests.security.test_vault_isolation import _file_hits, _memory_hits, _runner_pids

    url, log = whoami_server
    server = legion.MCP.http(
        url, headers=lambda vault: {"Authorization": f"Bearer {vault['mcp_token']}"}, name="Who"
    )

    class Caller(legion.Agent):
        """Asks the server who it is."""

        tools = [server]

    findings: list[str] = []

    def scan(messages: list[dict[str, str]]) -> str:
        [container_id] = runtime.live_containers
        config = repr(docker_client.api.inspect_container(container_id))
        pids = _runner_pids(docker_client, container_id)
        for token in (ALICE, BOB):
            needle = token.encode()
            if token in config:
                findings.append(f"{token}: container config")
            findings.extend(
                f"{token}: environ {p}"
                for p in pids
                if needle in Path(f"/proc/{p}/environ").read_bytes()
            )
            findings.extend(
                f"{token}: memory {p} {h}" for p in pids for h in _memory_hits(p, needle)
            )
            findings.extend(
                f"{token}: file {h}" for h in _file_hits(docker_client, container_id, needle)
            )
        answer = re.search(r"\b(alice|bob|nobody)\b", messages[-1]["content"])
        return action("return", result=answer.group(1) if answer else "?")

    answers = {}
    try:
        async with legion.SandboxRuntime(pool_size=0) as runtime:
            for who, token in (("alice", ALICE), ("bob", BOB)):
                model = ScriptedModel([action("eval_and_continue", "Who.whoami()"), scan])
                result = await legion.run(
                    Caller, "who am I?", model=model, runtime=runtime, vault={"mcp_token": token}
                )
                answers[who] = result.output
    finally:
        await server.close()
    assert answers == {"alice": "alice", "bob": "bob"}
    seen = [json.loads(line)["authorization"] for line in log.read_text().splitlines()]
    assert seen == [f"Bearer {ALICE}", f"Bearer {BOB}"]
    assert findings == []


# --- faults: a killed server, one that never answers, a call the schema refuses --------


async def test_a_killed_stdio_server_gives_one_error_and_is_restarted_on_the_next_call(
    runtime: legion.SandboxRuntime, node: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "server.pid"
    server = legion.MCP.stdio(
        "sh",
        ["-c", f'echo $$ > "{pid_file}"; exec "{node}" "{EVERYTHING}" stdio'],
        name="Everything",
        timeout=30,
    )

    def kill_server_soon(delay: float) -> int:
        """Kills the MCP server's process after ``delay`` seconds."""
        pid = int(pid_file.read_text())
        threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()
        return pid

    code = """
first = kill_server_soon(1.0)
try:
    Everything.trigger_long_running_operation(duration=20, steps=20)
    error = None
except ToolError as exc:
    error = [type(exc).__name__, str(exc)]
after = Everything.get_sum(a=1, b=2)
first, error, after
"""
    try:
        async with legion.Sandbox(tools=[server, kill_server_soon], runtime=runtime) as sandbox:
            started = time.monotonic()
            result = await sandbox.run(code, timeout=60)
            took = time.monotonic() - started
    finally:
        await server.close()
    assert result.error is None, result.error
    first, error, after = result.value
    assert error[0] == "MCPError"
    assert "Everything" in error[1] and "restarted on the next call" in error[1]
    assert after == "The sum of 1 and 2 is 3."
    assert int(pid_file.read_text()) != first  # a new process answered
    assert took < 15


async def test_a_server_that_never_answers_hits_the_timeout_and_a_bad_call_never_reaches_it(
    runtime: legion.SandboxRuntime, tmp_path: Path
) -> None:
    log = tmp_path / "calls.jsonl"
    log.touch()
    server = legion.MCP.stdio(
        sys.executable, [str(SERVERS), "stdio", str(log)], name="Faults", timeout=1.5
    )
    code = """
out = {}
try:
    Faults.hang()
except ToolTimeout as exc:
    out["hang"] = str(exc)
try:
    Faults.record(count="seven")
except ToolArgumentError as exc:
    out["bad"] = str(exc)
try:
    Faults.record(label="no count")
except ToolArgumentError as exc:
    out["missing"] = str(exc)
out["good"] = Faults.record(count=7)
out
"""
    try:
        async with legion.Sandbox(tools=[server], runtime=runtime) as sandbox:
            result = await sandbox.run(code, timeout=30)
    finally:
        await server.close()
    assert result.error is None, result.error
    out = result.value
    assert "Faults.hang did not answer within 1.5 s" in out["hang"]
    assert "parameter 'count'" in out["bad"] and "'seven' is not of type 'integer'" in out["bad"]
    assert out["missing"] == "Faults.record: parameter 'count' is required"
    assert out["good"] == {"result": "recorded 7"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        {"tool": "record", "count": 7, "label": "x"}
    ]  # the server saw only the good one
