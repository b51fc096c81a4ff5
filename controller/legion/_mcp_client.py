"""MCP servers as a tool source: ``legion.MCP.stdio(...)`` and ``legion.MCP.http(...)``.

The sessions live on the controller, on one event loop of their own (a
daemon thread): the SDK is anyio-based, its cancel scopes must be entered and
left by the same task, and a session outlives the run (and the event loop)
that opened it. Sandbox code only sees typed stubs (see ``_mcp_stubs``); a
call is checked against the tool's inputSchema here, then made by the session
of the caller's credentials. ``headers=`` / ``env=`` may be functions of the
caller's vault: then each distinct set of values gets its own session, and
none of them ever reaches the sandbox.

The ``mcp`` SDK is imported only by this module, and only when a session
opens: importing it takes a while, and ``import legion`` stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from . import vault as _vault
from ._log import get_logger
from ._mcp_stubs import ToolStubSpec, stub_for
from .errors import LegionError, MCPError, MCPToolError, UsageError
from .sandbox.session import show
from .sandbox.tools import ToolDef, ToolFunction

__all__ = ["MCP", "close_all_sessions"]

log = get_logger("legion.mcp")

T = TypeVar("T")
Secrets = Mapping[str, str] | Callable[[Mapping[str, Any]], Mapping[str, str]]
"""Fixed values, or a function of the caller's vault (``legion.vault.current()``)."""

_STDERR_LINES = 10
_STDERR_TAIL_BYTES = 4096


# --- the loop the sessions live on --------------------------------------------------


class _SessionLoop:
    """One event loop in a daemon thread, for every MCP session of the process."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=serve, name="legion-mcp", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self.loop())

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the session loop; cancelling the caller cancels it."""
        return await asyncio.wrap_future(self.submit(work))

    def run_blocking(self, work: Coroutine[Any, Any, T]) -> T:
        return self.submit(work).result()


_sessions_loop = _SessionLoop()
_servers: list[MCP] = []  # every MCP whose sessions close_all_sessions() closes
_servers_lock = threading.Lock()


# --- one live session ------------------------------------------------------------------


