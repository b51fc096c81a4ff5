"""MCP servers written for the tests with the `mcp` SDK's MCPServer.

``python servers.py stdio LOG`` serves, over stdio, a tool that never answers
(``hang``) and one that records each call it receives in LOG (``record``), so
a test can assert on what the server saw. ``python servers.py http PORT LOG``
serves ``whoami`` over streamable HTTP on 127.0.0.1:PORT: it appends the
request's Authorization header to LOG and answers with the name the token
table (``$WHOAMI_TOKENS``, JSON: token -> name) gives its bearer token, so
the token itself never travels back to the caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from mcp.server.mcpserver import Context, MCPServer


def _log(path: str, entry: dict[str, object]) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")


def stdio_server(log: str) -> MCPServer:
    server = MCPServer("faults")

    @server.tool()
    async def hang() -> str:
        """Never answers."""
        await asyncio.sleep(3600)
        return "unreachable"

    @server.tool()
    def record(count: int, label: str = "x") -> str:
        """Records the call in the log."""
        _log(log, {"tool": "record", "count": count, "label": label})
        return f"recorded {count}"

    return server


def http_server(log: str) -> MCPServer:
    server = MCPServer("whoami")
    tokens: dict[str, str] = json.loads(os.environ.get("WHOAMI_TOKENS", "{}"))

    @server.tool()
    def whoami(ctx: Context) -> str:
        """Who the request's bearer token belongs to."""
        request = ctx.request_context.request
        header = request.headers.get("authorization", "") if request is not None else ""
        _log(log, {"tool": "whoami", "authorization": header})
        return tokens.get(header.removeprefix("Bearer "), "nobody")

    return server


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "stdio":
        stdio_server(sys.argv[2]).run("stdio")
    else:
        http_server(sys.argv[3]).run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
