"""``legion mcp``: a registry of agents as MCP tools.

Each agent is one tool: its input is ``{"task": "..."}``, its result the
agent's answer (text, and ``structuredContent`` when the agent's output
schema is a JSON object; files the run left in ``/data/out`` as embedded
resources). Any MCP client (an IDE, a desktop assistant, another agent
framework) can then hand work to a sandboxed Legion agent.

Two transports, both from the official ``mcp`` SDK:

- **stdio** (the default): the client starts ``legion mcp`` and speaks on its
  stdin and stdout. The runs belong to :data:`~legion.server.auth.LOCAL`, or,
  when a token table is configured, to the principal of ``--token`` (checked
  at start-up: an unknown token is refused before anything is served).
- **streamable HTTP** (``--http HOST:PORT``): every request carries
  ``Authorization: Bearer <token>``, which the token table maps to a principal,
  as in ``legion serve``; a missing or unknown token gets 401. Without tokens
  only a loopback address is allowed.

A call runs as its principal: the principal's vault values are bound around
the run (tools read them; they never reach the sandbox or the MCP client) and
its ``max_concurrent_runs`` applies. On SIGTERM or SIGINT (or, over stdio,
when the client closes stdin) no new call is accepted, runs in flight get
``grace_seconds`` to finish, the rest are cancelled, and every container is
removed before the process exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import mimetypes
import os
import re
import signal
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from .. import vault as _vault
from .._api_codec import to_json
from .._log import get_logger
from .._mcp_client import close_all_sessions
from .._net import is_loopback_host
from .._results import RunResult
from ..agent import Agent, definition_of
from ..agent import run as run_agent
from ..config import resolve_agent_config
from ..errors import LegionError, UsageError
from ..sandbox import SandboxRuntime
from .app import _split, check_loopback_or_tokens
from .auth import LOCAL, Authenticator, Principal

__all__ = ["AgentTools", "MCPSettings", "check_http", "serve_mcp"]

log = get_logger("legion.mcp")

SERVER_NAME = "legion"
MCP_PATH = "/mcp"
PRINCIPAL_SCOPE_KEY = "legion.principal"
"""Where the HTTP front door leaves the caller's principal in the ASGI scope."""
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
"""What MCP allows as a tool name."""

TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task": {
            "type": "string",
            "minLength": 1,
            "description": "What the agent should do, in plain words.",
        }
    },
    "required": ["task"],
    "additionalProperties": False,
}
"""Every agent's input: one task."""


@dataclass(frozen=True, kw_only=True)
class MCPSettings:
    """How ``legion mcp`` serves and whom it lets in."""

    http: str | None = None
    """``HOST:PORT`` for streamable HTTP (port 0 picks a free one); None: stdio."""
    authenticator: Authenticator | None = None
    """Maps bearer tokens to principals. None: no tokens; HTTP then only on loopback."""
    token: str | None = None
    """Over stdio with a token table: whose runs these are (required then)."""
    grace_seconds: float = 10.0
    """On shutdown, how long runs in flight may take before they are cancelled."""
    max_concurrent_runs: int = 4
    """Runs one principal may have in flight (unless its entry says otherwise)."""
    run_config: Mapping[str, Any] = field(default_factory=dict)
    """AgentConfig keys for every run, over the agents' own config."""
    agent_images: Mapping[str, str] = field(default_factory=dict)
    """Agent name -> the image its runs use."""
    pool_size: int | None = None
    """Warm sandboxes kept ready (None: ``LEGION_POOL_SIZE``, or 2)."""
    image: str | None = None
    """The runtime's image (None: ``LEGION_IMAGE``, else the runner's own)."""
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key``, HTTP is HTTPS."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle: HTTPS clients must present a certificate it signed."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UsageError("--tls-client-ca needs TLS on: give --tls-cert and --tls-key too")
        if self.tls_cert is not None and self.http is None:
            raise UsageError("TLS is for --http; stdio needs none")
        if self.grace_seconds < 0:
            raise UsageError("grace_seconds must be >= 0")
        if self.max_concurrent_runs < 1:
            raise UsageError("max_concurrent_runs must be at least 1")
        if self.pool_size is not None and self.pool_size < 0:
            raise UsageError("pool_size must be 0 (cold starts) or more")
        if self.http is not None:
            check_http(self.http, authenticated=self.authenticator is not None)
        elif self.token is not None and self.authenticator is None:
            raise UsageError("--token names a principal of the token table; give --tokens too")


