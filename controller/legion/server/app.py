"""``legion serve``: a registry of agents behind the controller's gRPC API.

One process owns one :class:`legion.SandboxRuntime` (its warm pool is shared
by every run), serves the Controller service, gRPC health checking and
reflection, and shuts down gracefully on SIGTERM or SIGINT: it stops
accepting calls, lets runs in flight finish for ``grace_seconds``, cancels
the rest, and removes every container before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health as _health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from .._log import get_logger
from .._mcp_client import close_all_sessions
from .._net import is_loopback_host
from .._proto import controller_pb2_grpc as pb_grpc
from ..agent import Agent, definition_of
from ..config import MiB
from ..errors import UsageError
from ..sandbox import SandboxRuntime
from ..store import SQLiteStore
from .auth import Authenticator, AuthInterceptor
from .service import SERVICE_NAME, ControllerService

if TYPE_CHECKING:
    from ..dashboard import Dashboard

__all__ = ["ControllerServer", "ServerSettings", "check_dashboard", "check_listen", "load_registry"]

log = get_logger("legion.server")

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How ``legion serve`` listens and whom it lets in."""

    listen: str = DEFAULT_LISTEN
    """``HOST:PORT`` (port 0 picks a free one) or ``unix:/path``."""
    authenticator: Authenticator | None = None
    """Maps bearer tokens to principals. None: no tokens, and then only a
    loopback address or a Unix socket is allowed."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with ``tls_key``, calls need TLS."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed."""
    max_message_bytes: int = 4 * MiB
    """Largest request accepted; bigger ones get RESOURCE_EXHAUSTED."""
    grace_seconds: float = 10.0
    """On shutdown, how long runs in flight may take to finish before they are cancelled."""
    max_concurrent_runs: int = 4
    """Runs one principal may have in flight (unless its entry says otherwise)."""
    run_config: Mapping[str, Any] = field(default_factory=dict)
    """AgentConfig keys for every run, over the agents' own config."""
    pool_size: int | None = None
    """Warm sandboxes kept ready (None: ``LEGION_POOL_SIZE``, or 2)."""
    image: str | None = None
    """The runtime's image (``--image data``): agents whose config names none
    run there, and the warm pool holds it. None: ``LEGION_IMAGE``, else the
    runner's own (the standard library only)."""
    agent_images: Mapping[str, str] = field(default_factory=dict)
    """Agent name -> its image (``--image Analyst=data``), over the agent's
    own config. Such sandboxes start cold unless the image is the runtime's."""
    store: Path | None = None
    """SQLite file for long-lived agents' conversations (history and binding
    snapshots survive a restart); None keeps them in memory."""
    dashboard: str | None = None
    """``HOST:PORT`` of the web dashboard (port 0 picks a free one); None: no
    dashboard. Like ``listen``, only a loopback host without tokens; HTTPS
    (with the same client certificates) when TLS is on."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UsageError("--tls-client-ca needs TLS on: give --tls-cert and --tls-key too")
        if self.max_message_bytes < 64 * 1024:
            raise UsageError("max_message_bytes must be at least 65536")
        if self.grace_seconds < 0:
            raise UsageError("grace_seconds must be >= 0")
        if self.max_concurrent_runs < 1:
            raise UsageError("max_concurrent_runs must be at least 1")
        if self.pool_size is not None and self.pool_size < 0:
            raise UsageError("pool_size must be 0 (cold starts) or more")


# --- the registry ----------------------------------------------------------------------


def load_registry(spec: str) -> dict[str, type[Agent]]:
    """Import ``package.module:attribute``: a dict ``{name: AgentClass}``, a
    list or tuple of agent classes (named by class name), or a callable
    returning either. Raises :class:`legion.UsageError` saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"name the registry as package.module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules of the current directory
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    try:
        registry: Any = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name} has no attribute {attr!r}") from None
    agents: dict[str, type[Agent]] = {}
    for name, agent in _entries(spec, registry):
        if not isinstance(name, str) or not name:
            raise UsageError(f"{spec}: agent names must be non-empty strings, got {name!r}")
        if not (isinstance(agent, type) and issubclass(agent, Agent)):
            raise UsageError(f"{spec}: {name!r} is {agent!r}, not a legion.Agent subclass")
        try:
            definition_of(agent)
        except UsageError as exc:
            raise UsageError(f"{spec}: {name!r}: {exc}") from None
        if name in agents:
            raise UsageError(f"{spec}: two agents are named {name!r}")
        agents[name] = agent
    if not agents:
        raise UsageError(f"{spec} holds no agents")
    return agents


