"""An agent that uses an MCP server of its own, served by `legion mcp` in
tests/server/test_mcp_server.py (``--agents tests.server.mcp_agents:REGISTRY``).

The server is bench/mcp_echo_server.py over stdio; ``LEGION_TEST_MARK`` in
its environment lets the test find its process after `legion mcp` exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import legion

ROOT = Path(__file__).resolve().parents[2]

Echo = legion.MCP.stdio(
    sys.executable,
    ["-m", "bench.mcp_echo_server"],
    cwd=str(ROOT),
    env={"LEGION_TEST_MARK": os.environ.get("LEGION_TEST_MARK", "")},
    name="Echo",
)


class Relay(legion.Agent):
    """Passes words through an MCP echo server."""

    tools = [Echo]
    config = {"max_iterations": 2, "max_retries": 1}


REGISTRY = {"Relay": Relay}