class _Connection:
    """One MCP session, held open by one task of the session loop."""

    def __init__(self, server: MCP, env: Mapping[str, str], headers: Mapping[str, str]) -> None:
        self.server = server
        self.env = dict(env)
        self.headers = dict(headers)
        self.session: Any = None
        self.failed: BaseException | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stderr: TextIO | None = None
        self.tools: list[Any] = []

    @property
    def usable(self) -> bool:
        return self.failed is None and self._task is not None and not self._task.done()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._hold(), name=f"mcp:{self.server.name}")
        try:
            async with asyncio.timeout(self.server.connect_timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            raise MCPError(
                f"MCP server {self.server.name} did not complete its handshake within "
                f"{self.server.connect_timeout:g} s{self.stderr_tail()}"
            ) from None
        except MCPError:
            await self.close()
            raise

    async def _hold(self) -> None:
        from mcp.types import PaginatedRequestParams  # noqa: PLC0415

        from mcp import ClientSession  # noqa: PLC0415 - see the module docstring

        assert self._ready is not None and self._closing is not None
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await self._transport(stack)
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                tools: list[Any] = []
                cursor = None
                while True:
                    params = PaginatedRequestParams(cursor=cursor) if cursor else None
                    listing = await session.list_tools(params=params)
                    tools.extend(listing.tools)
                    cursor = listing.next_cursor
                    if not cursor:
                        break
                self.tools, self.session = tools, session
                if not self._ready.done():
                    self._ready.set_result(None)
                await self._closing.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failed = exc
            if not self._ready.done():
                self._ready.set_exception(
                    MCPError(
                        f"MCP server {self.server.name} could not be started: "
                        f"{_describe(exc)}{self.stderr_tail()}"
                    )
                )
        finally:
            self.session = None
            if self.failed is None:
                self.failed = MCPError("the session is closed")

    async def _transport(self, stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        server = self.server
        if server.transport == "stdio":
            from mcp.client.stdio import (  # noqa: PLC0415
                StdioServerParameters,
                stdio_client,
            )

            # A real file: the server process writes its stderr straight into
            # it. Kept open past the session, so an error can quote its end.
            if self._stderr is None:
                self._stderr = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
                    "w+", encoding="utf-8", errors="replace"
                )
            params = StdioServerParameters(
                command=server.command, args=list(server.args), env=self.env or None, cwd=server.cwd
            )
            streams = await stack.enter_async_context(stdio_client(params, errlog=self._stderr))
            return streams[0], streams[1]
        from mcp.client.streamable_http import streamable_http_client  # noqa: PLC0415
        from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: PLC0415

        client = await stack.enter_async_context(create_mcp_http_client(headers=self.headers))
        streams = await stack.enter_async_context(
            streamable_http_client(server.url, http_client=client)
        )
        return streams[0], streams[1]

    def stderr_tail(self) -> str:
        """The server's last stderr lines, as the end of an error message."""
        file = self._stderr
        if file is None:
            return ""
        try:
            size = os.fstat(file.fileno()).st_size
            data = os.pread(file.fileno(), _STDERR_TAIL_BYTES, max(0, size - _STDERR_TAIL_BYTES))
        except (OSError, ValueError):
            return ""
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        if not lines:
            return " (it wrote nothing to stderr)"
        shown = "\n".join(f"    {line}" for line in lines[-_STDERR_LINES:])
        return f"\nlast stderr lines of {self.server.name}:\n{shown}"

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        session = self.session
        if session is None:
            raise MCPError(f"MCP server {self.server.name} is not connected")
        return await session.call_tool(tool, arguments)

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        task = self._task
        try:
            if task is not None and not task.done():
                try:
                    async with asyncio.timeout(10):
                        await asyncio.shield(task)
                except TimeoutError:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                except BaseException:  # its failure was already reported to its caller
                    return
        finally:
            if self._stderr is not None:
                self._stderr.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _is_protocol_error(exc: BaseException) -> bool:
    """A JSON-RPC error answer (the server is alive and said no)."""
    from mcp.shared.exceptions import MCPError as SDKError  # noqa: PLC0415

    return isinstance(exc, SDKError) and not _connection_lost(exc)


def _connection_lost(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "connection closed" in text or ("closed" in text and "connection" in text)


# --- the tool source --------------------------------------------------------------------


@dataclass
class _ServerState:
    """What an MCP object learns and holds (it is otherwise immutable)."""

    connections: dict[str, _Connection] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    tools: list[Any] | None = None
    definition: ToolDef | None = None


@dataclass(frozen=True, eq=False)
class MCP:
    """An MCP server whose tools sandbox code may call as ``Name.tool(...)``.

    Make one with :meth:`stdio` or :meth:`http` and list it in an agent's
    ``tools`` (or ``legion.Sandbox(tools=...)``)::

        Memory = legion.MCP.stdio("npx", ["-y", "@modelcontextprotocol/server-memory"])

        class Archivist(legion.Agent):
            \"\"\"Keeps notes in a knowledge graph.\"\"\"
            tools = [Memory]

    The sandbox code then calls ``Memory.create_entities(entities=[...])``;
    the call runs here, in the controller's MCP session, after its arguments
    were checked against the tool's inputSchema.
    """

    name: str
    transport: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Secrets | None = None
    cwd: str | None = None
    url: str = ""
    headers: Secrets | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    timeout: float | None = None
    connect_timeout: float = 30.0
    _state: _ServerState = field(default_factory=_ServerState, repr=False)

    __legion_tool_source__ = True

    @classmethod
    def stdio(
        cls,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Secrets | None = None,
        cwd: str | None = None,
        name: str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        timeout: float | None = None,
        connect_timeout: float = 30.0,
    ) -> MCP:
        """A server the controller starts as a subprocess and talks to over stdio.

        ``env`` (added to a minimal environment: PATH, HOME and the like, never
        the controller's own variables) may be a function of the caller's
        vault, e.g. ``env=lambda v: {"API_TOKEN": v["token"]}``: then each
        principal gets its own server process. ``timeout``: seconds a call may
        take (None: the sandbox's tool timeout). ``include`` / ``exclude``
        select tools by their MCP names.
        """
        if not command:
            raise UsageError("MCP.stdio: command must name the server's program")
        return cls._make(
            name or _name_from(command, args),
            transport="stdio",
            command=command,
            args=tuple(args),
            env=env,
            cwd=cwd,
            include=include,
            exclude=exclude,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )

    @classmethod
    def http(
        cls,
        url: str,
        *,
        headers: Secrets | None = None,
        name: str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        timeout: float | None = None,
        connect_timeout: float = 30.0,
    ) -> MCP:
        """A server reached over streamable HTTP at ``url``.

        ``headers`` may be a function of the caller's vault, e.g.
        ``headers=lambda v: {"Authorization": f"Bearer {v['token']}"}``: then
        each principal's requests carry its own token, in its own session.
        """
        if not re.match(r"https?://", url):
            raise UsageError(f"MCP.http: {url!r} is not an http:// or https:// URL")
        return cls._make(
            name or _name_from(url.rstrip("/").rsplit("/", 2)[-2] if "/" in url else url, ()),
            transport="http",
            url=url,
            headers=headers,
            include=include,
            exclude=exclude,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )

    @classmethod
    def _make(
        cls,
        name: str,
        *,
        include: Sequence[str] | None,
        exclude: Sequence[str],
        timeout: float | None,
        connect_timeout: float,
        **fields: Any,
    ) -> MCP:
        if not name.isidentifier() or name.startswith("_"):
            raise UsageError(
                f"MCP server name {name!r} is not a public Python identifier; pass name=..., "
                f"the namespace sandbox code uses (e.g. name='Memory')"
            )
        if isinstance(include, str) or isinstance(exclude, str):
            raise UsageError(f"MCP {name}: include= and exclude= take lists of tool names")
        if (timeout is not None and timeout <= 0) or connect_timeout <= 0:
            raise UsageError(f"MCP {name}: timeouts must be positive numbers of seconds")
        server = cls(
            name=name,
            include=tuple(include) if include is not None else None,
            exclude=tuple(exclude),
            timeout=timeout,
            connect_timeout=connect_timeout,
            **fields,
        )
        with _servers_lock:
            _servers.append(server)
        return server

    # sessions -------------------------------------------------------------------------

    def _secrets(self) -> tuple[dict[str, str], dict[str, str]]:
        vault = _vault.current()
        return _resolve(self.env, vault, f"{self.name} env"), _resolve(
            self.headers, vault, f"{self.name} headers"
        )

    async def _connection(self, env: dict[str, str], headers: dict[str, str]) -> _Connection:
        """The open session for these credentials (on the session loop)."""
        state = self._state
        key = _key(env, headers)
        lock = state.locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = state.connections.get(key)
            if conn is not None and conn.usable:
                return conn
            if conn is not None:
                log.info(
                    "mcp_restart", server=self.name, reason=_describe(conn.failed or Exception())
                )
                await conn.close()
            conn = _Connection(self, env, headers)
            state.connections[key] = conn
            try:
                await conn.open()
            except BaseException:
                state.connections.pop(key, None)
                raise
            if state.tools is None:
                state.tools = conn.tools
            return conn

    async def _list(self, env: dict[str, str], headers: dict[str, str]) -> list[Any]:
        conn = await self._connection(env, headers)
        return conn.tools

    async def _call(
        self, env: dict[str, str], headers: dict[str, str], tool: str, arguments: dict[str, Any]
    ) -> Any:
        conn = await self._connection(env, headers)
        try:
            return await conn.call(tool, arguments)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _is_protocol_error(exc):
                raise MCPToolError(f"{self.name}.{tool}: {exc}") from None
            conn.failed = exc
            tail = conn.stderr_tail()
            await conn.close()
            raise MCPError(
                f"MCP server {self.name} failed during {tool} ({_describe(exc)}); "
                f"it is restarted on the next call{tail}"
            ) from None

    async def close(self) -> None:
        """Close every session of this server (stops its stdio processes)."""
        await _sessions_loop.run(self._close())

    async def _close(self) -> None:
        connections = list(self._state.connections.values())
        self._state.connections.clear()
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

    # as a tool ---------------------------------------------------------------------------

    async def list_tools(self) -> list[ToolStubSpec]:
        """Connect (with the current vault's credentials) and describe the
        selected tools as Python stubs."""
        env, headers = self._secrets()
        tools = await _sessions_loop.run(self._list(env, headers))
        return self._stubs(tools)

    def _stubs(self, tools: list[Any]) -> list[ToolStubSpec]:
        names = {t.name for t in tools}
        unknown = sorted({*(self.include or ()), *self.exclude} - names)
        if unknown:
            raise UsageError(
                f"MCP {self.name}: include/exclude name tools it does not have: {unknown} "
                f"(it has: {', '.join(sorted(names))})"
            )
        stubs: list[ToolStubSpec] = []
        taken: set[str] = set()
        for tool in tools:
            if self.include is not None and tool.name not in self.include:
                continue
            if tool.name in self.exclude:
                continue
            stub = stub_for(tool.name, tool.description, tool.input_schema, tool.output_schema)
            python = stub.name
            while python in taken:
                python += "_"
            taken.add(python)
            if python != stub.name:
                stub = stub_for(
                    tool.name,
                    tool.description,
                    tool.input_schema,
                    tool.output_schema,
                    python=python,
                )
            stubs.append(stub)
        return stubs

    async def resolve(self) -> ToolDef:
        """This server's tools as a ToolDef (connecting once; cached)."""
        state = self._state
        if state.definition is None:
            state.definition = self._tool_def(await self.list_tools())
        return state.definition

    def tool_def(self) -> ToolDef:
        """:meth:`resolve` for code without an event loop (blocks while connecting)."""
        state = self._state
        if state.definition is None:
            env, headers = self._secrets()
            tools = _sessions_loop.run_blocking(self._list(env, headers))
            state.definition = self._tool_def(self._stubs(tools))
        return state.definition

    @property
    def resolved(self) -> ToolDef | None:
        return self._state.definition

    def _tool_def(self, stubs: list[ToolStubSpec]) -> ToolDef:
        functions = {s.name: self._function(s) for s in stubs}
        if not functions:
            raise UsageError(f"MCP {self.name}: no tools are left to call (check include/exclude)")
        doc = (
            f"Tools of the MCP server {self.name}. A tool without a declared return type "
            "returns the server's text as a str (a list when it sends several parts; an "
            "image or other binary part is a dict describing it; an image is also shown to "
            "the user as a picture). A failed call raises "
            "MCPToolError with the server's message; bad arguments raise ToolArgumentError."
        )
        return ToolDef(name=self.name, doc=doc, functions=functions)

    def _function(self, stub: ToolStubSpec) -> ToolFunction:
        label = f"{self.name}.{stub.name}"

        async def call(*args: Any, **kwargs: Any) -> Any:
            arguments = stub.arguments(label, args, kwargs)
            env, headers = self._secrets()
            result = await _sessions_loop.run(self._call(env, headers, stub.mcp_name, arguments))
            return _result_value(label, result)

        return ToolFunction(
            name=stub.name,
            signature=stub.signature,
            doc=stub.doc,
            call=call,
            is_async=True,
            positional=stub.positional,
            timeout=self.timeout,
        )

    def source(self) -> str:
        """What the model reads about this server: its tools as Python stubs."""
        definition = self._state.definition or self.tool_def()
        lines = [f'"""{definition.doc}"""']
        for fn in definition.functions.values():
            lines.append(f"def {self.name}.{fn.name}{fn.signature}:")
            body = fn.doc.replace('"""', "'''").strip() or "..."
            lines.append(
                "    " + f'"""{body}"""'.replace("\n", "\n    ").replace("\n    \n", "\n\n")
            )
        return "\n".join(lines)


def _name_from(target: str, args: Sequence[str]) -> str:
    """A namespace from the server's package or program: ``Memory`` for
    ``@modelcontextprotocol/server-memory``, ``Git`` for ``mcp-server-git``."""
    launchers = {"node", "npx", "python", "python3", "uv", "uvx", "deno", "bun", "sh", "bash"}
    if os.path.basename(target) not in launchers:
        args = ()
    candidates = [a for a in args if not a.startswith("-")] or [target]
    parts = [re.sub(r"\.(js|mjs|cjs|py)$", "", p) for p in candidates[0].split("/") if p]
    generic = {"index", "main", "cli", "dist", "build", "lib", "src", "bin", "server", "mcp"}
    named = [p for p in parts if p.lower() not in generic]
    base = named[-1] if named else (parts[-1] if parts else target)
    base = re.sub(r"^(mcp-server-|server-|mcp-)|(-mcp-server|-server|-mcp)$", "", base)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", base) if w]
    return "".join(w[:1].upper() + w[1:] for w in words) or "MCP"


def _resolve(secrets: Secrets | None, vault: Mapping[str, Any], what: str) -> dict[str, str]:
    if secrets is None:
        return {}
    if callable(secrets):
        try:
            values = secrets(vault)
        except LegionError:
            raise
        except Exception as exc:
            raise MCPError(
                f"MCP {what}: the function of the vault failed: {_describe(exc)}"
            ) from None
    else:
        values = secrets
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in values.items()
    ):
        raise UsageError(
            f"MCP {what} must be a mapping of str to str (or a function returning one)"
        )
    return dict(values)


def _key(env: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """One session per distinct set of credentials; the key holds only a digest."""
    blob = json.dumps([sorted(env.items()), sorted(headers.items())]).encode()
    return hashlib.sha256(blob).hexdigest()


# --- results ----------------------------------------------------------------------------


def _result_value(label: str, result: Any) -> Any:
    parts = [_content(part, label) for part in result.content or ()]
    if result.is_error:
        message = (
            "\n".join(p for p in parts if isinstance(p, str)) or "the server reported an error"
        )
        raise MCPToolError(f"{label}: {message}")
    if result.structured_content is not None:
        return result.structured_content
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts


def _content(part: Any, label: str) -> Any:
    kind = getattr(part, "type", None)
    if kind == "text":
        return part.text
    if kind in ("image", "audio"):
        shown = False
        if kind == "image":
            try:
                data = base64.b64decode(part.data, validate=True)
            except (ValueError, TypeError):
                data = b""
            shown = bool(data) and show(part.mime_type, data, f"an image from {label}")
        note = (
            "shown to the user as an artifact of this run; its bytes stay on the host"
            if shown
            else f"binary {kind} content, not passed into the sandbox"
        )
        return {
            "type": kind,
            "mime_type": part.mime_type,
            "bytes": _decoded_size(part.data),
            "shown": shown,
            "note": note,
        }
    if kind == "resource":
        resource = part.resource
        out: dict[str, Any] = {"type": "resource", "uri": str(resource.uri)}
        if getattr(resource, "mime_type", None):
            out["mime_type"] = resource.mime_type
        if getattr(resource, "text", None) is not None:
            out["text"] = resource.text
        elif getattr(resource, "blob", None) is not None:
            out["bytes"] = _decoded_size(resource.blob)
        return out
    if kind == "resource_link":
        link = {"type": "resource_link", "uri": str(part.uri), "name": part.name}
        if part.mime_type:
            link["mime_type"] = part.mime_type
        if part.description:
            link["description"] = part.description
        return link
    dump: Any = part.model_dump(mode="json") if hasattr(part, "model_dump") else repr(part)
    return dump


def _decoded_size(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except ValueError:
        return len(data)


# --- shutdown ---------------------------------------------------------------------------


async def close_all_sessions() -> None:
    """Close every MCP session of this process (``legion serve`` at shutdown)."""
    with _servers_lock:
        servers = list(_servers)
    if not any(s._state.connections for s in servers):
        return
    await _sessions_loop.run(_close_servers(servers))


async def _close_servers(servers: Sequence[MCP]) -> None:
    await asyncio.gather(*(s._close() for s in servers), return_exceptions=True)