def check_http(address: str, *, authenticated: bool) -> None:
    """Refuse an HTTP address other than loopback without tokens."""
    check_loopback_or_tokens(
        address,
        option="--http",
        what="MCP",
        could="could run agents",
        authenticated=authenticated,
    )


# --- the agents as tools ---------------------------------------------------------------


def _object_schema(schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The agent's output schema when MCP can carry it as ``outputSchema``."""
    if schema is not None and schema.get("type") == "object":
        return dict(schema)
    return None


class AgentTools:
    """What ``tools/list`` and ``tools/call`` answer: one tool per agent.

    Runs go to ``runtime`` as the calling principal; :meth:`drain` lets them
    finish (or cancels them) at shutdown.
    """

    def __init__(
        self,
        agents: Mapping[str, type[Agent]],
        *,
        runtime: SandboxRuntime | None,
        run_config: Mapping[str, Any] | None = None,
        agent_images: Mapping[str, str] | None = None,
        max_concurrent_runs: int = 4,
    ) -> None:
        self.runtime = runtime
        self._agents = dict(agents)
        self._configs: dict[str, dict[str, Any]] = {}
        self._tools: list[types.Tool] = []
        self._structured: set[str] = set()
        """Agents whose answer goes as structuredContent too (an object schema)."""
        images = dict(agent_images or {})
        unknown = sorted(set(images) - set(self._agents))
        if unknown:
            raise UsageError(
                f"--image names agent(s) {unknown} that the registry does not hold; "
                f"it holds: {', '.join(sorted(self._agents))}"
            )
        for name, agent in sorted(self._agents.items()):
            if not TOOL_NAME.match(name):
                raise UsageError(
                    f"agent name {name!r} cannot be an MCP tool name (letters, digits, "
                    "'_', '-' and '.', at most 128); rename it in the registry"
                )
            config = dict(run_config or {})
            if name in images:
                config["image"] = images[name]
            definition = definition_of(agent)
            resolved = resolve_agent_config(definition.config, config, where=f"{name}.config")
            if resolved.binding_scope == "conversation":
                # A tool call is one run; the agent's bindings live for that run.
                config["binding_scope"] = "turn"
            self._configs[name] = config
            output_schema = _object_schema(definition.output_json_schema)
            if output_schema is not None:
                self._structured.add(name)
            self._tools.append(
                types.Tool(
                    name=name,
                    description=definition.doc or f"The Legion agent {name}.",
                    input_schema=TASK_SCHEMA,
                    output_schema=output_schema,
                )
            )
        self.max_concurrent_runs = max_concurrent_runs
        self._active: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[RunResult]] = set()
        self._stopping = False

    @property
    def tools(self) -> list[types.Tool]:
        return list(self._tools)

    @property
    def runs_in_flight(self) -> int:
        return len(self._tasks)

    async def call(
        self, principal: Principal, name: str, arguments: Mapping[str, Any] | None
    ) -> types.CallToolResult:
        """Run agent ``name`` on ``arguments["task"]`` as ``principal``. A bad
        call is a protocol error (INVALID_PARAMS); a failed run is an
        ``isError`` result naming the error."""
        agent = self._agents.get(name)
        if agent is None:
            raise MCPError(
                types.INVALID_PARAMS,
                f"no agent named {name!r}; this server offers: {', '.join(sorted(self._agents))}",
            )
        try:
            jsonschema.validate(dict(arguments or {}), TASK_SCHEMA)
        except jsonschema.ValidationError as exc:
            raise MCPError(types.INVALID_PARAMS, f"{name}: {exc.message}") from None
        if self._stopping:
            return _error("the server is shutting down; no new runs")
        limit = principal.max_concurrent_runs or self.max_concurrent_runs
        if self._active[principal.name] >= limit:
            return _error(
                f"{principal.name} already has {self._active[principal.name]} runs in flight, "
                f"the most allowed (max_concurrent_runs={limit}); wait for one to finish"
            )
        task = self._launch(principal, agent, str((arguments or {})["task"]), name)
        log.info("mcp_run_requested", principal=principal.name, agent=name)
        try:
            result = await task
        except asyncio.CancelledError:
            if task.cancelled() and self._stopping:
                return _error("the server is shutting down; the run was cancelled")
            raise
        except LegionError as exc:
            log.info("mcp_run_finished", principal=principal.name, outcome=type(exc).__name__)
            first = (str(exc).strip().splitlines() or [""])[0]
            return _error(f"{type(exc).__name__}: {first}")
        finally:
            if not task.done():  # the client went away: the run (and its sandbox) goes too
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({task})
        log.info("mcp_run_finished", principal=principal.name, outcome="result")
        return self._result(name, result)

    def _launch(
        self, principal: Principal, agent: type[Agent], task: str, name: str
    ) -> asyncio.Task[RunResult]:
        context = contextvars.copy_context()
        context.run(_vault._overlay, principal.vault)
        config = self._configs[name]
        work = run_agent(agent, task, vault=principal.vault, runtime=self.runtime, **config)
        running = asyncio.create_task(work, context=context)
        self._active[principal.name] += 1
        self._tasks.add(running)

        def finished(_: asyncio.Task[RunResult]) -> None:
            self._active[principal.name] -= 1
            if not self._active[principal.name]:
                del self._active[principal.name]
            self._tasks.discard(running)

        running.add_done_callback(finished)
        return running

    def _result(self, name: str, result: RunResult) -> types.CallToolResult:
        output = result.output
        text = output if isinstance(output, str) else ("" if output is None else to_json(output))
        content: list[types.ContentBlock] = [types.TextContent(text=text)]
        for path, data in sorted(result.files.items()):
            mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
            content.append(
                types.EmbeddedResource(
                    resource=types.BlobResourceContents(
                        uri=f"legion://runs/{result.run_id}/out/{path}",
                        mime_type=mime,
                        blob=base64.b64encode(data).decode("ascii"),
                    )
                )
            )
        if result.files_note:
            content.append(types.TextContent(text=result.files_note))
        structured = json.loads(to_json(output)) if name in self._structured else None
        return types.CallToolResult(content=content, structured_content=structured)

    async def drain(self, grace: float) -> None:
        """Refuse new runs; let those in flight finish for up to ``grace``
        seconds, then cancel the rest and wait until they are gone."""
        self._stopping = True
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._tasks:
            log.info("mcp_runs_cancelled", count=len(self._tasks), reason="shutting down")
        for task in self._tasks:
            task.cancel()
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def server(self, principal_of: Callable[[Any], Principal | None]) -> Server[Any]:
        """An MCP server answering with these tools; ``principal_of(ctx)`` says
        whose call a request is (None refuses it)."""

        async def list_tools(
            ctx: Any, params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            return types.ListToolsResult(tools=self.tools)

        async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            principal = principal_of(ctx)
            if principal is None:  # the HTTP front door lets no such request through
                raise MCPError(types.INVALID_REQUEST, "no principal for this call")
            return await self.call(principal, params.name, params.arguments)

        return Server(
            SERVER_NAME,
            description="Legion agents: each tool hands a task to a sandboxed agent",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
        )


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


# --- HTTP: the bearer-token front door ---------------------------------------------------


class BearerFrontDoor:
    """ASGI middleware: maps each HTTP request's bearer token to a principal
    (``LOCAL`` without an authenticator) and refuses the request with 401 when
    there is none; the principal rides in the ASGI scope to the tool handler."""

    def __init__(self, app: Any, authenticator: Authenticator | None) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        principal, problem = await self._principal(scope)
        if principal is None:
            log.warning("mcp_call_refused", path=scope.get("path"), reason=problem)
            body = to_json({"error": "invalid_token", "error_description": problem}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer error="invalid_token"'),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    async def _principal(self, scope: Any) -> tuple[Principal | None, str]:
        if self.authenticator is None:
            return LOCAL, ""
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if len(values) != 1:
            return None, (
                "no token: send the header 'Authorization: Bearer <token>'"
                if not values
                else "more than one authorization header"
            )
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "the authorization header must read 'Bearer <token>'"
        try:
            principal = await self.authenticator.authenticate(token.strip())
        except Exception as exc:
            log.error("authenticator_failed", error=repr(exc))
            return None, "authentication failed on the server; its log says why"
        return principal, "" if principal is not None else "unknown token"


def _http_principal(ctx: Any) -> Principal | None:
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None)
    found = scope.get(PRINCIPAL_SCOPE_KEY) if isinstance(scope, dict) else None
    return found if isinstance(found, Principal) else None


class _Uvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: ``serve_mcp`` owns SIGTERM and
    SIGINT (uvicorn would re-raise them after shutdown, killing the process
    before the runtime removes its containers)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _bind(address: str) -> socket.socket:
    host, port = _split(address, "--http")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket, address: str, *, tls: bool) -> str:
    host, _ = _split(address, "--http")
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}{MCP_PATH}"


