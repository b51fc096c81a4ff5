"""A client of a running controller (``legion serve``), with the embedded SDK's shapes.

    async with legion.Client("127.0.0.1:50051", token="...") as client:
        result = await client.run("Accountant", "What is my balance?")
        print(result.output, result.usage.requests)

        async with client.events() as events:      # subscribed once entered
            async for event in events:
                if event.name == legion.telemetry.HUMAN_REQUEST:
                    await client.respond_human(event.data["ref"], "yes")
                elif event.name == legion.telemetry.TOOL_APPROVAL:
                    await client.respond_approval(event.data["ref"], approved=True)

Results come back as :class:`legion.RunResult`, events as
:class:`legion.telemetry.Event` (a :class:`RemoteEvent`, which adds
``conversation_id``). Failures raise the same exceptions as embedded runs:
``MaxIterationsReached``, ``MaxRetriesReached``, ``ModelError``, the
``SandboxError`` kinds (carrying ``run_id``, ``iterations``, ``usage`` and
``messages``), :class:`legion.UsageError` for input the server found invalid,
and the :class:`legion.RemoteError` kinds for the rest (``NotFound``,
``Unauthenticated``, ``PermissionDenied``, ``ResourceExhausted``,
``Unavailable``). gRPC errors are translated here, once.

:class:`SyncClient` offers the same methods to code without an event loop.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from . import errors
from ._api_codec import (
    AgentInfo,
    RemoteEvent,
    SandboxInfo,
    agent_info,
    answer_json,
    approval_message,
    config_json,
    file_messages,
    remote_event,
    run_error,
    run_result,
    sandbox_info,
)
from ._proto import controller_pb2 as pb
from ._proto import controller_pb2_grpc as pb_grpc
from ._results import RunResult
from .config import MiB
from .errors import LegionError, RemoteError, UsageError
from .telemetry import Event

__all__ = [
    "AgentInfo",
    "Client",
    "EventStream",
    "RemoteEvent",
    "SandboxInfo",
    "SyncClient",
    "remote_event",
    "run_error",
    "run_result",
    "translate_status",
]

EventHandler = Callable[[Event], Awaitable[None] | None]


# --- translation, once ---------------------------------------------------------------------

_STATUS_ERRORS: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


class _RemoteConversationError(RemoteError, errors.ConversationError):
    """A long-lived agent on the server cannot take the request: both a
    :class:`legion.ConversationError` (as embedded) and a RemoteError."""


def translate_status(code: grpc.StatusCode, details: str | None) -> LegionError:
    """The legion exception for a gRPC status."""
    message = details or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _RemoteConversationError(message, code=code.name)
    return _STATUS_ERRORS.get(code, RemoteError)(message, code=code.name)


def _translate(exc: grpc.aio.AioRpcError) -> LegionError:
    return translate_status(exc.code(), exc.details())


def _read(source: bytes | str | Path | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


# --- the client ---------------------------------------------------------------------------------


class Client:
    """An async client of a Legion controller.

    ``address`` is ``HOST:PORT`` or ``unix:/path``. ``token`` is sent as
    ``authorization: Bearer <token>``. TLS is on when ``tls=True`` or any
    certificate is given: ``root_certificates`` (PEM: the CA that signed the
    server's certificate; None: the system's), and ``certificate_chain`` with
    ``private_key`` for servers that require client certificates. Certificates
    may be bytes or file paths. ``max_message_bytes`` caps what the client
    receives (a long run's history can be large).

    Use it with ``async with``, or call :meth:`close` when done. The channel
    opens on first use, on the running loop.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 64 * MiB,
    ) -> None:
        if (certificate_chain is None) != (private_key is None):
            raise UsageError("a client certificate needs its key: give both, or neither")
        self.address = address
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._tls = tls or any(
            x is not None for x in (root_certificates, certificate_chain, private_key)
        )
        self._root, self._chain, self._key = (
            _read(root_certificates),
            _read(certificate_chain),
            _read(private_key),
        )
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channel: Any = None
        self._stub: Any = None

    @property
    def stub(self) -> Any:
        """The generated ``ControllerStub`` (for calls this class does not wrap)."""
        if self._stub is None:
            if self._tls:
                credentials = grpc.ssl_channel_credentials(self._root, self._key, self._chain)
                self._channel = grpc.aio.secure_channel(self.address, credentials, self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, self._options)
            self._stub = pb_grpc.ControllerStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def list_agents(self) -> list[AgentInfo]:
        """The agents the server offers."""
        response = await self._unary("ListAgents", pb.ListAgentsRequest())
        return [agent_info(a) for a in response.agents]

    async def principal(self) -> str:
        """The name of the principal the server maps this client's token to
        (``local`` on a server without tokens). Raises Unauthenticated for a
        token the server does not know."""
        response = await self._unary("ListAgents", pb.ListAgentsRequest())
        return str(response.principal)

    async def run(
        self,
        agent: str,
        task: str,
        *,
        on_event: EventHandler | None = None,
        files: Mapping[str, bytes | str] | None = None,
        **config: Any,
    ) -> RunResult:
        """Run the server's agent named ``agent`` on ``task``; ``config`` holds
        AgentConfig keys for this run (those a client may set, e.g.
        ``max_iterations``). ``on_event`` (sync or async) receives each of the
        run's events as it happens. ``files`` go into the run's work
        directory, as with :func:`legion.run`; what the code leaves in
        ``/data/out`` is :attr:`RunResult.files`. Cancelling this call cancels
        the run."""
        request = pb.RunRequest(
            agent=agent, task=task, config_json=config_json(config), files=file_messages(files)
        )
        return await self._updates(self.stub.Run(request, metadata=self._metadata), on_event)

    async def _updates(self, call: Any, on_event: EventHandler | None) -> RunResult:
        try:
            async for update in call:
                kind = update.WhichOneof("kind")
                if kind == "event":
                    if on_event is not None:
                        handled = on_event(remote_event(update.event))
                        if inspect.isawaitable(handled):
                            await handled
                elif kind == "result":
                    return run_result(update.result)
                elif kind == "error":
                    raise run_error(update.error)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended; else the run is cancelled
        raise RemoteError("the server ended the run's stream without a result", code="UNKNOWN")

    # long-lived agents -----------------------------------------------------------

    async def start(self, agent: str, *, conversation_id: str = "", **config: Any) -> str:
        """Start a long-lived agent (or resume ``conversation_id``); returns
        the conversation's id."""
        request = pb.StartAgentRequest(
            agent=agent, config_json=config_json(config), conversation_id=conversation_id
        )
        response = await self._unary("StartAgent", request)
        return str(response.conversation_id)

    async def call(
        self,
        conversation_id: str,
        message: str,
        *,
        on_event: EventHandler | None = None,
        files: Mapping[str, bytes | str] | None = None,
    ) -> RunResult:
        """One turn of a long-lived agent; returns its result."""
        request = pb.CallRequest(
            conversation_id=conversation_id, message=message, files=file_messages(files)
        )
        return await self._updates(self.stub.Call(request, metadata=self._metadata), on_event)

    async def cast(
        self,
        conversation_id: str,
        message: str,
        *,
        files: Mapping[str, bytes | str] | None = None,
    ) -> str:
        """Queue a turn and return its turn id at once; its outcome arrives on
        :meth:`events` as ``turn.result`` or ``turn.error``."""
        request = pb.CastRequest(
            conversation_id=conversation_id, message=message, files=file_messages(files)
        )
        return str((await self._unary("Cast", request)).turn_id)

    async def stop(self, conversation_id: str) -> None:
        """Stop a long-lived agent."""
        await self._unary("StopAgent", pb.StopAgentRequest(conversation_id=conversation_id))

    # events and humans --------------------------------------------------------------

    def events(
        self,
        *,
        run_ids: Iterable[str] = (),
        conversation_id: str = "",
        name_prefixes: Iterable[str] = (),
    ) -> EventStream:
        """The caller's events, live: only these runs (and their sub-agents')
        when ``run_ids`` is given, only names starting with one of
        ``name_prefixes`` when given. ``async with client.events() as events``
        returns once the server has subscribed; ``async for`` reads."""
        request = pb.EventsRequest(
            run_ids=list(run_ids),
            conversation_id=conversation_id,
            name_prefixes=list(name_prefixes),
        )
        return EventStream(self, request)

    async def respond_human(self, ref: str, answer: Any) -> None:
        """Answer the human request ``ref`` (from a ``human.request`` event) with
        ``answer`` (any JSON value)."""
        request = pb.RespondHumanRequest(ref=ref, answer_json=answer_json(answer))
        await self._unary("RespondHuman", request)

    async def respond_approval(self, ref: str, *, approved: bool, reason: str = "") -> None:
        """Approve (or refuse, saying why in ``reason``) the held tool call
        ``ref`` (from a ``tool.approval`` event), as this client's principal.
        Raises :class:`legion.PermissionDenied` when the call names other
        approvers, by name or as ``role:NAME`` for a role this principal's
        vault does not hold (or, naming none, belongs to another principal's
        run), and
        :class:`legion.NotFound` when it is no longer waiting."""
        request = approval_message(ref, approved=approved, reason=reason)
        await self._unary("RespondApproval", request)

    async def list_sandboxes(self) -> list[SandboxInfo]:
        """The caller's live sandboxes on the server."""
        response = await self._unary("ListSandboxes", pb.ListSandboxesRequest())
        return [sandbox_info(s) for s in response.sandboxes]


