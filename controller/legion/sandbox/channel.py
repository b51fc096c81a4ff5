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
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

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
    :meth:`attach`.
    """

    def __init__(
        self, hello: pb.Hello, context: grpc.aio.ServicerContext, io_loop: asyncio.AbstractEventLoop
    ) -> None:
        self.hello = hello
        self._context = context
        self._io_loop = io_loop
        self._outbox: asyncio.Queue[pb.ControllerMessage | None] = asyncio.Queue()
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
        with contextlib.suppress(RuntimeError):  # the channel server has stopped
            self._io_loop.call_soon_threadsafe(self._outbox.put_nowait, message)

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

    async def _pump_out(self) -> None:
        while (message := await self._outbox.get()) is not None:
            await self._context.write(message)

    async def serve(self) -> None:
        """Runs on the channel's own loop until the stream ends."""
        writer = asyncio.create_task(self._pump_out())
        reason = "the runner closed the stream"
        try:
            while True:
                read = asyncio.ensure_future(self._context.read())
                done, _ = await asyncio.wait({read, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer in done:
                    read.cancel()
                    writer.result()  # raises when the write failed
                    reason = "closed by the controller"
                    break
                message = read.result()
                if message is grpc.aio.EOF:
                    break
                self._deliver(message)
        except grpc.aio.AioRpcError as exc:
            reason = f"stream failed: {exc.code().name}: {exc.details()}"
        except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError) as exc:
            reason = f"stream failed: {exc!r}"
        except asyncio.CancelledError:
            reason = "the stream was cancelled (the runner went away, or the channel stopped)"
            raise
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            self._finish(reason)


class _Servicer(pb_grpc.SandboxChannelServicer):
    def __init__(self, server: ChannelServer) -> None:
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
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
            return
        token = first.hello.token
        with self._server._lock:
            waiter = self._server._expected.pop(token, None)
            retired = token in self._server._retired
        if waiter is None:
            if retired or self._server._stopping:
                # Its start was abandoned, or we are shutting down: expected.
                log.debug("sandbox_hello_refused", reason="start abandoned or channel stopping")
            else:
                log.warning("sandbox_hello_refused", reason="unknown or already used token")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown or already used token")
            return
        connection = Connection(first.hello, context, asyncio.get_running_loop())
        owner, future = waiter
        with contextlib.suppress(RuntimeError):
            owner.call_soon_threadsafe(_hand_over, future, connection)
        await connection.serve()


def _hand_over(future: asyncio.Future[Connection], connection: Connection) -> None:
    if future.done():  # whoever waited has given up: nobody will use this stream
        connection.close()
    else:
        future.set_result(connection)


class ChannelServer:
    """The gRPC server sandboxes dial into, on the Unix socket ``socket_path``."""

    def __init__(self, socket_path: Path, *, max_message_bytes: int) -> None:
        self.socket_path = socket_path
        self._max_message = max_message_bytes + ENVELOPE_BYTES
        self._expected: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[Connection]]] = {}
        self._lock = threading.Lock()
        # Tokens whose start was abandoned: a late Hello with one is refused
        # quietly. Bounded: only the most recent ones matter.
        self._retired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stopping = False
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
            self._server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", self._max_message),
                    ("grpc.max_send_message_length", self._max_message),
                    ("grpc.so_reuseport", 0),
                ]
            )
            pb_grpc.add_SandboxChannelServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
            self._server.add_insecure_port(f"unix://{self.socket_path}")
            await self._server.start()
            # The container user is unprivileged and not the socket's owner.
            # The directory is mounted read-only, so the socket cannot be
            # replaced; the one-time token decides who gets a stream.
            os.chmod(self.socket_path, 0o666)
        except BaseException as exc:
            started.set_exception(exc)
            asyncio.get_running_loop().stop()
            return
        started.set_result(None)

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

    async def _shutdown(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        # Let gRPC finish tearing down its calls before the loop stops.
        for _ in range(3):
            await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    def _begin_stop(self, grace: float) -> concurrent.futures.Future[None] | None:
        with self._lock:
            self._stopping = True
            self._expected.clear()
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