def _tls_options(settings: MCPSettings) -> dict[str, Any]:
    """Uvicorn's TLS settings, after loading the files once here (a bad file
    is a usage error at start, not a failure inside the web server)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return {}
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(cafile=settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load a TLS file: {exc}") from None
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert),
        "ssl_keyfile": str(settings.tls_key),
    }
    if settings.tls_client_ca is not None:
        options["ssl_ca_certs"] = str(settings.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


# --- serving -----------------------------------------------------------------------------


async def serve_mcp(
    agents: Mapping[str, type[Agent]],
    settings: MCPSettings,
    *,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve ``agents`` as MCP tools until SIGTERM or SIGINT (or, over stdio,
    until the client closes stdin); then drain and remove every container.
    ``on_listening`` gets the HTTP URL (or ``"stdio"``)."""
    stdio_principal = LOCAL
    if settings.http is None and settings.authenticator is not None:
        if not settings.token:
            raise UsageError(
                "with a token table, stdio serves one principal: give --token "
                "(or LEGION_SERVER_TOKEN) naming whose runs these are"
            )
        found = await settings.authenticator.authenticate(settings.token)
        if found is None:
            raise UsageError("--token is not in the token table (unknown token)")
        stdio_principal = found
    tls = _tls_options(settings)
    sock = _bind(settings.http) if settings.http is not None else None
    runtime = SandboxRuntime(pool_size=settings.pool_size, image=settings.image)
    tools: AgentTools | None = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        tools = AgentTools(
            agents,
            runtime=runtime,
            run_config=settings.run_config,
            agent_images=settings.agent_images,
            max_concurrent_runs=settings.max_concurrent_runs,
        )
        await runtime.start()
        if sock is not None and settings.http is not None:
            await _serve_http(tools, settings, sock, stop, on_listening, tls=tls)
        else:
            await _serve_stdio(tools, settings, stdio_principal, stop, on_listening)
    finally:
        with contextlib.suppress(Exception):
            for signum in signals:
                loop.remove_signal_handler(signum)
        if sock is not None:
            sock.close()
        await runtime.aclose()
        await close_all_sessions()  # the agents' own MCP servers (their stdio processes)
        log.info("mcp_stopped")


