"""The MCP server the MCP call benchmark calls: one ``echo`` tool, over stdio,
written with the official SDK (``python -m bench.mcp_echo_server``)."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

server = MCPServer("Echo")


@server.tool(structured_output=False)  # plain text: a str in the sandbox too
def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


if __name__ == "__main__":
    server.run("stdio")
