"""``legion.Sandbox``: one container, one persistent namespace, host tools."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import telemetry
from .. import vault as _vault
from .._log import get_logger
from .._proto import sandbox_pb2 as pb
from ..config import SandboxLimits
from ..errors import SandboxClosed, SandboxCrashed, SandboxOOMKilled
from . import _codec
from .channel import ENVELOPE_BYTES
from .runtime import Lease, SandboxRuntime, default_runtime
from .tools import ToolDef, ToolDispatcher, toolset

log = get_logger("legion.sandbox")


@dataclass(frozen=True)
class ExecError:
    """An error raised by sandbox code (or a timeout). ``traceback`` is the
    sandbox-side traceback of the code's own frames."""

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(frozen=True)
class ResourceStats:
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    max_rss_bytes: int = 0
    """Peak resident memory of the runner process so far."""


@dataclass(frozen=True, kw_only=True)
class ExecResult:
    """What one :meth:`Sandbox.run` produced."""

    value: Any = None
    """The value of the code's trailing expression, as JSON data (None when
    there was none, or when JSON could not carry it: see ``value_repr``)."""
    value_repr: str | None = None
    """repr() of a trailing value JSON could not carry."""
    has_value: bool = False
    stdout: str = ""
    stderr: str = ""
    error: ExecError | None = None
    duration: float = 0.0
    """Seconds, measured on the controller from sending the code to the result."""
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stats: ResourceStats = field(default_factory=ResourceStats)

    @property
    def ok(self) -> bool:
        return self.error is None


def _truncation_marker(dropped: int) -> str:
    return f"\n[... output truncated: {dropped} more characters not kept ...]\n"


class _Execution:
    """Controller-side state of one Execute: output kept within the limit."""

    def __init__(self, limit: int, context: contextvars.Context) -> None:
        self.exec_id = uuid.uuid4().hex
        self.limit = limit
        self.context = context
        self.done: asyncio.Future[pb.ExecuteResult] = asyncio.get_running_loop().create_future()
        self.out = {pb.STREAM_STDOUT: bytearray(), pb.STREAM_STDERR: bytearray()}
        self.dropped = {pb.STREAM_STDOUT: 0, pb.STREAM_STDERR: 0}
        self.started = time.perf_counter()

    def add_output(self, stream: pb.Stream, data: bytes) -> None:
        buf = self.out.get(stream)
        if buf is None:
            return
        # The runner already caps output; a hostile one must not make us hold more.
        room = self.limit - len(buf)
        if room > 0:
            buf += data[:room]
        self.dropped[stream] += max(0, len(data) - max(room, 0))

    def text(self, stream: pb.Stream, runner_dropped: int = 0) -> tuple[str, bool]:
        text = self.out[stream].decode("utf-8", "replace")
        dropped = self.dropped[stream] + runner_dropped
        if dropped:
            text += _truncation_marker(dropped)
        return text, bool(dropped)


