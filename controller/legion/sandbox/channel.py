"""The controller's end of the sandbox channel.

One gRPC server per runtime listens on the Unix socket of the runtime's
:class:`~legion.sandbox.endpoint.UnixSocketEndpoint`. A runner dials in and opens one Connect
stream; its first message must be Hello with a token the runtime is
expecting. Each token works once. After Hello the stream is a
:class:`Connection`.

The gRPC server runs on an event loop of its own, in a thread the server
owns. The caller's loop only ever sees plain callbacks and futures of its own:
how a program ends its loop (``asyncio.run`` cancels every task, gRPC's
included, before it finalises anything) cannot leave gRPC half-stopped, and
the server can still be stopped from ``atexit``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .._log import get_logger
from .._proto import sandbox_pb2 as pb
from .._proto import sandbox_pb2_grpc as pb_grpc

log = get_logger("legion.sandbox.channel")

# Room for the envelope around a payload (ids, field tags) within one message.
ENVELOPE_BYTES = 4096
_HELLO_TIMEOUT = 10.0

MessageHandler = Callable[[pb.RunnerMessage], None]
ClosedHandler = Callable[[str], None]


class Connection:
    """One runner's stream, after a valid Hello.

    ``send`` and ``close`` may be called from any thread. Incoming messages
    and the close notice are delivered, in order, on the loop that called
    :meth:`attach`. Each server kind drives the stream its own way
    (:meth:`_to_io`).
    """

    def __init__(self, hello: pb.Hello) -> None:
        self.hello = hello
        self._owner: asyncio.AbstractEventLoop | None = None
        self._on_message: MessageHandler | None = None
        self._on_closed: ClosedHandler | None = None
        self.close_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.close_reason is None

    def attach(
        self, on_message: MessageHandler | None, on_closed: ClosedHandler | None = None
    ) -> None:
        """Deliver messages (and the close notice) to these callbacks on the
        running loop; ``None`` drops them. If the stream has already ended,
        ``on_closed`` is called soon."""
        self._owner = asyncio.get_running_loop() if on_message or on_closed else None
        self._on_message, self._on_closed = on_message, on_closed
        if self.close_reason is not None and on_closed is not None:
            self._owner.call_soon(on_closed, self.close_reason)  # type: ignore[union-attr]

    def send(self, message: pb.ControllerMessage) -> None:
        if self.is_open:
            self._to_io(message)

    def close(self) -> None:
        self._to_io(None)

    def _to_io(self, message: pb.ControllerMessage | None) -> None:
        raise NotImplementedError

    def _deliver(self, message: pb.RunnerMessage) -> None:
        owner, handler = self._owner, self._on_message
        if owner is not None and handler is not None:
            with contextlib.suppress(RuntimeError):  # the owner's loop is closed
                owner.call_soon_threadsafe(handler, message)

    def _finish(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        owner, handler = self._owner, self._on_closed
        if owner is not None and handler is not None:
            with contextlib.suppress(RuntimeError):
                owner.call_soon_threadsafe(handler, reason)


class AioConnection(Connection):
    """A stream of the grpc.aio server, served on the channel thread's loop."""

    def __init__(
        self, hello: pb.Hello, context: grpc.aio.ServicerContext, io_loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(hello)
        self._context = context
        self._io_loop = io_loop
        self._outbox: asyncio.Queue[pb.ControllerMessage | None] = asyncio.Queue()

    def _to_io(self, message: pb.ControllerMessage | None) -> None:
        with contextlib.suppress(RuntimeError):  # the channel server has stopped
            self._io_loop.call_soon_threadsafe(self._outbox.put_nowait, message)

    async def _pump_out(self) -> None:
        while (message := await self._outbox.get()) is not None:
            await self._context.write(message)

    async def serve(self) -> None:
        """Runs on the channel's own loop until the stream ends: this task
        reads; a second one writes, and cancels the reading when the
        controller closes the stream (or a write fails)."""
        reader = asyncio.current_task()
        assert reader is not None
        writer = asyncio.create_task(self._pump_out())
        # The writer ends on its own only when the controller closed the
        # stream or a write failed: then stop reading.
        writer.add_done_callback(lambda w: None if w.cancelled() else reader.cancel())
        reason = "the runner closed the stream"
        read, deliver = self._context.read, self._deliver
        try:
            while (message := await read()) is not grpc.aio.EOF:
                deliver(message)
        except grpc.aio.AioRpcError as exc:
            reason = f"stream failed: {exc.code().name}: {exc.details()}"
        except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError) as exc:
            reason = f"stream failed: {exc!r}"
        except asyncio.CancelledError:
            if not writer.done() or writer.cancelled():
                reason = "the stream was cancelled (the runner went away, or the channel stopped)"
                raise
            reader.uncancel()
            failed = writer.exception()
            reason = "closed by the controller" if failed is None else f"stream failed: {failed!r}"
        finally:
            if not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            self._finish(reason)


