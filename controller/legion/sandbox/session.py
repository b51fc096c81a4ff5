"""``legion.Sandbox``: one container, one persistent namespace, host tools."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from .. import telemetry
from .. import vault as _vault
from .._log import get_logger
from .._proto import sandbox_pb2 as pb
from ..config import MiB, SandboxLimits
from ..errors import (
    SandboxClosed,
    SandboxCrashed,
    SandboxError,
    SandboxFileError,
    SandboxOOMKilled,
    SnapshotError,
    UsageError,
)
from . import _codec, files
from ._output import OutputFeed, OutputHandler
from .channel import ENVELOPE_BYTES
from .files import SandboxFiles
from .runtime import Lease, SandboxRuntime, default_runtime
from .tools import ToolDef, ToolDispatcher, is_tool_source, toolset

log = get_logger("legion.sandbox")

# Snapshot blobs cross the channel in pieces of at most this size (less when
# max_message_bytes is smaller), so a blob is bounded by max_snapshot_bytes,
# not by the message size.
_SNAPSHOT_CHUNK = 1024 * 1024


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
    artifacts: tuple[Artifact, ...] = ()
    """Figures and images the code showed, as PNG bytes (at most
    ``MAX_ARTIFACTS`` and ``MAX_ARTIFACT_BYTES`` a run)."""
    artifacts_dropped: int = 0
    """Figures or images shown but not kept: over the count or size bound."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Snapshot:
    """A sandbox's namespace, saved by :meth:`Sandbox.snapshot`.

    ``blob`` is opaque bytes, pickled inside the sandbox and only ever
    unpickled inside a sandbox (:meth:`Sandbox.restore`), never by the
    controller. Keep it as data from an untrusted source: it is whatever the
    sandbox's code made it.
    """

    blob: bytes = field(repr=False)
    names: tuple[str, ...] = ()
    """The names saved, in the namespace's order."""
    skipped: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Name -> why it could not be saved, one short line each (a function or
    class defined in sandbox code, an open file, a generator, too large...)."""


@dataclass(frozen=True)
class Restored:
    """What :meth:`Sandbox.restore` put back into the namespace."""

    names: tuple[str, ...] = ()
    """The names restored."""
    failed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Name -> why it could not be loaded (a module or tool this sandbox
    lacks, a value whose loading raised...)."""


_T = TypeVar("_T", "_Transfer", "_FileReply")

MAX_ARTIFACTS = 8
"""Figures and images kept per run (the runner sends at most this many)."""
MAX_ARTIFACT_BYTES = 16 * MiB
"""Bytes of figures and images kept per run, all together."""


@dataclass(frozen=True)
class Artifact:
    """A figure or image the code showed (``plt.show()``, or a trailing
    matplotlib Figure or PIL image): its bytes, never a repr."""

    mime_type: str
    data: bytes = field(repr=False)
    description: str = ""

    def summary(self) -> str:
        """One line for a model, which never sees the bytes: type, size, what."""
        size = png_size(self.data) if self.mime_type == "image/png" else None
        shape = f" {size[0]}x{size[1]}" if size else ""
        what = f": {self.description}" if self.description else ""
        return f"[{self.mime_type}{shape}, {len(self.data):,} bytes{what}]"


_shown_to: contextvars.ContextVar[_Execution | None] = contextvars.ContextVar(
    "legion_shown_to", default=None
)


def show(mime_type: str, data: bytes, description: str = "") -> bool:
    """From a host tool called by sandbox code: add a picture to the running
    code's ``ExecResult.artifacts`` (bounded like the code's own figures).
    False when it was not kept (no code running, or over the bound)."""
    execution = _shown_to.get()
    if execution is None or execution.done.done():
        return False
    return execution.show(Artifact(mime_type[:100], bytes(data), description[:300]))


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; None when it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _snapshot_transfer(kind: str) -> Callable[[Lease], _Transfer]:
    def make(lease: Lease) -> _Transfer:
        return _Transfer(kind, lease.limits.max_snapshot_bytes)

    return make