async def _serve_stdio(
    tools: AgentTools,
    settings: MCPSettings,
    principal: Principal,
    stop: asyncio.Event,
    on_listening: Callable[[str], None] | None,
) -> None:
    server = tools.server(lambda _ctx: principal)
    async with _stdio_wire() as (streams, end_input), stdio_server(*streams) as (read, write):
        serving = asyncio.ensure_future(
            server.run(read, write, server.create_initialization_options())
        )
        stopping = asyncio.ensure_future(stop.wait())
        if on_listening is not None:
            on_listening("stdio")
        log.info("mcp_serving", transport="stdio", principal=principal.name, pid=os.getpid())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        # A signal: runs get their grace. The client closed stdin: nobody waits
        # for their answers any more.
        await tools.drain(settings.grace_seconds if stop.is_set() else 0)
        stopping.cancel()
        if not serving.done():  # a signal: end the input as a client closing stdin would
            end_input()
            await asyncio.wait({serving}, timeout=5)
        serving.cancel()
        await asyncio.wait({serving, stopping})
        if not serving.cancelled() and serving.exception() is not None:
            log.error("mcp_stdio_failed", error=repr(serving.exception()))


class _PipeLines:
    """The client's lines, read on the event loop: a signal can stop the
    server at once (the SDK's own stdin reader is a thread blocked in read(),
    which nothing interrupts until the client writes or closes)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _PipeLines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class _PipeWriter:
    """What the SDK's stdout writer needs: ``write`` and ``flush``, on the loop."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


