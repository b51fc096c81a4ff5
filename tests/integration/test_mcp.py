"""MCP servers as a tool source, against real servers nobody here wrote: the
reference servers from npm (server-memory, server-everything, installed by
`make test` into tests/mcp/node_modules and run with node, offline) and
mcp-server-git from PyPI. Sandbox code calls them as typed Python; every call
is checked and made on the controller."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import legion

pytestmark = pytest.mark.docker

MODULES = Path(__file__).parents[1] / "mcp" / "node_modules" / "@modelcontextprotocol"
MEMORY = MODULES / "server-memory" / "dist" / "index.js"
EVERYTHING = MODULES / "server-everything" / "dist" / "index.js"


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not installed (apt-get install nodejs npm)")
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
