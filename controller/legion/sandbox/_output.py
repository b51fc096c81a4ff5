"""Live output: what running code prints, handed on as it arrives.

The runner sends stdout and stderr in chunks while the code runs (and the
rest when it ends). :class:`OutputFeed` turns one execution's chunks into
text and gives them to two consumers: the ``on_output`` callback of
:meth:`legion.Sandbox.run`, and telemetry (``sandbox.output`` events, made
only while someone is subscribed). Both see exactly the output the
:class:`~legion.sandbox.ExecResult` keeps, in order, and the truncation
marker once where it was cut.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import inspect
from collections.abc import Awaitable, Callable

from .. import telemetry
from .._log import get_logger
from .._proto import sandbox_pb2 as pb

__all__ = ["STREAMS", "OutputFeed", "OutputHandler"]

log = get_logger("legion.sandbox")

OutputHandler = Callable[[str, str], Awaitable[None] | None]
"""``on_output(stream, text)``: ``stream`` is ``"stdout"`` or ``"stderr"``;
sync or async."""

STREAMS: dict[int, str] = {pb.STREAM_STDOUT: "stdout", pb.STREAM_STDERR: "stderr"}


class OutputFeed:
    """One execution's output, as text, to ``callback`` and to telemetry.

    The callback runs in a task of its own, one chunk at a time and in order,
    so a slow one delays nothing but itself and one that raises is logged and
    stops nothing. :meth:`close` waits until it has had every chunk.
    Telemetry events are emitted at once, in the execution's context (its run
    id, the caller that started it)."""

    def __init__(self, callback: OutputHandler | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"on_output must be callable, not {type(callback).__name__}")
        self._callback = callback
        # Chunks may split a UTF-8 sequence; the whole text decodes the same.
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")("replace") for stream in STREAMS
        }
        self._ended: set[int] = set()
        self._queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._deliver()) if callback is not None else None

    def add(self, stream: int, data: bytes, context: contextvars.Context) -> None:
        """Bytes of ``stream`` that the execution kept."""
        if stream in STREAMS and stream not in self._ended:
            self._publish(stream, self._decoders[stream].decode(data), context)

    def end(self, stream: int, marker: str, context: contextvars.Context) -> None:
        """``stream`` is over: the end of a character a chunk split, and the
        truncation marker (empty when nothing was cut). Only the first call counts."""
        if stream in STREAMS and stream not in self._ended:
            self._ended.add(stream)
            self._publish(stream, self._decoders[stream].decode(b"", final=True) + marker, context)

    async def close(self) -> None:
        """Wait until the callback has had every chunk (cancelling this cancels it)."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _publish(self, stream: int, text: str, context: contextvars.Context) -> None:
        if not text:
            return
        name = STREAMS[stream]
        if self._task is not None:
            self._queue.put_nowait((name, text))
        if telemetry.active():
            context.run(
                telemetry.emit, telemetry.SANDBOX_OUTPUT, stream=name, text=telemetry.excerpt(text)
            )

    async def _deliver(self) -> None:
        assert self._callback is not None
        while (chunk := await self._queue.get()) is not None:
            try:
                returned = self._callback(*chunk)
                if inspect.isawaitable(returned):
                    await returned
            except Exception as exc:  # the run goes on; the callback is the caller's
                log.warning("on_output_failed", callback=repr(self._callback), error=repr(exc))