def _entries(spec: str, registry: Any) -> list[tuple[Any, Any]]:
    if callable(registry) and not isinstance(registry, type):
        try:
            registry = registry()
        except Exception as exc:
            raise UsageError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
    if isinstance(registry, type):
        registry = [registry]
    if isinstance(registry, Mapping):
        return list(registry.items())
    if isinstance(registry, (list, tuple)):
        return [(getattr(a, "__name__", repr(a)), a) for a in registry]
    raise UsageError(
        f"{spec} is a {type(registry).__name__}; it must be a dict {{name: AgentClass}}, "
        "a list of Agent classes, or a function returning one"
    )


# --- where to listen ---------------------------------------------------------------------


def _split(listen: str, option: str = "--listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        example = "127.0.0.1:50051" if option == "--listen" else "127.0.0.1:8080"
        alternative = " or unix:/path" if option == "--listen" else ""
        raise UsageError(
            f"{option} takes HOST:PORT (e.g. {example}; port 0 picks a free one)"
            f"{alternative}, got {listen!r}"
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(listen: str) -> bool:
    if listen.startswith("unix:"):
        return True
    host, _ = _split(listen)
    return is_loopback_host(host)


def check_listen(listen: str, *, authenticated: bool) -> None:
    """Refuse an address other than loopback or a Unix socket without tokens."""
    if listen.startswith("unix:"):
        if not listen.removeprefix("unix:").lstrip("/"):
            raise UsageError("--listen unix: needs a path, e.g. unix:/run/legion/api.sock")
        return
    _split(listen)
    if not authenticated and not is_loopback(listen):
        raise UsageError(
            f"refusing to listen on {listen} without tokens: anyone who can reach it could run "
            "agents. Configure tokens (--tokens FILE or LEGION_TOKENS), or listen on a "
            "loopback address (127.0.0.1:PORT) or a Unix socket (unix:/path)"
        )


def check_loopback_or_tokens(
    address: str, *, option: str, what: str, could: str, authenticated: bool
) -> None:
    """Refuse an HTTP address (``option``'s value) other than loopback when
    no tokens are configured: anyone who can reach ``what`` ``could`` do so."""
    host, _ = _split(address, option)
    if not authenticated and not is_loopback_host(host):
        raise UsageError(
            f"refusing to serve {what} on {address} without tokens: anyone who can reach it "
            f"{could}. Configure tokens (--tokens FILE or LEGION_TOKENS), or use a loopback "
            "address (127.0.0.1:PORT)"
        )


def check_dashboard(address: str, *, authenticated: bool) -> None:
    """Refuse a dashboard address other than loopback without tokens."""
    check_loopback_or_tokens(
        address,
        option="--dashboard",
        what="the dashboard",
        could="could run agents and answer their questions",
        authenticated=authenticated,
    )


# --- the server ----------------------------------------------------------------------------


class ControllerServer:
    """The Controller service, health and reflection on one grpc.aio server.

    ``async with ControllerServer(agents, settings) as server: ...`` starts it
    (``server.address`` is where it listens) and shuts it down gracefully.
    Without ``runtime`` it starts a :class:`legion.SandboxRuntime` of its own
    and closes it (removing every container) when it stops.
    """

    def __init__(
        self,
        agents: Mapping[str, type[Agent]],
        settings: ServerSettings | None = None,
        *,
        runtime: SandboxRuntime | None = None,
    ) -> None:
        self.settings = settings or ServerSettings()
        authenticated = self.settings.authenticator is not None
        check_listen(self.settings.listen, authenticated=authenticated)
        if self.settings.dashboard is not None:
            check_dashboard(self.settings.dashboard, authenticated=authenticated)
        if runtime is not None and self.settings.image is not None:
            raise UsageError(
                "ServerSettings.image sets the image of the server's own runtime; "
                "with runtime= given, give that runtime the image instead"
            )
        self._owns_runtime = runtime is None
        self.runtime = runtime
        self._agents = agents
        self.service: ControllerService | None = None
        self.address = ""
        self._server: Any = None
        self._health: Any = None
        self._stopped = asyncio.Event()
        self._store: SQLiteStore | None = None
        self.dashboard: Dashboard | None = None
        self.dashboard_url = ""
        """Where the dashboard answers (``http://HOST:PORT``), once started."""
        self._private_dir: Path | None = None

    async def start(self) -> str:
        """Start the runtime and serve; returns the address bound."""
        s = self.settings
        if self.runtime is None:
            self.runtime = SandboxRuntime(pool_size=s.pool_size, image=s.image)
        await self.runtime.start()
        self._store = SQLiteStore(s.store) if s.store is not None else None
        self.service = ControllerService(
            self._agents,
            runtime=self.runtime,
            run_config=s.run_config,
            max_concurrent_runs=s.max_concurrent_runs,
            store=self._store,
            images=s.agent_images,
        )
        await self.service.start()
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(s.authenticator)],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_ControllerServicer_to_server(self.service, server)  # type: ignore[no-untyped-call]
        self._health = _health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, _health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = self._bind(server)
            private = self._bind_private(server) if s.dashboard is not None else ""
        except RuntimeError as exc:
            await self._close_runtime()
            raise UsageError(f"cannot listen on {s.listen}: {exc}") from None
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if s.listen.startswith("unix:"):
            self.address = s.listen
        else:
            host, _ = _split(s.listen)
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info(
            "server_listening",
            address=self.address,
            tls=s.tls_cert is not None,
            client_certs=s.tls_client_ca is not None,
            tokens=s.authenticator is not None,
            agents=sorted(self._agents),
        )
        if s.dashboard is not None:
            await self._start_dashboard(s.dashboard, private)
        return self.address

    def _bind_private(self, server: Any) -> str:
        """A Unix socket only this user can reach, for the dashboard's clients: the
        same service and interceptor as the public address, without its TLS (whose
        client certificates the dashboard could not present)."""
        self._private_dir = Path(tempfile.mkdtemp(prefix="legion-api-"))  # mode 0700
        address = f"unix:{self._private_dir / 'api.sock'}"
        server.add_insecure_port(address)
        return address

    async def _start_dashboard(self, listen: str, api_address: str) -> None:
        from ..dashboard import Dashboard  # noqa: PLC0415 - aiohttp only when asked for

        host, port = _split(listen, "--dashboard")
        try:
            dashboard = Dashboard(
                api_address=api_address,
                sign_in=self.settings.authenticator is not None,
                host=host,
                port=port,
                ssl_context=self._dashboard_tls(),
            )
            self.dashboard_url = await dashboard.start()
        except OSError as exc:  # the port is taken, or a TLS file will not load
            await self.stop(grace=0)
            raise UsageError(f"cannot serve the dashboard on {listen}: {exc}") from None
        self.dashboard = dashboard

    def _dashboard_tls(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=s.tls_client_ca)
        return context

    def _bind(self, server: Any) -> int:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return int(server.add_insecure_port(s.listen))
        try:
            key, cert = s.tls_key.read_bytes(), s.tls_cert.read_bytes()
            client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        except OSError as exc:
            raise UsageError(f"cannot read a TLS file: {exc}") from None
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return int(server.add_secure_port(s.listen, credentials))

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let runs finish for ``grace`` seconds (default:
        the settings'), cancel the rest, remove every container."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_seconds if grace is None else grace
        log.info(
            "server_stopping", runs_in_flight=self.service.runs_in_flight if self.service else 0
        )
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.begin_shutdown()
        stopping = None
        if self._server is not None:
            # No new calls from here on; those in flight get grace (and a
            # little more, for streams to send their final status).
            stopping = asyncio.ensure_future(self._server.stop(grace + 5.0))
        if self.service is not None:
            await self.service.drain(grace)
        if self.dashboard is not None:  # after the drain: its chats are runs in flight too
            await self.dashboard.close()
        if self.service is not None:
            await self.service.aclose()
        if stopping is not None:
            await stopping
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        await self._close_runtime()
        await close_all_sessions()  # the MCP servers' sessions (their stdio processes)
        if self._store is not None:
            self._store.close()
        self._stopped.set()
        log.info("server_stopped")

    async def _close_runtime(self) -> None:
        if self._owns_runtime and self.runtime is not None:
            await self.runtime.aclose()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> ControllerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(
    agents: Mapping[str, type[Agent]],
    settings: ServerSettings,
    *,
    on_listening: Callable[[str], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. ``on_dashboard``
    gets the dashboard's URL (before ``on_listening`` gets the API's address)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    server = ControllerServer(agents, settings)
    try:
        address = await server.start()
        if on_dashboard is not None and server.dashboard_url:
            on_dashboard(server.dashboard_url)
        if on_listening is not None:
            on_listening(address)
        await stop.wait()
        log.info("signal_received")
    finally:
        with contextlib.suppress(Exception):
            for signum in signals:
                loop.remove_signal_handler(signum)
        await server.stop()
