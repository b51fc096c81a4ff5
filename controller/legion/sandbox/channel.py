"""The controller's end of the sandbox channel.

One gRPC server per runtime listens on a Unix socket in a host directory that
each container mounts read-only. A runner dials in and opens one Connect
stream; its first message must be Hello with a token the runtime is
expecting. Each token works once. After Hello the stream is a
:class:`Connection`: messages to the runner go through an outbox, messages from
it to whichever session holds the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio

from .._log import get_logger
from .._proto import sandbox_pb2 as pb
from .._proto import sandbox_pb2_grpc as pb_grpc

log = get_logger("legion.sandbox.channel")

SOCKET_NAME = "legion.sock"
# Room for the envelope around a payload (ids, field tags) within one message.
ENVELOPE_BYTES = 4096
_HELLO_TIMEOUT = 10.0

MessageHandler = Callable[[pb.RunnerMessage], None]


class Connection:
    """One runner's stream, after a valid Hello."""

    def __init__(self, hello: pb.Hello, context: grpc.aio.ServicerContext) -> None:
        self.hello = hello
        self._context = context
        self._outbox: asyncio.Queue[pb.ControllerMessage | None] = asyncio.Queue()
        self._handler: MessageHandler | None = None
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> asyncio.Future[str]:
        """Resolves with the reason when the stream ends."""
        return self._closed

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    def attach(self, handler: MessageHandler | None) -> None:
        """Route incoming messages to ``handler`` (None: drop them)."""
        self._handler = handler

    def send(self, message: pb.ControllerMessage) -> None:
        if self.is_open:
            self._outbox.put_nowait(message)

    def close(self) -> None:
        self._outbox.put_nowait(None)

    def _finish(self, reason: str) -> None:
        if not self._closed.done():
            self._closed.set_result(reason)

    async def _pump_out(self) -> None:
        while (message := await self._outbox.get()) is not None:
            await self._context.write(message)

    async def serve(self) -> None:
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
                if self._handler is not None:
                    self._handler(message)
        except grpc.aio.AioRpcError as exc:
            reason = f"stream failed: {exc.code().name}: {exc.details()}"
        except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError) as exc:
            reason = f"stream failed: {exc!r}"
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
        waiter = self._server._expected.pop(first.hello.token, None)
        if waiter is None or waiter.done():
            log.warning("sandbox_hello_refused", reason="unknown or already used token")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown or already used token")
            return
        connection = Connection(first.hello, context)
        waiter.set_result(connection)
        await connection.serve()


class ChannelServer:
    """The gRPC server sandboxes dial into, on ``<directory>/legion.sock``."""

    def __init__(self, directory: Path, *, max_message_bytes: int) -> None:
        self.directory = directory
        self.socket_path = directory / SOCKET_NAME
        self._max_message = max_message_bytes + ENVELOPE_BYTES
        self._expected: dict[str, asyncio.Future[Connection]] = {}
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
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
        # The container user is unprivileged and not the socket's owner. The
        # directory is mounted read-only, so the socket cannot be replaced;
        # the one-time token decides who gets a stream.
        os.chmod(self.socket_path, 0o666)

    def expect(self, token: str) -> asyncio.Future[Connection]:
        """A future that resolves when a runner says Hello with ``token``."""
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._expected[token] = future
        return future

    def forget(self, token: str) -> None:
        future = self._expected.pop(token, None)
        if future is not None and not future.done():
            future.cancel()

    async def stop(self, grace: float = 0.5) -> None:
        for token in list(self._expected):
            self.forget(token)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