class _FileReply:
    """Controller-side state of one file operation: the runner's replies,
    bounded by ``limit`` bytes of data (0: none expected)."""

    kind = "file_reply"

    def __init__(self, path: str, limit: int) -> None:
        self.request_id = uuid.uuid4().hex
        self.path = path
        self.limit = limit
        self.data = bytearray()
        self.entries: list[files.FileInfo] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, message: pb.FileReply) -> None:
        if self.done.done() or message.request_id != self.request_id:
            return
        self.data += message.chunk
        self.entries.extend(
            files.FileInfo(e.path, e.size, is_dir=e.is_dir, is_symlink=e.is_symlink)
            for e in message.entries[: max(0, 100_000 - len(self.entries))]
        )
        if len(self.data) > self.limit:  # a runner that does not keep to it
            self.data = bytearray()
            self.done.set_exception(
                SandboxFileError(
                    f"{self.path}: more than the {self.limit} bytes asked for",
                    kind="too_large",
                    path=self.path,
                )
            )
        elif message.last and message.error:
            self.done.set_exception(
                SandboxFileError(message.error, kind=message.error_kind or "failed", path=self.path)
            )
        elif message.last:
            self.done.set_result(None)


class _Transfer:
    """Controller-side state of one Snapshot or Restore: what came back so
    far, bounded by ``limit`` bytes of blob and ``limit`` bytes of names."""

    def __init__(self, kind: str, limit: int) -> None:
        self.request_id = uuid.uuid4().hex
        self.kind = kind  # the RunnerMessage field that answers it
        self.limit = limit
        self.blob = bytearray()
        self.names: list[str] = []
        self.problems: dict[str, str] = {}
        self.error = ""
        self._listed = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, message: pb.SnapshotChunk | pb.RestoreResult) -> None:
        if self.done.done() or message.request_id != self.request_id:
            return
        if isinstance(message, pb.SnapshotChunk):
            self.blob += message.chunk
            problems = message.skipped
        else:
            problems = message.failed
        self._listed += sum(len(n) for n in message.names)
        self._listed += sum(len(p.name) + len(p.reason) for p in problems)
        # The runner keeps to the limit; one that does not must not make us hold more.
        if len(self.blob) > self.limit or self._listed > self.limit:
            self.blob = bytearray()
            self.done.set_exception(
                SnapshotError(
                    f"the sandbox sent more than max_snapshot_bytes ({self.limit} bytes); "
                    "nothing was kept"
                )
            )
            return
        self.names.extend(message.names)
        self.problems.update((p.name, p.reason) for p in problems)
        if message.last:
            self.error = message.error
            self.done.set_result(None)


def _value_text(result: ExecResult) -> str | None:
    """The trailing value as a trace shows it (JSON, or the repr), cut; None without one."""
    if not result.has_value:
        return None
    if result.value_repr is not None:
        return telemetry.excerpt(result.value_repr)
    return telemetry.excerpt(json.dumps(result.value, ensure_ascii=False))


ARTIFACT_EVENT_BYTES = 160 * 1024
"""A PNG up to this size travels with its ``sandbox.eval`` event (base64, so
the event stays under the API's 256 KiB a event), and a trace can show it; a
larger one is described only."""


def _artifact_event(artifact: Artifact) -> dict[str, Any]:
    event: dict[str, Any] = {
        "mime_type": artifact.mime_type,
        "description": artifact.description,
        "bytes": len(artifact.data),
        "summary": artifact.summary(),
    }
    if artifact.mime_type == "image/png" and len(artifact.data) <= ARTIFACT_EVENT_BYTES:
        event["data_base64"] = base64.b64encode(artifact.data).decode("ascii")
    return event


def _truncation_marker(dropped: int) -> str:
    return f"\n[... output truncated: {dropped} more characters not kept ...]\n"


