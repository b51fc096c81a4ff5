"""Who is calling: bearer tokens, principals, and the interceptor that checks them.

Every call carries ``authorization: Bearer <token>`` metadata. An
:class:`Authenticator` maps the token to a :class:`Principal`: a name (runs and
events belong to it), the vault values its runs get, and its limit on
concurrent runs. :class:`TokenTable` is the default authenticator: a fixed
table, read from a file and/or the ``LEGION_TOKENS`` environment variable.

A token file maps each token to its principal (TOML or JSON)::

    ["a-long-random-token"]
    name = "alice"
    max_concurrent_runs = 2
    vault = { user = "alice" }
    max_tokens_per_day = 200000      # budgets, across all of alice's runs
    max_cost_usd_per_day = 5.0
    max_sandboxes = 4
    max_sandbox_memory_mb = 2048

    ["another-token"]
    name = "bob"

``LEGION_TOKENS`` holds ``name=token`` pairs separated by commas
(``alice=TOKEN_A,bob=TOKEN_B``), or the same JSON object as a file.

Only SHA-256 digests of the tokens are kept in memory; the presented token's
digest is compared with each of them in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import grpc
import grpc.aio

from .._budget import PRINCIPAL_LIMITS as PRINCIPAL_BUDGETS
from .._log import get_logger
from ..errors import UsageError

__all__ = [
    "LOCAL",
    "AuthInterceptor",
    "Authenticator",
    "Principal",
    "TokenTable",
    "current_principal",
]

log = get_logger("legion.server.auth")

TOKENS_ENV = "LEGION_TOKENS"
PUBLIC_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
)
"""Methods answered without a token: load balancers probe health anonymously."""


@dataclass(frozen=True)
class Principal:
    """Someone the server knows. Runs, events and human requests belong to a
    principal by ``name``; its ``vault`` values are bound around its runs
    (tools read them; they never reach a sandbox or a client)."""

    name: str
    vault: Mapping[str, Any] = field(default_factory=dict, repr=False)
    max_concurrent_runs: int | None = None
    """Runs it may have in flight at once; None: the server's default."""
    max_tokens_per_day: int | None = None
    """Budget: model tokens its runs may spend per UTC day (None: no limit)."""
    max_cost_usd_per_day: float | None = None
    """Budget: USD of model requests its runs may spend per UTC day."""
    max_sandboxes: int | None = None
    """Budget: sandboxes its runs may hold at once (sub-agents' included)."""
    max_sandbox_memory_mb: int | None = None
    """Budget: the memory caps of its live sandboxes, added up, in MiB."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise UsageError(f"a principal needs a non-empty name, got {self.name!r}")
        if not isinstance(self.vault, Mapping):
            raise UsageError(f"principal {self.name!r}: vault must be a table of values")
        limit = self.max_concurrent_runs
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise UsageError(f"principal {self.name!r}: max_concurrent_runs must be a whole number")
        if limit is not None and limit < 1:
            raise UsageError(f"principal {self.name!r}: max_concurrent_runs must be at least 1")
        for key in PRINCIPAL_BUDGETS:
            value = getattr(self, key)
            whole = key != "max_cost_usd_per_day"
            kinds = (int,) if whole else (int, float)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, kinds)
                or not math.isfinite(value)
                or value < 0
            ):
                kind = "a whole number" if whole else "a number"
                raise UsageError(f"principal {self.name!r}: {key} must be {kind} >= 0")
        object.__setattr__(self, "vault", MappingProxyType(dict(self.vault)))

    @property
    def budgets(self) -> dict[str, float | None]:
        """Its budgets by name (the token file's keys); None: no limit."""
        return {key: getattr(self, key) for key in PRINCIPAL_BUDGETS}


LOCAL = Principal("local")
"""Every caller, when the server runs without tokens (loopback or a Unix socket only)."""


@runtime_checkable
class Authenticator(Protocol):
    """Maps a bearer token to a principal; None refuses it (UNAUTHENTICATED)."""

    async def authenticate(self, token: str) -> Principal | None: ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """An :class:`Authenticator` over a fixed table of tokens.

    ``TokenTable({"a-long-random-token": Principal("alice", vault={"user": "alice"})})``
    """

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        entries: list[tuple[bytes, Principal]] = []
        for token, principal in tokens.items():
            _check_token(token)
            if not isinstance(principal, Principal):
                raise UsageError(f"token table entries must be Principals, got {principal!r}")
            entries.append((_digest(token), principal))
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def principals(self) -> list[str]:
        """The names of the principals in the table, sorted."""
        return sorted({p.name for _, p in self._entries})

    async def authenticate(self, token: str) -> Principal | None:
        digest = _digest(token)
        found = None
        for known, principal in self._entries:  # no early exit: same work for any token
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        """Read a TOML (``.toml``) or JSON token file:
        ``{token: {name, vault, max_concurrent_runs, max_tokens_per_day,
        max_cost_usd_per_day, max_sandboxes, max_sandbox_memory_mb}}`` (or
        ``{token: name}``)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, ValueError) as exc:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise UsageError(f"the token file {path} is not valid {kind}: {exc}") from None
        return cls(_parse_table(data, str(path)))

    @classmethod
    def from_env(cls, value: str) -> TokenTable:
        """Parse ``LEGION_TOKENS``: ``name=token,name=token`` or a JSON object like a file."""
        value = value.strip()
        if value.startswith("{"):
            try:
                data = json.loads(value)
            except ValueError as exc:
                raise UsageError(f"{TOKENS_ENV} is not valid JSON: {exc}") from None
            return cls(_parse_table(data, TOKENS_ENV))
        tokens: dict[str, Principal] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, sep, token = pair.partition("=")
            if not sep or not name.strip() or not token.strip():
                raise UsageError(
                    f"{TOKENS_ENV} holds name=token pairs separated by commas, "
                    f"e.g. alice=TOKEN_A,bob=TOKEN_B; cannot read {pair.split('=')[0]!r}..."
                )
            _add(tokens, token.strip(), Principal(name.strip()), TOKENS_ENV)
        return cls(tokens)

    @classmethod
    def load(
        cls, file: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> TokenTable | None:
        """The table from ``file`` and ``LEGION_TOKENS`` together; None when neither
        names a token (the server then serves loopback or a Unix socket only)."""
        environ = os.environ if environ is None else environ
        tables = [cls.from_file(file)] if file is not None else []
        if environ.get(TOKENS_ENV, "").strip():
            tables.append(cls.from_env(environ[TOKENS_ENV]))
        merged = {digest: principal for table in tables for digest, principal in table._entries}
        if not merged:
            return None
        table = cls({})
        table._entries = tuple(merged.items())
        return table


def _check_token(token: Any) -> None:
    if not isinstance(token, str) or not token or token != token.strip() or " " in token:
        raise UsageError("a token must be a non-empty string without spaces")


def _add(tokens: dict[str, Principal], token: str, principal: Principal, where: str) -> None:
    _check_token(token)
    if token in tokens:
        raise UsageError(f"{where}: the same token is given twice")
    tokens[token] = principal


_ENTRY_KEYS = {"name", "vault", "max_concurrent_runs", *PRINCIPAL_BUDGETS}


def _parse_table(data: Any, where: str) -> dict[str, Principal]:
    if not isinstance(data, dict):
        raise UsageError(f"{where} must map each token to its principal")
    tokens: dict[str, Principal] = {}
    for token, value in data.items():
        entry = {"name": value} if isinstance(value, str) else value
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: each token maps to a name or a table with a name")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise UsageError(
                f"{where}: unknown key(s) {unknown} for a principal; use {sorted(_ENTRY_KEYS)}"
            )
        if "name" not in entry:
            raise UsageError(f"{where}: every token's entry needs a name")
        principal = Principal(
            entry["name"],
            vault=entry.get("vault") or {},
            max_concurrent_runs=entry.get("max_concurrent_runs"),
            **{key: entry.get(key) for key in PRINCIPAL_BUDGETS},
        )
        _add(tokens, token, principal, where)
    return tokens


# --- the interceptor --------------------------------------------------------

_principal: ContextVar[Principal | None] = ContextVar("legion_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the call being served (set by :class:`AuthInterceptor`)."""
    return _principal.get()


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes are not the method's message."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that hands a :class:`Malformed` to the handler instead of
    failing inside gRPC (which would answer INTERNAL, not INVALID_ARGUMENT)."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str]:
    """The token, or None and why."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return None, "no token: send the metadata 'authorization: Bearer <token>'"
    if len(values) > 1:
        return None, "more than one authorization header"
    value = values[0]
    if isinstance(value, bytes):
        return None, "the authorization header must be text"
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "the authorization header must read 'Bearer <token>'"
    return token.strip(), ""


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks every call's bearer token and serves it as its principal.

    With ``authenticator=None`` (no tokens configured) every caller is
    :data:`LOCAL`. Health checks need no token. Every handler also gets
    tolerant request parsing: bytes that are not the method's message reach
    the handler as :class:`Malformed`, to be answered INVALID_ARGUMENT.
    """

    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in PUBLIC_METHODS:
            return handler
        if self.authenticator is None:
            return _serve_as(handler, LOCAL)
        token, problem = _bearer(handler_call_details.invocation_metadata)
        principal = None
        if token is not None:
            try:
                principal = await self.authenticator.authenticate(token)
            except Exception as exc:
                log.error("authenticator_failed", method=method, error=repr(exc))
                return _refuse(
                    handler,
                    grpc.StatusCode.INTERNAL,
                    "authentication failed on the server; its log says why",
                )
            problem = "unknown token"
        if principal is None:
            log.warning("call_refused", method=method, reason=problem)
            return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
        return _serve_as(handler, principal)


def _rebuild(handler: Any, unary: Callable[..., Any], stream: Callable[..., Any]) -> Any:
    """A handler of the same kind as ``handler`` whose behaviour is ``unary``
    (unary responses) or ``stream`` (streamed responses)."""
    deserialize = (
        handler.request_deserializer
        if handler.request_streaming
        else _tolerant(handler.request_deserializer)
    )
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=deserialize, response_serializer=serialize
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            unary, request_deserializer=deserialize, response_serializer=serialize
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=deserialize, response_serializer=serialize
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=deserialize, response_serializer=serialize
    )


def _behaviour(handler: Any) -> Callable[..., Any]:
    behaviour: Callable[..., Any] = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return behaviour


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {request.error}"
        )


def _serve_as(handler: Any, principal: Principal) -> Any:
    behaviour = _behaviour(handler)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _reject_malformed(request, context)
        # Each call is served in a task of its own: the value dies with it.
        _principal.set(principal)
        return await behaviour(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _reject_malformed(request, context)
        _principal.set(principal)
        result = behaviour(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:  # a handler that writes with context.write()
            await result

    return _rebuild(handler, unary, stream)


def _refuse(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return _rebuild(handler, unary, stream)