class Sandbox:
    """A network-less container that runs Python in one persistent namespace.

    Variables defined by one :meth:`run` are visible to the next; a new
    Sandbox starts empty. Tools are host objects: sandbox code calls them as
    ``Tool.function(...)`` (or ``function(...)`` for a plain function), and
    each call runs here, on the host, with the caller's vault.

    >>> class Calculator:
    ...     def add(self, a: int, b: int) -> int:
    ...         return a + b
    >>> async def main():
    ...     async with legion.Sandbox(tools=[Calculator]) as sandbox:
    ...         result = await sandbox.run("x = Calculator.add(1, 2)\\nx * 10")
    ...         return result.value   # 30

    Errors in the code come back in ``ExecResult.error``; a timeout too
    (``timed_out``), after which the container is replaced by a fresh one and
    earlier variables are gone. A container that dies (out of memory, a
    crashed runner) raises :class:`legion.SandboxCrashed` or
    :class:`legion.SandboxOOMKilled`; the next ``run`` gets a fresh container.
    """

    def __init__(
        self,
        *,
        tools: Iterable[Any] = (),
        limits: SandboxLimits | None = None,
        vault: Mapping[str, Any] | None = None,
        runtime: SandboxRuntime | None = None,
    ) -> None:
        self.tools: dict[str, ToolDef] = toolset(tools)
        self._limits = limits
        self._vault = dict(vault or {})
        self._runtime = runtime
        self._lease: Lease | None = None
        self._execution: _Execution | None = None
        self._dispatcher: ToolDispatcher | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._removals: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def limits(self) -> SandboxLimits:
        if self._limits is not None:
            return self._limits
        return self._runtime.limits if self._runtime is not None else SandboxLimits()

    @property
    def container_id(self) -> str | None:
        """The current container's id (None before start, or after it died)."""
        return self._lease.container_id if self._lease is not None else None

    async def start(self) -> Sandbox:
        """Acquire a container now (``run`` does it on demand)."""
        if self._closed:
            raise SandboxClosed("this Sandbox is closed; create a new one")
        if self._runtime is None:
            self._runtime = await default_runtime()
        if self._lease is None:
            await self._attach(await self._runtime.acquire(self._limits))
        return self

    async def _attach(self, lease: Lease) -> None:
        limits = lease.limits
        self._dispatcher = ToolDispatcher(
            self.tools,
            timeout=limits.tool_timeout_seconds,
            max_concurrent=limits.max_concurrent_tool_calls,
            rate=limits.tool_calls_per_second,
            max_message=limits.max_message_bytes,
        )
        self._lease = lease
        lease.connection.attach(self._on_message, functools.partial(self._on_closed, lease))
        lease.connection.send(
            pb.ControllerMessage(
                define_tools=pb.DefineTools(tools=[t.spec() for t in self.tools.values()])
            )
        )

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Remove the container (and any this Sandbox gave up). Idempotent."""
        self._closed = True
        if self._lease is not None:
            self._drop(self._lease)
        if self._removals:
            await asyncio.gather(*list(self._removals), return_exceptions=True)

    # running code ------------------------------------------------------------

    async def run(
        self, code: str, *, timeout: float | None = None, reset: bool = False
    ) -> ExecResult:
        """Run ``code``; return its trailing expression's value, output and error.

        ``timeout`` defaults to the limits' ``timeout_seconds``; ``reset=True``
        starts from an empty namespace (tools stay).
        """
        with telemetry.span("sandbox.eval", code=code) as stop:
            result = await self._run(code, timeout=timeout, reset=reset)
            stop.update(
                success=result.ok,
                timed_out=result.timed_out,
                error=str(result.error) if result.error else None,
            )
            return result

    async def _run(self, code: str, *, timeout: float | None, reset: bool) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        async with self._lock:
            if self._closed:
                raise SandboxClosed("this Sandbox is closed; create a new one")
            if self._lease is None or not self._lease.connection.is_open:
                self._lease = None
                await self.start()
            lease = self._lease
            assert lease is not None
            limits = lease.limits
            timeout = limits.timeout_seconds if timeout is None else timeout
            size = len(code.encode("utf-8", "surrogatepass"))
            if size > limits.max_message_bytes - ENVELOPE_BYTES:
                return ExecResult(
                    error=ExecError(
                        "MessageTooLarge",
                        f"the code is {size} bytes; at most "
                        f"{limits.max_message_bytes - ENVELOPE_BYTES} bytes can be sent to the "
                        "sandbox at once. Send it in parts, or keep data on the host behind "
                        "a tool.",
                    )
                )
            context = contextvars.copy_context()
            if self._vault:
                context.run(_vault._overlay, self._vault)
            execution = self._execution = _Execution(limits.output_limit_bytes, context)
            lease.connection.send(
                pb.ControllerMessage(
                    execute=pb.Execute(
                        exec_id=execution.exec_id,
                        code=code,
                        timeout_seconds=timeout,
                        output_limit_bytes=limits.output_limit_bytes,
                        reset_namespace=reset,
                    )
                )
            )
            try:
                result = await asyncio.wait_for(asyncio.shield(execution.done), timeout)
            except TimeoutError:
                return await self._timed_out(lease, execution, timeout)
            except _ChannelLost as lost:
                raise await self._crashed(lease, execution, str(lost)) from None
            except asyncio.CancelledError:
                # The caller gave up: the code must not run on, and the next
                # run must not queue behind it. Like a timeout, without the
                # grace wait (nothing may be awaited while cancelled).
                lease.connection.send(
                    pb.ControllerMessage(cancel=pb.Cancel(exec_id=execution.exec_id))
                )
                self._drop(lease)
                raise
            finally:
                self._execution = None
            return self._result(execution, result)

    def _result(self, execution: _Execution, msg: pb.ExecuteResult) -> ExecResult:
        value, value_repr = _codec.decode(msg.value) if msg.has_value else (None, None)
        stdout, out_cut = execution.text(pb.STREAM_STDOUT, msg.stdout_dropped_bytes)
        stderr, err_cut = execution.text(pb.STREAM_STDERR, msg.stderr_dropped_bytes)
        error = None
        if msg.HasField("error"):
            error = ExecError(msg.error.type, msg.error.message, msg.error.traceback)
        return ExecResult(
            value=value,
            value_repr=value_repr,
            has_value=msg.has_value,
            stdout=stdout,
            stderr=stderr,
            error=error,
            duration=time.perf_counter() - execution.started,
            stdout_truncated=out_cut,
            stderr_truncated=err_cut,
            stats=ResourceStats(
                msg.stats.cpu_user_seconds, msg.stats.cpu_system_seconds, msg.stats.max_rss_bytes
            ),
        )

    async def _timed_out(self, lease: Lease, execution: _Execution, timeout: float) -> ExecResult:
        # Cancel first so the runner can flush what the code printed, then kill
        # the container regardless: code that ignored the cancel, or left
        # threads running, must not outlive its time.
        lease.connection.send(pb.ControllerMessage(cancel=pb.Cancel(exec_id=execution.exec_id)))
        msg = pb.ExecuteResult()
        with contextlib.suppress(TimeoutError, _ChannelLost):
            msg = await asyncio.wait_for(
                asyncio.shield(execution.done), lease.limits.kill_grace_seconds
            )
        await self._discard(lease)
        partial = self._result(execution, msg)
        return ExecResult(
            stdout=partial.stdout,
            stderr=partial.stderr,
            stdout_truncated=partial.stdout_truncated,
            stderr_truncated=partial.stderr_truncated,
            duration=time.perf_counter() - execution.started,
            timed_out=True,
            error=ExecError(
                "TimeoutError",
                f"the code did not finish within {timeout:g} s and "
                "was stopped. The sandbox was replaced with a fresh one: variables "
                "from earlier runs are gone.",
            ),
        )

    async def _crashed(self, lease: Lease, execution: _Execution, reason: str) -> SandboxCrashed:
        assert self._runtime is not None
        state = await self._runtime.backend.wait_stopped(lease.container_id)
        await self._discard(lease)
        stdout, _ = execution.text(pb.STREAM_STDOUT)
        stderr, _ = execution.text(pb.STREAM_STDERR)
        fresh = "The next run gets a fresh sandbox: variables from earlier runs are gone."
        if state is not None and state.oom_killed:
            return SandboxOOMKilled(
                f"the sandbox used more than its {lease.limits.memory_mb} MiB memory limit and "
                f"was killed. {fresh}",
                exit_code=state.exit_code,
                stdout=stdout,
                stderr=stderr,
            )
        code = state.exit_code if state is not None else None
        return SandboxCrashed(
            f"the sandbox stopped while running code (exit code {code}; {reason}). {fresh}",
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
        )

    def _drop(self, lease: Lease) -> asyncio.Task[None] | None:
        """Stop using ``lease``: cancel its tool calls, remove its container."""
        if self._lease is lease:
            self._lease = None
        for task in list(self._calls):
            task.cancel()
        if self._runtime is None:
            return None
        removal = self._runtime.release(lease)
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        return removal

    async def _discard(self, lease: Lease) -> None:
        removal = self._drop(lease)
        if removal is not None:
            await removal

    # messages from the runner ------------------------------------------------

    def _on_message(self, message: pb.RunnerMessage) -> None:
        execution = self._execution
        kind = message.WhichOneof("kind")
        if execution is None:
            return  # nothing is running: late output or calls from leftover threads
        if kind == "output":
            if message.output.exec_id == execution.exec_id:
                execution.add_output(message.output.stream, message.output.data)
        elif kind == "execute_result":
            if message.execute_result.exec_id == execution.exec_id and not execution.done.done():
                execution.done.set_result(message.execute_result)
        elif kind == "tool_call":
            # In the caller's context (run ids, the vault), not the channel
            # thread's, which is what this callback was scheduled from.
            task = asyncio.create_task(
                self._serve_call(message.tool_call, execution), context=execution.context.copy()
            )
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _serve_call(self, call: pb.ToolCall, execution: _Execution) -> None:
        dispatcher, lease = self._dispatcher, self._lease
        if dispatcher is None or lease is None:
            return
        result = await dispatcher.handle(call, execution.context)
        lease.connection.send(pb.ControllerMessage(tool_result=result))

    def _on_closed(self, lease: Lease, reason: str) -> None:
        execution = self._execution
        if self._lease is lease and execution is not None and not execution.done.done():
            execution.done.set_exception(_ChannelLost(reason))


class _ChannelLost(Exception):
    pass