class _Execution:
    """Controller-side state of one Execute: output kept within the limit,
    and handed on to ``feed`` as it comes."""

    def __init__(self, limit: int, context: contextvars.Context, feed: OutputFeed) -> None:
        self.exec_id = uuid.uuid4().hex
        self.limit = limit
        self.context = context
        self.feed = feed
        self.done: asyncio.Future[pb.ExecuteResult] = asyncio.get_running_loop().create_future()
        self.out = {pb.STREAM_STDOUT: bytearray(), pb.STREAM_STDERR: bytearray()}
        self.dropped = {pb.STREAM_STDOUT: 0, pb.STREAM_STDERR: 0}
        self.started = time.perf_counter()
        self.artifacts: list[Artifact] = []
        self.artifacts_dropped = 0

    def add_artifact(self, message: pb.Artifact) -> None:
        self.show(Artifact(message.mime_type[:100], bytes(message.data), message.description[:300]))

    def show(self, artifact: Artifact) -> bool:
        """Keep ``artifact`` within the bounds; whether it was kept."""
        kept = sum(len(a.data) for a in self.artifacts)
        if len(self.artifacts) >= MAX_ARTIFACTS or kept + len(artifact.data) > MAX_ARTIFACT_BYTES:
            self.artifacts_dropped += 1
            return False
        self.artifacts.append(artifact)
        return True

    def add_output(self, stream: pb.Stream, data: bytes) -> None:
        buf = self.out.get(stream)
        if buf is None:
            return
        # The runner already caps output; a hostile one must not make us hold more.
        room = self.limit - len(buf)
        if room > 0:
            kept = data[:room]
            buf += kept
            self.feed.add(stream, kept, self.context)
        self.dropped[stream] += max(0, len(data) - max(room, 0))

    def text(self, stream: pb.Stream, runner_dropped: int = 0) -> tuple[str, bool]:
        """The stream's output as the result keeps it; live consumers get its end."""
        text = self.out[stream].decode("utf-8", "replace")
        dropped = self.dropped[stream] + runner_dropped
        marker = _truncation_marker(dropped) if dropped else ""
        self.feed.end(stream, marker, self.context)
        return text + marker, bool(dropped)


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

    :meth:`snapshot` saves the namespace as an opaque blob and
    :meth:`restore` loads one into another sandbox (binding scope
    ``conversation``).
    """

    def __init__(
        self,
        *,
        tools: Iterable[Any] = (),
        limits: SandboxLimits | None = None,
        vault: Mapping[str, Any] | None = None,
        runtime: SandboxRuntime | None = None,
        agent: str | None = None,
        image: str | None = None,
    ) -> None:
        tools = list(tools)
        self.tools: dict[str, ToolDef] = toolset(tools)
        self._sources = [t for t in tools if is_tool_source(t) and t.resolved is None]
        """Tool sources (MCP servers) whose tools are learnt at start."""
        names = [t.name for t in self._sources] + list(self.tools)
        if len(set(names)) != len(names):
            raise UsageError(f"two tools share a name in {names}; tool names must be unique")
        self.image = image
        """The environment (``"data"``) or image reference its containers start
        from; None: the runtime's (``legion image build --recipe data`` builds one)."""
        self._limits = limits
        self._vault = dict(vault or {})
        self._runtime = runtime
        self._agent = agent  # shown by SandboxRuntime.sandboxes()
        self._lease: Lease | None = None
        self._execution: _Execution | None = None
        self._transfer: _Transfer | _FileReply | None = None
        self.files = SandboxFiles(self)
        """The work directory (``/data``): write, read, list, remove files."""
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
        if self._sources:
            with _vault.bind(self._vault):
                resolved = await asyncio.gather(*(source.resolve() for source in self._sources))
            for definition in resolved:
                if definition.name in self.tools:
                    raise UsageError(
                        f"two tools are named {definition.name!r}; tool names must be unique"
                    )
                self.tools[definition.name] = definition
            self._sources = []
        if self._lease is None:
            lease = await self._runtime.acquire(self._limits, agent=self._agent, image=self.image)
            await self._attach(lease)
        return self

    async def _attach(self, lease: Lease) -> None:
        limits = lease.limits
        self._dispatcher = ToolDispatcher(
            self.tools,
            timeout=limits.tool_timeout_seconds,
            max_concurrent=limits.max_concurrent_tool_calls,
            rate=limits.tool_calls_per_second,
            rate_mode=limits.tool_rate_limit_mode,
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
        """Remove the container (and any this Sandbox gave up). Idempotent.

        Also waits for the tool calls it cancelled to finish: a tool that runs
        a sub-agent removes that agent's container before this returns."""
        self._closed = True
        if self._lease is not None:
            self._drop(self._lease)
        pending = [*self._removals, *self._calls]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # running code ------------------------------------------------------------

    async def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        reset: bool = False,
        on_output: OutputHandler | None = None,
    ) -> ExecResult:
        """Run ``code``; return its trailing expression's value, output and error.

        ``timeout`` defaults to the limits' ``timeout_seconds``; ``reset=True``
        starts from an empty namespace (tools stay).

        ``on_output(stream, text)`` (sync or async; ``stream`` is ``"stdout"``
        or ``"stderr"``) receives the output while the code runs, in order:
        exactly what the result keeps, with the truncation marker once where
        it was cut, all of it before ``run`` returns. A callback that raises
        is logged, and the run goes on. While anyone is subscribed to
        telemetry, the same chunks are ``sandbox.output`` events.

        >>> async def main():
        ...     async with legion.Sandbox() as sandbox:
        ...         await sandbox.run(
        ...             "import time\nprint('working')\ntime.sleep(3)\nprint('done')",
        ...             on_output=lambda stream, text: print(stream, text, end=""),
        ...         )  # "stdout working" at once, "stdout done" 3 s later
        """
        feed = OutputFeed(on_output)
        with telemetry.span(telemetry.SANDBOX_EVAL, code=code) as stop:
            try:
                result = await self._run(code, timeout=timeout, reset=reset, feed=feed)
            except Exception:
                await feed.close()
                raise
            except BaseException:  # cancelled: nothing may be awaited now
                feed.cancel()
                raise
            await feed.close()
            stop.update(
                success=result.ok,
                timed_out=result.timed_out,
                error=str(result.error) if result.error else None,
            )
            if telemetry.active():  # what a trace shows; skipped when nobody listens
                stop.update(
                    stdout=telemetry.excerpt(result.stdout),
                    stderr=telemetry.excerpt(result.stderr),
                    value=_value_text(result),
                )
                if result.artifacts:
                    stop.update(artifacts=[_artifact_event(a) for a in result.artifacts])
            return result

    async def _run(
        self, code: str, *, timeout: float | None, reset: bool, feed: OutputFeed
    ) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        async with self._lock:
            lease = await self._live_lease()
            # A long-lived agent's sandbox serves one run per turn: show the current one.
            lease.run_id = telemetry.current_run()[0] or lease.run_id
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
            execution = self._execution = _Execution(limits.output_limit_bytes, context, feed)
            # Tool calls of this run (they run in this context) may show pictures.
            context.run(_shown_to.set, execution)
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

    async def _live_lease(self) -> Lease:
        """The container to use now, started afresh if the last one died.
        Called with the lock held."""
        if self._closed:
            raise SandboxClosed("this Sandbox is closed; create a new one")
        if self._lease is not None and not self._lease.connection.is_open:
            await self._drop(self._lease)  # died between runs: let its container go
        if self._lease is None:
            await self.start()
        assert self._lease is not None
        return self._lease

    # snapshots ---------------------------------------------------------------

    async def snapshot(
        self, *, timeout: float | None = None, include_files: bool = False
    ) -> Snapshot:
        """Save the namespace's variables into an opaque blob.

        Pickling happens inside the sandbox, entry by entry, in turn with
        :meth:`run` (never beside code). Modules are saved by name and
        imported again on restore; tools by reference to the tool of the
        same name. What cannot be saved (functions, classes and their
        instances defined in sandbox code, open files, generators, values
        over the limit) is listed in ``skipped`` with the reason. The blob
        (zlib-compressed) is at most ``SandboxLimits.max_snapshot_bytes``:
        values are left out, largest first, until it fits.

        ``include_files`` adds the work directory (``/data``: the files of
        :attr:`files`) as one more entry, named ``/data``, under the same
        bound; :meth:`restore` puts them back.

        ``timeout`` defaults to the limits' ``timeout_seconds``. At the
        timeout the container is replaced (its variables are gone) and
        :class:`legion.errors.SnapshotError` is raised; a container that dies
        raises :class:`legion.SandboxCrashed`.
        """

        def request(lease: Lease, transfer: _Transfer) -> list[pb.ControllerMessage]:
            snap = pb.Snapshot(
                request_id=transfer.request_id,
                max_bytes=lease.limits.max_snapshot_bytes,
                include_files=include_files,
            )
            return [pb.ControllerMessage(snapshot=snap)]

        transfer = await self._exchange(
            _snapshot_transfer("snapshot_chunk"), request, timeout, "taking a snapshot"
        )
        if transfer.error:
            raise SnapshotError(transfer.error)
        log.debug(
            "sandbox_snapshot",
            container=(self.container_id or "")[:12],
            bytes=len(transfer.blob),
            names=len(transfer.names),
            skipped=len(transfer.problems),
        )
        return Snapshot(
            blob=bytes(transfer.blob),
            names=tuple(transfer.names),
            skipped=MappingProxyType(dict(transfer.problems)),
        )

    async def restore(self, blob: bytes | Snapshot, *, timeout: float | None = None) -> Restored:
        """Load a snapshot's variables into this sandbox's namespace.

        ``blob`` is :attr:`Snapshot.blob` (or the Snapshot). It is sent as
        bytes and unpickled only inside the sandbox, entry by entry: a value
        that fails to load goes to ``failed`` with the reason, and the rest
        are restored. Restored names replace those already bound; others
        are kept. Tools stay this sandbox's own.

        Raises :class:`legion.errors.SnapshotError` when the blob is larger
        than ``SandboxLimits.max_snapshot_bytes`` (before sending it), when it
        is not a whole snapshot (nothing is restored), or at the timeout (the
        container is replaced); :class:`legion.SandboxCrashed` when the
        container dies.
        """
        if isinstance(blob, Snapshot):
            blob = blob.blob
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob must be bytes (Snapshot.blob), not {type(blob).__name__}")
        data = bytes(blob)

        def request(lease: Lease, transfer: _Transfer) -> list[pb.ControllerMessage]:
            limits = lease.limits
            if len(data) > limits.max_snapshot_bytes:
                raise SnapshotError(
                    f"the snapshot is {len(data)} bytes; this sandbox takes at most "
                    f"{limits.max_snapshot_bytes} (SandboxLimits.max_snapshot_bytes). Raise "
                    "that limit, or restore it into a sandbox that has it."
                )
            size = min(_SNAPSHOT_CHUNK, limits.max_message_bytes - ENVELOPE_BYTES)
            starts = range(0, len(data), size) if data else range(1)
            return [
                pb.ControllerMessage(
                    restore=pb.Restore(
                        request_id=transfer.request_id,
                        chunk=data[start : start + size],
                        last=start + size >= len(data),
                    )
                )
                for start in starts
            ]

        transfer = await self._exchange(
            _snapshot_transfer("restore_result"), request, timeout, "restoring a snapshot"
        )
        if transfer.error:
            raise SnapshotError(transfer.error)
        return Restored(
            names=tuple(transfer.names), failed=MappingProxyType(dict(transfer.problems))
        )

    async def _file_exchange(
        self,
        requests: Callable[[int, str], list[pb.FileRequest]],
        path: str,
        timeout: float | None,
        *,
        limit: int,
    ) -> _FileReply:
        """One file operation (SandboxFiles): send its requests, collect the
        runner's replies; the reply's error raises SandboxFileError."""

        def request(lease: Lease, transfer: _FileReply) -> list[pb.ControllerMessage]:
            chunk = min(files.CHUNK_BYTES, lease.limits.max_message_bytes - ENVELOPE_BYTES)
            return [
                pb.ControllerMessage(file_request=message)
                for message in requests(chunk, transfer.request_id)
            ]

        def transfer(lease: Lease) -> _FileReply:
            return _FileReply(path, limit)

        reply = await self._exchange(
            transfer, request, timeout, f"a file operation on {path}", error=SandboxFileError
        )
        return reply

    async def _exchange(
        self,
        make: Callable[[Lease], _T],
        request: Callable[[Lease, _T], list[pb.ControllerMessage]],
        timeout: float | None,
        doing: str,
        *,
        error: type[SandboxError] = SnapshotError,
    ) -> _T:
        """Send ``request``'s messages and wait until the transfer ``make``
        returns has all the runner's answers, with run()'s locking, timeout
        and crash handling."""
        async with self._lock:
            lease = await self._live_lease()
            timeout = lease.limits.timeout_seconds if timeout is None else timeout
            transfer = self._transfer = make(lease)
            try:
                for message in request(lease, transfer):
                    lease.connection.send(message)
                await asyncio.wait_for(asyncio.shield(transfer.done), timeout)
            except TimeoutError:
                # The runner cannot be interrupted inside pickle: replace it.
                await self._drop(lease)
                raise error(
                    f"{doing} did not finish within {timeout:g} s and was stopped. The "
                    "sandbox was replaced with a fresh one: variables from earlier runs "
                    "are gone."
                ) from None
            except _ChannelLost as lost:
                raise await self._crashed(lease, None, str(lost), doing=doing) from None
            except asyncio.CancelledError:
                self._drop(lease)
                raise
            finally:
                self._transfer = None
            return transfer

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
            artifacts=tuple(execution.artifacts),
            artifacts_dropped=execution.artifacts_dropped + max(0, msg.artifacts_dropped),
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
        await self._drop(lease)
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

    async def _crashed(
        self,
        lease: Lease,
        execution: _Execution | None,
        reason: str,
        *,
        doing: str = "running code",
    ) -> SandboxCrashed:
        assert self._runtime is not None
        try:
            state = await self._runtime.stopped_state(lease)
        except SandboxError:  # the engine itself is gone: say so, after letting go
            await self._drop(lease)
            raise
        await self._drop(lease)
        stdout = execution.text(pb.STREAM_STDOUT)[0] if execution is not None else ""
        stderr = execution.text(pb.STREAM_STDERR)[0] if execution is not None else ""
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
            f"the sandbox stopped while {doing} (exit code {code}; {reason}). {fresh}",
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
        )

    def _drop(self, lease: Lease) -> asyncio.Task[None]:
        """Stop using ``lease``: cancel its tool calls and start removing its
        container. Returns the removal, to await where waiting is allowed
        (not while being cancelled)."""
        if self._lease is lease:
            self._lease = None
        for task in list(self._calls):
            task.cancel()
        assert self._runtime is not None  # a lease comes from the runtime
        removal = self._runtime.release(lease)
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        return removal

    # messages from the runner ------------------------------------------------

    def _on_message(self, message: pb.RunnerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind in ("snapshot_chunk", "restore_result", "file_reply"):
            transfer = self._transfer
            if transfer is not None and transfer.kind == kind:
                transfer.add(getattr(message, kind))
            return
        execution = self._execution
        if execution is None:
            return  # nothing is running: late output or calls from leftover threads
        if kind == "output":
            if message.output.exec_id == execution.exec_id:
                execution.add_output(message.output.stream, message.output.data)
        elif kind == "artifact":
            if message.artifact.exec_id == execution.exec_id:
                execution.add_artifact(message.artifact)
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
        if self._lease is not lease:
            return
        execution, transfer = self._execution, self._transfer
        if execution is not None and not execution.done.done():
            execution.done.set_exception(_ChannelLost(reason))
        if transfer is not None and not transfer.done.done():
            transfer.done.set_exception(_ChannelLost(reason))


class _ChannelLost(Exception):
    pass