class _Tokens:
    """The one-time Hello tokens a server expects, shared by both kinds."""

    def __init__(self) -> None:
        self._expected: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[Connection]]] = {}
        self._lock = threading.Lock()
        # Tokens whose start was abandoned: a late Hello with one is refused
        # quietly. Bounded: only the most recent ones matter.
        self._retired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stopping = False

    def expect(self, token: str) -> asyncio.Future[Connection]:
        """A future (of the running loop) that resolves when a runner says
        Hello with ``token``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Connection] = loop.create_future()
        with self._lock:
            self._expected[token] = (loop, future)
        return future

    def forget(self, token: str) -> None:
        with self._lock:
            waiter = self._expected.pop(token, None)
            self._retired[token] = None
            while len(self._retired) > 1024:
                self._retired.popitem(last=False)
        if waiter is not None and not waiter[1].done():
            waiter[1].cancel()

    def _claim(
        self, first: pb.RunnerMessage | None
    ) -> tuple[asyncio.AbstractEventLoop, asyncio.Future[Connection]] | str:
        """Who waits for this first message's Hello, or why it is refused."""
        if first is None or first.WhichOneof("kind") != "hello":
            return "the first message must be Hello"
        token = first.hello.token
        with self._lock:
            waiter = self._expected.pop(token, None)
            retired = token in self._retired
        if waiter is not None:
            return waiter
        if retired or self._stopping:
            # Its start was abandoned, or we are shutting down: expected.
            log.debug("sandbox_hello_refused", reason="start abandoned or channel stopping")
        else:
            log.warning("sandbox_hello_refused", reason="unknown or already used token")
        return "unknown or already used token"

    def _begin_stopping(self) -> None:
        with self._lock:
            self._stopping = True
            self._expected.clear()


def _hand_over(
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Connection]], connection: Connection
) -> None:
    owner, future = waiter

    def give() -> None:
        if future.done():  # whoever waited has given up: nobody will use this stream
            connection.close()
        else:
            future.set_result(connection)

    try:
        owner.call_soon_threadsafe(give)
    except RuntimeError:  # the waiter's loop is closed
        connection.close()


def _refusal(claimed: object) -> grpc.StatusCode:
    return (
        grpc.StatusCode.INVALID_ARGUMENT
        if claimed == "the first message must be Hello"
        else grpc.StatusCode.PERMISSION_DENIED
    )


def _server_options(max_message: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.so_reuseport", 0),
    ]


class _AioServicer(pb_grpc.SandboxChannelServicer):
    def __init__(self, server: AioChannelServer) -> None:
        self._server = server

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.RunnerMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), _HELLO_TIMEOUT)
        except (TimeoutError, grpc.RpcError):
            return
        claimed = self._server._claim(None if first is grpc.aio.EOF else first)
        if isinstance(claimed, str):
            await context.abort(_refusal(claimed), claimed)
            return
        connection = AioConnection(first.hello, context, asyncio.get_running_loop())
        _hand_over(claimed, connection)
        await connection.serve()