MAX_LINE = 64 * 1024 * 1024
"""The longest message line read from the client."""


@contextlib.asynccontextmanager
async def _stdio_wire() -> AsyncIterator[tuple[tuple[Any, Any], Callable[[], None]]]:
    """The process's stdin and stdout as streams for ``stdio_server``, with fd 0
    on the null device and fd 1 on stderr meanwhile (stray output from
    libraries or children must not reach the wire), and a function that ends
    the input. ``(None, None)`` (the SDK's own streams) when stdin is not a
    pipe, socket or terminal; the input then ends only with the client's."""
    loop = asyncio.get_running_loop()
    saved = os.dup(0), os.dup(1)
    wire_in, wire_out = os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "wb", 0)
    reader = asyncio.StreamReader(limit=MAX_LINE)
    try:
        read_pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), wire_in
        )
        write_pipe, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, wire_out
        )
    except (ValueError, OSError):  # e.g. stdin redirected from a regular file
        wire_in.close()
        wire_out.close()
        for fd in saved:
            os.close(fd)
        yield (None, None), lambda: None
        return
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    writer = asyncio.StreamWriter(write_pipe, protocol, None, loop)
    try:
        yield (_PipeLines(reader), _PipeWriter(writer)), reader.feed_eof
    finally:
        read_pipe.close()
        write_pipe.close()
        for fd, saved_fd in enumerate(saved):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


async def _serve_http(
    tools: AgentTools,
    settings: MCPSettings,
    sock: socket.socket,
    stop: asyncio.Event,
    on_listening: Callable[[str], None] | None,
    *,
    tls: dict[str, Any],
) -> None:
    assert settings.http is not None
    host, _ = _split(settings.http, "--http")
    security = None
    if not is_loopback_host(host):  # tokens guard it; the Host header is the client's business
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    server = tools.server(_http_principal)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        host=host if host != "localhost" else "127.0.0.1",
        transport_security=security,
    )
    config = uvicorn.Config(
        BearerFrontDoor(app, settings.authenticator),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        **tls,
    )
    web = _Uvicorn(config)
    serving = asyncio.ensure_future(web.serve(sockets=[sock]))
    ready = asyncio.ensure_future(web.ready.wait())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if serving.done() or not web.started:
        web.should_exit = True
        await serving  # raises what stopped it, if anything did
        raise UsageError(f"cannot serve MCP on {settings.http}: the web server did not start")
    url = _url(sock, settings.http, tls=bool(tls))
    log.info(
        "mcp_serving",
        transport="http",
        url=url,
        tokens=settings.authenticator is not None,
        pid=os.getpid(),
    )
    if on_listening is not None:
        on_listening(url)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    await tools.drain(settings.grace_seconds)
    web.should_exit = True
    stopping.cancel()
    await asyncio.wait({serving, stopping})