class EventStream:
    """A live Events subscription. Iterate it (``async for``); use it as an
    async context manager to know the subscription is live before going on,
    and to end it."""

    def __init__(self, client: Client, request: pb.EventsRequest) -> None:
        self._client = client
        self._request = request
        self._call: Any = None
        self._closed = False

    async def open(self) -> EventStream:
        """Subscribe; returns once the server has (raises if it refused)."""
        if self._call is None:
            self._call = self._client.stub.Events(self._request, metadata=self._client.metadata)
            try:
                await self._call.initial_metadata()
                if self._call.done():  # refused: the status came with the headers
                    code = await self._call.code()
                    if code != grpc.StatusCode.OK:
                        raise translate_status(code, await self._call.details())
            except grpc.aio.AioRpcError as exc:
                raise _translate(exc) from None
        return self

    def close(self) -> None:
        """End the subscription."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> EventStream:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[RemoteEvent]:
        return self

    async def __anext__(self) -> RemoteEvent:
        await self.open()
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise StopAsyncIteration from None  # close() ended the read
            raise
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return remote_event(message)


class SyncClient:
    """:class:`Client` for code without an event loop: the same methods, blocking.

    It runs the async client on an event loop of its own::

        with legion.SyncClient("127.0.0.1:50051", token="...") as client:
            print(client.run("Accountant", "What is my balance?").output)
    """

    def __init__(self, address: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self.client = Client(address, **options)

    def close(self) -> None:
        try:
            self._runner.run(self.client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_agents(self) -> list[AgentInfo]:
        return self._runner.run(self.client.list_agents())

    def principal(self) -> str:
        return self._runner.run(self.client.principal())

    def run(
        self,
        agent: str,
        task: str,
        *,
        on_event: EventHandler | None = None,
        files: Mapping[str, bytes | str] | None = None,
        **config: Any,
    ) -> RunResult:
        return self._runner.run(
            self.client.run(agent, task, on_event=on_event, files=files, **config)
        )

    def start(self, agent: str, *, conversation_id: str = "", **config: Any) -> str:
        return self._runner.run(self.client.start(agent, conversation_id=conversation_id, **config))

    def call(
        self,
        conversation_id: str,
        message: str,
        *,
        on_event: EventHandler | None = None,
        files: Mapping[str, bytes | str] | None = None,
    ) -> RunResult:
        return self._runner.run(
            self.client.call(conversation_id, message, on_event=on_event, files=files)
        )

    def cast(
        self, conversation_id: str, message: str, *, files: Mapping[str, bytes | str] | None = None
    ) -> str:
        return self._runner.run(self.client.cast(conversation_id, message, files=files))

    def stop(self, conversation_id: str) -> None:
        self._runner.run(self.client.stop(conversation_id))

    def respond_human(self, ref: str, answer: Any) -> None:
        self._runner.run(self.client.respond_human(ref, answer))

    def respond_approval(self, ref: str, *, approved: bool, reason: str = "") -> None:
        self._runner.run(self.client.respond_approval(ref, approved=approved, reason=reason))

    def list_sandboxes(self) -> list[SandboxInfo]:
        return self._runner.run(self.client.list_sandboxes())

    def events(
        self,
        *,
        run_ids: Iterable[str] = (),
        conversation_id: str = "",
        name_prefixes: Iterable[str] = (),
    ) -> Iterator[RemoteEvent]:
        """The caller's events, live: subscribed when this returns. Close the
        iterator (``.close()``) to end the subscription."""
        stream = self.client.events(
            run_ids=run_ids, conversation_id=conversation_id, name_prefixes=name_prefixes
        )
        self._runner.run(stream.open())
        return self._read(stream)

    def _read(self, stream: EventStream) -> Iterator[RemoteEvent]:
        try:
            while True:
                try:
                    yield self._runner.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            stream.close()