class AioChannelServer(_Tokens):
    """The gRPC server sandboxes dial into, on the Unix socket ``socket_path``:
    grpc.aio, on an event loop of its own in a thread the server owns."""

    def __init__(self, socket_path: Path, *, max_message_bytes: int) -> None:
        super().__init__()
        self.socket_path = socket_path
        self._max_message = max_message_bytes + ENVELOPE_BYTES
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), daemon=True, name="legion-channel"
        )
        self._thread.start()
        await asyncio.wrap_future(started)

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(started))
            loop.run_forever()  # until stop
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        try:
            self._server = grpc.aio.server(options=_server_options(self._max_message))
            pb_grpc.add_SandboxChannelServicer_to_server(_AioServicer(self), self._server)  # type: ignore[no-untyped-call]
            self._server.add_insecure_port(f"unix://{self.socket_path}")
            await self._server.start()
            _open_socket(self.socket_path)
        except BaseException as exc:
            started.set_exception(exc)
            asyncio.get_running_loop().stop()
            return
        started.set_result(None)

    async def _shutdown(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        # Let gRPC finish tearing down its calls before the loop stops.
        for _ in range(3):
            await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    def _begin_stop(self, grace: float) -> concurrent.futures.Future[None] | None:
        self._begin_stopping()
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return None
        try:
            return asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
        except RuntimeError:
            return None

    async def stop(self, grace: float = 0.5) -> None:
        stopping = self._begin_stop(grace)
        if stopping is not None:
            await asyncio.wrap_future(stopping)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def stop_sync(self, grace: float = 0.5) -> None:
        """Stop without an event loop (from atexit)."""
        stopping = self._begin_stop(grace)
        if stopping is not None:
            with contextlib.suppress(Exception):
                stopping.result(timeout=10)
        if self._thread is not None:
            self._thread.join(10)


def _open_socket(path: Path) -> None:
    # The container user is unprivileged and not the socket's owner. The
    # directory is mounted read-only, so the socket cannot be replaced; the
    # one-time token decides who gets a stream.
    os.chmod(path, 0o666)


class _Threads:
    """The executor the synchronous server runs handlers in: a daemon thread
    per stream. A stream holds its thread for the sandbox's whole life, so a
    bounded pool would cap the sandboxes; and daemon threads never hold up
    the interpreter's exit (a ThreadPoolExecutor's workers are joined before
    ``atexit`` hooks run, and would wait there on a live stream forever)."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        threading.Thread(target=run, daemon=True, name="legion-channel-stream").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class SyncConnection(Connection):
    """A stream of the synchronous server. ``send`` only queues (no loop to
    wake); the stream's handler thread writes, and a reader thread of its
    own delivers what the runner sends."""

    def __init__(self, hello: pb.Hello) -> None:
        super().__init__(hello)
        self._queue: queue.SimpleQueue[pb.ControllerMessage | None] = queue.SimpleQueue()

    def _to_io(self, message: pb.ControllerMessage | None) -> None:
        self._queue.put(message)

    def read(self, requests: Iterator[pb.RunnerMessage]) -> None:
        reason = "the runner closed the stream"
        deliver = self._deliver
        try:
            for message in requests:
                deliver(message)
        except grpc.RpcError:
            # grpc's synchronous request iterator says no more than this.
            reason = "the runner's stream broke: the runner went away"
        except Exception as exc:  # a broken stream ends this stream only
            reason = f"stream failed: {exc!r}"
        self._finish(reason)
        self._queue.put(None)

    def replies(self) -> Iterator[pb.ControllerMessage]:
        while (message := self._queue.get()) is not None:
            yield message
        self._finish("closed by the controller")


class _SyncServicer(pb_grpc.SandboxChannelServicer):
    def __init__(self, server: SyncChannelServer) -> None:
        self._server = server

    def Connect(
        self, request_iterator: Iterator[pb.RunnerMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ControllerMessage]:
        # The Hello is read on a thread of its own so that a peer that never
        # says it cannot hold this handler past the Hello timeout.
        got: queue.SimpleQueue[pb.RunnerMessage | None] = queue.SimpleQueue()

        def first() -> None:
            try:
                got.put(next(request_iterator))
            except (StopIteration, grpc.RpcError, Exception):
                got.put(None)

        threading.Thread(target=first, daemon=True, name="legion-channel-hello").start()
        try:
            hello = got.get(timeout=_HELLO_TIMEOUT)
        except queue.Empty:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello in time")
        claimed = self._server._claim(hello)
        if isinstance(claimed, str):
            context.abort(_refusal(claimed), claimed)
        assert hello is not None and not isinstance(claimed, str)
        connection = SyncConnection(hello.hello)
        threading.Thread(
            target=connection.read,
            args=(request_iterator,),
            daemon=True,
            name="legion-channel-read",
        ).start()
        _hand_over(claimed, connection)
        yield from connection.replies()


class SyncChannelServer(_Tokens):
    """The same channel on grpc's synchronous server: a thread per stream
    writes, another reads, and the caller's loop is woken once per message
    that reaches it. No event loop of gRPC's own, so nothing to half-stop
    when a program's loop ends."""

    def __init__(self, socket_path: Path, *, max_message_bytes: int) -> None:
        super().__init__()
        self.socket_path = socket_path
        self._max_message = max_message_bytes + ENVELOPE_BYTES
        self._server: grpc.Server | None = None

    async def start(self) -> None:
        server = grpc.server(
            _Threads(),
            options=_server_options(self._max_message),
        )
        pb_grpc.add_SandboxChannelServicer_to_server(_SyncServicer(self), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server
        _open_socket(self.socket_path)

    def stop_sync(self, grace: float = 0.5) -> None:
        self._begin_stopping()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(10)

    async def stop(self, grace: float = 0.5) -> None:
        await asyncio.to_thread(self.stop_sync, grace)


ChannelServer = AioChannelServer | SyncChannelServer
CHANNEL_ENV = "LEGION_CHANNEL"
DEFAULT_CHANNEL = "sync"


def channel_server(
    socket_path: Path, *, max_message_bytes: int, kind: str | None = None
) -> ChannelServer:
    """The channel server of ``kind`` ("aio" or "sync"; default: the
    ``LEGION_CHANNEL`` environment variable, else "sync")."""
    kind = kind or os.environ.get(CHANNEL_ENV) or DEFAULT_CHANNEL
    if kind == "aio":
        return AioChannelServer(socket_path, max_message_bytes=max_message_bytes)
    if kind == "sync":
        return SyncChannelServer(socket_path, max_message_bytes=max_message_bytes)
    raise ValueError(f"{CHANNEL_ENV} must be 'aio' or 'sync', not {kind!r}")
