"""The process inside a sandbox container.

It reads its boot file (its only argument: where to dial, and a one-time
token), dials the controller, says Hello with the token, then executes code
in one persistent namespace, one Execute at a time, on a worker thread. The
receiving thread stays free to deliver tool results and Cancel while code
runs. Snapshots of the namespace and restores of one (legion_runner.snapshot)
take their turn on the same worker thread, never beside code.

Imports only the standard library, grpcio, protobuf and the generated stubs:
the image stays small and offers sandbox code little to work with.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import linecache
import os
import queue
import resource
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc

from . import artifacts as _artifacts
from . import files as _files
from . import snapshot as _snapshot
from ._proto import sandbox_pb2 as pb
from ._proto import sandbox_pb2_grpc as pb_grpc

RUNNER_VERSION = "1"
# Room for the envelope around a payload (ids, field tags) within one message.
_ENVELOPE = 4096
_OUTPUT_CHUNK = 64 * 1024
_OUTPUT_FLUSH_SECONDS = 0.1
_RUNNER_DIR = os.path.dirname(os.path.abspath(__file__))
# An error must always fit in one message, however large the smallest
# allowed message limit (64 KiB) and whatever the code raised.
_MAX_ERROR_MESSAGE = 16 * 1024
_MAX_TRACEBACK = 32 * 1024
# Snapshot blobs cross the channel in pieces of at most this size.
_SNAPSHOT_CHUNK = 1024 * 1024


# --- errors raised inside sandbox code -------------------------------------


class ToolError(Exception):
    """A tool call failed on the host. ``type_name`` is the host-side error type."""

    type_name = "ToolError"

    def __init__(self, message: str, *, tool: str = "", function: str = "") -> None:
        super().__init__(message)
        self.tool = tool
        self.function = function


class ToolNotAllowed(ToolError):
    """The tool or function is not on this sandbox's allowlist."""


class ToolArgumentError(ToolError, TypeError):
    """The arguments do not fit the tool's signature."""


class ToolTimeout(ToolError, TimeoutError):
    """The tool did not answer within its time limit."""


class MessageTooLarge(ToolError, ValueError):
    """A payload is larger than one channel message may carry."""


class ExecutionCancelled(BaseException):
    """Raised inside running code when the controller cancels it.

    A BaseException so that ``except Exception`` in sandbox code does not
    swallow it.
    """


_CATEGORIES: dict[str, type[ToolError]] = {
    cls.__name__: cls
    for cls in (ToolError, ToolNotAllowed, ToolArgumentError, ToolTimeout, MessageTooLarge)
}
_error_classes: dict[str, type[ToolError]] = dict(_CATEGORIES)


def tool_error_class(type_name: str) -> type[ToolError]:
    """A ToolError subclass named like the host's error, also a subclass of the
    builtin exception of that name when there is one, so ``except ValueError``
    catches a tool's ValueError."""
    cls = _error_classes.get(type_name)
    if cls is not None:
        return cls
    bases: tuple[type, ...] = (ToolError,)
    builtin = getattr(builtins, type_name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        bases = (ToolError, builtin)
    try:
        cls = type(type_name, bases, {"type_name": type_name, "__module__": "tools"})
    except (TypeError, ValueError):  # instance lay-out conflict, odd names
        cls = type("ToolError", (ToolError,), {"type_name": type_name, "__module__": "tools"})
    _error_classes[type_name] = cls
    return cls


class HostRepr(str):
    """A host value JSON could not carry: the text is the value's repr."""

    def __repr__(self) -> str:
        return str(self)


# --- JSON at the boundary ---------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return list(value)
    # A value of one of these types exists only if its module was imported:
    # look each up where it lives rather than importing it at start.
    modules = sys.modules
    if (dt := modules.get("datetime")) is not None:
        if isinstance(value, (dt.datetime, dt.date, dt.time)):
            return value.isoformat()
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
    if (dec := modules.get("decimal")) is not None and isinstance(value, dec.Decimal):
        return str(value)
    if (en := modules.get("enum")) is not None and isinstance(value, en.Enum):
        return value.value
    if (pl := modules.get("pathlib")) is not None and isinstance(value, pl.PurePath):
        return str(value)
    dc = modules.get("dataclasses")
    if dc is not None and dc.is_dataclass(value) and not isinstance(value, type):
        return dc.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, allow_nan=False, ensure_ascii=False)


def safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<{type(value).__name__} object; repr() raised {type(exc).__name__}>"


def encode_value(value: Any) -> pb.Value:
    try:
        return pb.Value(json=to_json(value))
    except (TypeError, ValueError, RecursionError):
        return pb.Value(repr=safe_repr(value))


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- output capture ---------------------------------------------------------


class _Capture:
    """Replaces sys.stdout/sys.stderr. Keeps at most the current execution's
    limit of bytes, sends them in chunks, and counts what it drops."""

    def __init__(self, runner: Runner, stream: pb.Stream) -> None:
        self._runner = runner
        self._stream = stream
        self._lock = threading.Lock()
        self._buf: list[bytes] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        # Output held back (written within the interval of the last flush)
        # goes when the interval is up, even if the code writes nothing more.
        self._held = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self.exec_id = ""
        self.limit = 0
        self.kept = 0
        self.dropped = 0

    encoding = "utf-8"
    errors = "replace"

    def start(self, exec_id: str, limit: int) -> None:
        with self._lock:
            self.exec_id, self.limit, self.kept, self.dropped = exec_id, limit, 0, 0
            self._buf, self._buffered = [], 0

    def finish(self) -> int:
        """Flush and stop capturing; return the number of bytes dropped."""
        with self._lock:
            self._flush_locked()
            self.exec_id = ""
            return self.dropped

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            if not self.exec_id:
                return len(text)  # a leftover thread between executions
            room = self.limit - self.kept
            if room <= 0:
                self.dropped += len(text)
                return len(text)
            # Never encode the whole text: a huge print must not double its
            # memory inside a capped container. Past the limit, characters
            # are counted, not encoded.
            head = text[:room]
            data = head.encode("utf-8", "replace")[:room]
            self.dropped += len(text) - len(head)
            self.kept += len(data)
            self._buf.append(data)
            self._buffered += len(data)
            now = time.monotonic()
            if self._buffered >= _OUTPUT_CHUNK or now - self._last_flush >= _OUTPUT_FLUSH_SECONDS:
                self._flush_locked()
            else:
                self._wake_flusher()
        return len(text)

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            flusher = threading.Thread(target=self._flush_held, name="legion-output", daemon=True)
            try:
                flusher.start()
            except RuntimeError:
                return  # no thread to be had (pids limit): held output goes at the next write
            self._flusher = flusher
        self._held.notify()

    def _flush_held(self) -> None:
        with self._lock:
            while True:
                if not self._buffered:
                    self._held.wait()
                    continue
                wait = self._last_flush + _OUTPUT_FLUSH_SECONDS - time.monotonic()
                if wait > 0:
                    self._held.wait(wait)
                    continue
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        data = b"".join(self._buf)
        self._buf, self._buffered = [], 0
        for start in range(0, len(data), _OUTPUT_CHUNK):
            self._runner.send(
                pb.RunnerMessage(
                    output=pb.Output(
                        exec_id=self.exec_id,
                        stream=self._stream,
                        data=data[start : start + _OUTPUT_CHUNK],
                    )
                )
            )

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("sandbox output is captured; it has no file descriptor")


# --- tool stubs --------------------------------------------------------------


class _PendingCall:
    """A tool call sent and not yet answered. A blocking call waits on
    ``event``; a call of ``.map`` or an async stub is told through
    ``on_done``, on the receiving thread."""

    __slots__ = ("event", "exec_id", "on_done", "result")

    def __init__(self, exec_id: str, on_done: Callable[[_PendingCall], None] | None = None) -> None:
        self.event = threading.Event() if on_done is None else None
        self.exec_id = exec_id
        self.on_done = on_done
        self.result: pb.ToolResult | None = None

    def settle(self, result: pb.ToolResult | None) -> None:
        """The answer, or None when the execution was cancelled."""
        self.result = result
        if self.event is not None:
            self.event.set()
        elif self.on_done is not None:
            with contextlib.suppress(Exception):  # e.g. the code's event loop closed: nobody waits
                self.on_done(self)


# Calls of one ``.map``, or async calls of one event loop, in flight at once.
# The controller serves ``max_concurrent_tool_calls`` of them at a time; the
# window only keeps a huge fan-out from queueing everything on the host.
_FANOUT_WINDOW = 64


class ToolStub:
    """Stands in for a host tool. Each function sends a ToolCall and waits;
    ``Tool.afunction`` is its async form (see :func:`_make_function`)."""

    def __init__(self, name: str, doc: str) -> None:
        self.__name__ = name
        self.__doc__ = doc

    def __repr__(self) -> str:
        return f"<tool {self.__name__}>"


def _make_function(runner: Runner, tool: str, fn: pb.FunctionSpec) -> Callable[..., Any]:
    """The stub of one host function: ``f(...)`` calls it and waits;
    ``f.map(items)`` calls it once per item, concurrently; ``await f.aio(...)``
    calls it without blocking the code's event loop."""
    function = fn.name

    def call(*args: Any, **kwargs: Any) -> Any:
        return runner.call_tool(tool, function, args, kwargs)

    def map(*iterables: Iterable[Any], return_exceptions: bool = False) -> list[Any]:
        return runner.map_tool(tool, function, iterables, return_exceptions=return_exceptions)

    async def aio(*args: Any, **kwargs: Any) -> Any:
        return await runner.call_tool_async(tool, function, args, kwargs)

    qualified = f"{tool}.{function}" if function else tool
    call.__name__ = function or tool
    call.__qualname__ = qualified
    call.__doc__ = f"{qualified}{fn.signature}\n\n{fn.doc}".rstrip()
    map.__name__, map.__qualname__ = "map", f"{qualified}.map"
    map.__doc__ = (
        f"{qualified}.map(items, ...) -> list: {qualified}(item) for each item, run "
        "concurrently on the host, results in the order of the items. Several iterables "
        "give several positional arguments, as the builtin map (same lengths). A failed "
        "call raises its error once all have ended (the first failed item's); with "
        "return_exceptions=True the error takes the item's place in the list instead."
    )
    aio.__name__, aio.__qualname__ = "aio", f"{qualified}.aio"
    aio.__doc__ = (
        f"await {qualified}.aio(...): {qualified}(...) without blocking the event loop, "
        "for asyncio.gather and friends."
    )
    call.map = map  # type: ignore[attr-defined]
    call.aio = aio  # type: ignore[attr-defined]
    return call


# --- the runner --------------------------------------------------------------


def _sandbox_helpers(stub: ToolStub, spec: pb.ToolSpec) -> dict[str, Any]:
    """Run a tool's sandbox-side source with its functions in scope; the
    public functions it defines join the tool (e.g. a pipeline that takes
    callables, which cannot cross to the host)."""
    if not spec.sandbox_source:
        return {}
    filename = f"<tool {spec.name}>"
    source = spec.sandbox_source
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope: dict[str, Any] = {"__builtins__": builtins, "__name__": f"legion_tool_{spec.name}"}
    scope.update({fn.name: getattr(stub, fn.name) for fn in spec.functions})
    before = set(scope)
    exec(compile(source, filename, "exec"), scope)
    return {
        name: value
        for name, value in scope.items()
        if name not in before and not name.startswith("_") and callable(value)
    }


def _strip_runner_frames(exc: BaseException) -> str:
    te = traceback.TracebackException.from_exception(exc, capture_locals=False)
    for part in _chain(te):
        part.stack = traceback.StackSummary.from_list(
            [f for f in part.stack if not f.filename.startswith(_RUNNER_DIR)]
        )
    return "".join(te.format())


def _chain(te: traceback.TracebackException) -> Iterator[traceback.TracebackException]:
    seen: set[int] = set()
    cur: traceback.TracebackException | None = te
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


class Runner:
    def __init__(self, address: str, token: str, *, max_message: int) -> None:
        self._address = address
        self._token = token
        self._max_message = max_message
        self._outbox: queue.SimpleQueue[pb.RunnerMessage | None] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[pb.ControllerMessage] = queue.SimpleQueue()
        self._pending: dict[str, _PendingCall] = {}
        self._lock = threading.Lock()
        # Each event loop of sandbox code -> its window of async tool calls.
        self._windows: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._tools: dict[str, Any] = {}
        # id() of each tool stub and tool function -> (tool, function): a
        # snapshot saves these as references to the tool, not as objects.
        self._tool_refs: dict[int, tuple[str, ...]] = {}
        self._namespace: dict[str, Any] = {}
        self._restoring: dict[str, bytearray] = {}
        self._current_exec = ""
        self._worker: threading.Thread | None = None
        self._cell = 0
        self.stdout = _Capture(self, pb.STREAM_STDOUT)
        self.stderr = _Capture(self, pb.STREAM_STDERR)
        budget = min(1024 * 1024, max_message - _ENVELOPE)
        self._work_dir = _files.WorkDir(
            lambda reply: self.send(pb.RunnerMessage(file_reply=reply)), budget
        )
        self._reset_namespace()

    # outgoing ------------------------------------------------------------

    def send(self, message: pb.RunnerMessage) -> None:
        self._outbox.put(message)

    def _outgoing(self) -> Iterator[pb.RunnerMessage]:
        yield pb.RunnerMessage(
            hello=pb.Hello(
                token=self._token,
                python_version=sys.version.split()[0],
                pid=os.getpid(),
                runner_version=RUNNER_VERSION,
            )
        )
        self._token = ""  # spent: sandbox code finds no reference to it
        while True:
            message = self._outbox.get()
            if message is None:
                return
            yield message

    # main loop -------------------------------------------------------------

    def serve(self) -> None:
        options = [
            ("grpc.max_send_message_length", self._max_message + _ENVELOPE),
            ("grpc.max_receive_message_length", self._max_message + _ENVELOPE),
        ]
        channel = grpc.insecure_channel(self._address, options=options)
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.SandboxChannelStub(channel)  # type: ignore[no-untyped-call]
        self._worker = threading.Thread(target=self._work_loop, name="legion-exec", daemon=True)
        self._worker.start()
        try:
            for message in stub.Connect(self._outgoing()):
                kind = message.WhichOneof("kind")
                if kind == "tool_result":
                    self._resolve(message.tool_result)
                elif kind == "cancel":
                    self._cancel(message.cancel.exec_id)
                elif kind in ("execute", "define_tools", "snapshot", "file_request"):
                    self._work.put(message)
                elif kind == "restore":
                    self._receive_restore(message.restore)
        except grpc.RpcError:
            pass  # the controller closed the stream: the sandbox is being torn down
        finally:
            self._outbox.put(None)

    def _resolve(self, result: pb.ToolResult) -> None:
        with self._lock:
            pending = self._pending.pop(result.call_id, None)
        if pending is not None:
            pending.settle(result)

    def _cancel(self, exec_id: str) -> None:
        with self._lock:
            if exec_id != self._current_exec or self._worker is None:
                return
            waiting = [k for k, p in self._pending.items() if p.exec_id == exec_id]
            for call_id in waiting:
                pending = self._pending.pop(call_id)
                pending.settle(None)  # the waiter raises ExecutionCancelled
            ident = self._worker.ident
        if ident is not None:
            import ctypes  # noqa: PLC0415 - only when code must be stopped, not at start

            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(ExecutionCancelled)
            )

    # execution ---------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            message = self._work.get()
            try:
                kind = message.WhichOneof("kind")
                if kind == "define_tools":
                    self._define_tools(message.define_tools)
                elif kind == "snapshot":
                    self._snapshot(message.snapshot)
                elif kind == "restore":
                    self._restore(message.restore)
                elif kind == "file_request":
                    self._work_dir.handle(message.file_request)
                else:
                    self._execute(message.execute)
            except ExecutionCancelled:
                pass  # a Cancel that arrived just as the execution ended

    def _reset_namespace(self) -> None:
        self._namespace = {"__name__": "__main__", "__builtins__": builtins}
        self._namespace.update(_CATEGORIES)
        self._namespace.update(self._tools)

    def _define_tools(self, message: pb.DefineTools) -> None:
        tools: dict[str, Any] = {}
        refs: dict[int, tuple[str, ...]] = {}
        for spec in message.tools:
            if spec.is_function:
                tools[spec.name] = _make_function(
                    self,
                    spec.name,
                    pb.FunctionSpec(
                        name="",
                        signature=spec.functions[0].signature if spec.functions else "()",
                        doc=spec.doc,
                    ),
                )
                refs[id(tools[spec.name])] = ("tool", spec.name, "")
                continue
            stub = ToolStub(spec.name, spec.doc)
            refs[id(stub)] = ("tool", spec.name, "")
            names = {fn.name for fn in spec.functions}
            for fn in spec.functions:
                function = _make_function(self, spec.name, fn)
                setattr(stub, fn.name, function)
                refs[id(function)] = ("tool", spec.name, fn.name)
                if f"a{fn.name}" not in names:  # a host function of that name wins
                    setattr(stub, f"a{fn.name}", function.aio)  # type: ignore[attr-defined]
                    refs[id(function.aio)] = ("tool", spec.name, f"a{fn.name}")  # type: ignore[attr-defined]
            for name, helper in _sandbox_helpers(stub, spec).items():
                setattr(stub, name, helper)
                refs[id(helper)] = ("tool", spec.name, name)
            tools[spec.name] = stub
        self._tools = tools
        self._tool_refs = refs
        self._namespace.update(tools)

    def _execute(self, request: pb.Execute) -> None:
        if request.reset_namespace:
            self._reset_namespace()
        limit = max(0, request.output_limit_bytes)
        self.stdout.start(request.exec_id, limit)
        self.stderr.start(request.exec_id, limit)
        result = pb.ExecuteResult(exec_id=request.exec_id)
        before = resource.getrusage(resource.RUSAGE_SELF)
        _artifacts.current.begin(self._max_message - _ENVELOPE)
        with self._lock:
            self._current_exec = request.exec_id
        try:
            try:
                has_value, value = self._run_code(request.code)
                # A figure or an image comes back as a picture, not its repr.
                if has_value and not _artifacts.add_value(value):
                    result.value.CopyFrom(self._encode_result(value))
                    result.has_value = True
            except ExecutionCancelled:
                result.cancelled = True
                result.error.CopyFrom(
                    pb.ExecError(
                        type="Cancelled", message="execution was cancelled by the controller"
                    )
                )
            except BaseException as exc:  # SystemExit too: sandbox code must not end the runner
                result.error.CopyFrom(
                    pb.ExecError(
                        type=_snapshot.encodable(type(exc).__name__[:200]),
                        message=_snapshot.encodable(_cap(_message_of(exc), _MAX_ERROR_MESSAGE)),
                        traceback=_snapshot.encodable(
                            _cap(_strip_runner_frames(exc), _MAX_TRACEBACK, keep_end=True)
                        ),
                    )
                )
            with self._lock:
                self._current_exec = ""
        except ExecutionCancelled:  # delivered between the code's end and the line above
            result.cancelled = True
            with self._lock:
                self._current_exec = ""
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.stats.cpu_user_seconds = after.ru_utime - before.ru_utime
        result.stats.cpu_system_seconds = after.ru_stime - before.ru_stime
        result.stats.max_rss_bytes = after.ru_maxrss * 1024
        result.stdout_dropped_bytes = self.stdout.finish()
        result.stderr_dropped_bytes = self.stderr.finish()
        shown, result.artifacts_dropped = _artifacts.current.finish()
        for mime_type, data, description in shown:
            artifact = pb.Artifact(
                exec_id=request.exec_id, mime_type=mime_type, data=data, description=description
            )
            self.send(pb.RunnerMessage(artifact=artifact))
        self.send(pb.RunnerMessage(execute_result=result))

    def _run_code(self, code: str) -> tuple[bool, Any]:
        self._cell += 1
        filename = f"<cell {self._cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename, "exec")
        tail: ast.Expression | None = None
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr):
            tree.body.pop()
            tail = ast.Expression(last.value)
        exec(compile(tree, filename, "exec"), self._namespace)
        if tail is None:
            return False, None
        return True, eval(compile(tail, filename, "eval"), self._namespace)

    def _encode_result(self, value: Any) -> pb.Value:
        encoded = encode_value(value)
        text = encoded.json or encoded.repr
        if _size(text) > self._max_message - _ENVELOPE:
            raise MessageTooLarge(
                f"the value of the last expression is {_size(text)} bytes as "
                f"{encoded.WhichOneof('kind')}; a result may be at most "
                f"{self._max_message - _ENVELOPE} bytes. Return a smaller value (a summary, a "
                f"slice) or print the parts you need."
            )
        return encoded

    # snapshots -------------------------------------------------------------------

    def _snapshot(self, request: pb.Snapshot) -> None:
        error = ""
        try:
            saved = _snapshot.save(
                self._namespace,
                max_bytes=max(0, request.max_bytes),
                exclude={**_CATEGORIES, **self._tools},
                refs={**self._error_refs(), **self._tool_refs},
                work_dir=_files.WORK_DIR if request.include_files else None,
            )
        except BaseException as exc:  # sandbox code may have patched anything
            saved = _snapshot.Saved(blob=b"")
            error = _snapshot.clean(
                f"the snapshot failed: {type(exc).__name__}: {_message_of(exc)}",
                _snapshot.MAX_REASON,
            )
        for message in snapshot_messages(
            request.request_id, saved, error, self._max_message - _ENVELOPE
        ):
            self.send(pb.RunnerMessage(snapshot_chunk=message))

    def _receive_restore(self, piece: pb.Restore) -> None:
        # On the receiving thread: gather the pieces, then queue the whole
        # blob behind any code that is running.
        buf = self._restoring.setdefault(piece.request_id, bytearray())
        buf += piece.chunk
        if piece.last:
            blob = bytes(self._restoring.pop(piece.request_id))
            whole = pb.Restore(request_id=piece.request_id, chunk=blob, last=True)
            self._work.put(pb.ControllerMessage(restore=whole))

    def _restore(self, request: pb.Restore) -> None:
        try:
            loaded = _snapshot.load(
                request.chunk,
                self._namespace,
                resolve=self._resolve_ref,
                work_dir=_files.WORK_DIR,
            )
        except _snapshot.SnapshotFormatError as exc:
            loaded, error = _snapshot.Loaded(), str(exc)
        except BaseException as exc:
            loaded = _snapshot.Loaded()
            error = _snapshot.clean(
                f"the restore failed: {type(exc).__name__}: {_message_of(exc)}",
                _snapshot.MAX_REASON,
            )
        else:
            error = ""
        for message in restore_messages(
            request.request_id, loaded, error, self._max_message - _ENVELOPE
        ):
            self.send(pb.RunnerMessage(restore_result=message))

    @staticmethod
    def _error_refs() -> dict[int, tuple[str, ...]]:
        # The error classes made for tools' exceptions live in no module:
        # saved by name, made again on load.
        return {id(cls): ("error", name) for name, cls in list(_error_classes.items())}

    def _resolve_ref(self, reference: tuple[str, ...]) -> Any:
        if len(reference) == 2 and reference[0] == "error":
            return tool_error_class(reference[1])
        if len(reference) == 3 and reference[0] == "tool":
            _, tool, function = reference
            stub = self._tools.get(tool)
            if stub is None:
                raise LookupError(f"it refers to the tool {tool}, which this sandbox does not have")
            if not function:
                return stub
            found = getattr(stub, function, None)
            if found is None:
                raise LookupError(
                    f"it refers to {tool}.{function}, which this sandbox does not have"
                )
            return found
        raise LookupError(f"unknown runner reference {reference!r}")

    # tool calls ----------------------------------------------------------------

    def call_tool(
        self, tool: str, function: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call a host function and wait for its answer (``Tool.function(...)``)."""
        _, pending = self._start_call(tool, function, args, kwargs)
        assert pending.event is not None  # no on_done: a blocking call
        pending.event.wait()
        return self._outcome(pending, tool, function)

    def map_tool(
        self,
        tool: str,
        function: str,
        iterables: tuple[Iterable[Any], ...],
        *,
        return_exceptions: bool,
    ) -> list[Any]:
        """``Tool.function.map(items)``: one call per item (per tuple of
        items, from several iterables), at most ``_FANOUT_WINDOW`` in flight,
        results in order. Every item is called; then the first failed item's
        error is raised, unless ``return_exceptions`` keeps each in its place."""
        name = f"{tool}.{function}" if function else tool
        if not iterables:
            raise TypeError(f"{name}.map() takes an iterable of arguments, e.g. {name}.map(ids)")
        try:
            calls = list(zip(*iterables, strict=True))
        except ValueError:
            raise ValueError(f"{name}.map(): the iterables have different lengths") from None
        results: list[Any] = [None] * len(calls)
        answered: queue.SimpleQueue[int] = queue.SimpleQueue()
        in_flight: dict[int, _PendingCall] = {}
        sent = 0
        while sent < len(calls) or in_flight:
            while sent < len(calls) and len(in_flight) < _FANOUT_WINDOW:
                index, sent = sent, sent + 1
                try:
                    _, in_flight[index] = self._start_call(
                        tool,
                        function,
                        calls[index],
                        {},
                        on_done=lambda _, index=index: answered.put(index),  # type: ignore[misc]
                    )
                except ToolError as exc:  # arguments that cannot be sent: this item's error
                    results[index] = exc
            if not in_flight:
                continue
            index = answered.get()
            try:
                results[index] = self._outcome(in_flight.pop(index), tool, function)
            except ToolError as exc:
                results[index] = exc
        if not return_exceptions:
            failed = [i for i, r in enumerate(results) if isinstance(r, ToolError)]
            if failed:
                error: ToolError = results[failed[0]]
                error.add_note(
                    f"{name}.map: item {failed[0]} failed ({len(failed)} of {len(calls)} "
                    f"failed); {name}.map(..., return_exceptions=True) returns every result, "
                    "with each error in its item's place"
                )
                raise error
        return results

    async def call_tool_async(
        self, tool: str, function: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``await Tool.afunction(...)``: the call goes out at once and the
        receiving thread wakes the code's event loop when the answer comes,
        so other coroutines run meanwhile. At most ``_FANOUT_WINDOW`` calls
        of one loop are in flight; more wait their turn in the loop."""
        import asyncio  # noqa: PLC0415 - running coroutines have imported it already

        loop = asyncio.get_running_loop()
        with self._lock:
            window = self._windows.get(loop)
            if window is None:
                window = self._windows[loop] = asyncio.Semaphore(_FANOUT_WINDOW)
        async with window:
            answered = loop.create_future()

            def wake(_: _PendingCall) -> None:  # on the receiving thread
                loop.call_soon_threadsafe(_set_once, answered)

            call_id, pending = self._start_call(tool, function, args, kwargs, on_done=wake)
            try:
                await answered
            except BaseException:  # the awaiting task was cancelled: nobody wants the answer
                with self._lock:
                    self._pending.pop(call_id, None)
                raise
        return self._outcome(pending, tool, function)

    def _start_call(
        self,
        tool: str,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        on_done: Callable[[_PendingCall], None] | None = None,
    ) -> tuple[str, _PendingCall]:
        """Check and send one ToolCall; its id and what its answer settles."""
        name = f"{tool}.{function}" if function else tool
        exec_id = self._current_exec
        if not exec_id:
            raise RuntimeError(f"{name}: tools can only be called while sandbox code is running")
        try:
            args_json, kwargs_json = to_json(list(args)), to_json(kwargs)
        except (TypeError, ValueError) as exc:
            raise ToolArgumentError(
                f"{name}: arguments must be JSON values (str, int, float, bool, None, list, "
                f"dict): {exc}",
                tool=tool,
                function=function,
            ) from None
        size = _size(args_json) + _size(kwargs_json)
        if size > self._max_message - _ENVELOPE:
            raise MessageTooLarge(
                f"{name}: arguments are {size} bytes; a tool call may carry at most "
                f"{self._max_message - _ENVELOPE} bytes",
                tool=tool,
                function=function,
            )
        call_id = os.urandom(12).hex()
        pending = _PendingCall(exec_id, on_done)
        with self._lock:
            self._pending[call_id] = pending
        self.send(
            pb.RunnerMessage(
                tool_call=pb.ToolCall(
                    call_id=call_id,
                    exec_id=exec_id,
                    tool=tool,
                    function=function,
                    args_json=args_json,
                    kwargs_json=kwargs_json,
                )
            )
        )
        return call_id, pending

    @staticmethod
    def _outcome(pending: _PendingCall, tool: str, function: str) -> Any:
        """The answer's value, or its error raised."""
        result = pending.result
        if result is None:
            raise ExecutionCancelled()
        if result.WhichOneof("outcome") == "error":
            cls = tool_error_class(result.error.type)
            raise cls(result.error.message, tool=tool, function=function)
        if result.value.WhichOneof("kind") == "repr":
            return HostRepr(result.value.repr)
        return json.loads(result.value.json) if result.value.json else None


def _set_once(future: Any) -> None:
    if not future.done():  # not if the awaiting task was cancelled meanwhile
        future.set_result(None)


def snapshot_messages(
    request_id: str, saved: _snapshot.Saved, error: str, budget: int
) -> Iterator[pb.SnapshotChunk]:
    """A snapshot as channel messages of at most ``budget`` bytes each: the
    blob in pieces, then the names and reasons, the last one marked."""
    size = min(_SNAPSHOT_CHUNK, budget)
    pieces = list(_snapshot.chunks(saved.blob, size)) if saved.blob else []
    for piece in pieces:
        yield pb.SnapshotChunk(request_id=request_id, chunk=piece)
    yield from _name_messages(
        lambda: pb.SnapshotChunk(request_id=request_id),
        saved.names,
        saved.skipped,
        "skipped",
        error=error,
        budget=budget,
    )


def restore_messages(
    request_id: str, loaded: _snapshot.Loaded, error: str, budget: int
) -> Iterator[pb.RestoreResult]:
    """A restore's outcome as channel messages of at most ``budget`` bytes
    each, the last one marked."""
    yield from _name_messages(
        lambda: pb.RestoreResult(request_id=request_id),
        loaded.names,
        loaded.failed,
        "failed",
        error=error,
        budget=budget,
    )


def _name_messages(
    make: Callable[[], Any],
    names: Iterable[str],
    reasons: Mapping[str, str],
    reasons_field: str,
    *,
    error: str,
    budget: int,
) -> Iterator[Any]:
    """Names, then (name, reason) pairs, packed into messages of at most
    ``budget`` bytes; the last one is marked and carries ``error``."""
    message, used = make(), 0
    entries: list[tuple[str, str | None]] = [(n, None) for n in names]
    entries.extend(reasons.items())
    for name, reason in entries:
        cost = _size(name) + (8 if reason is None else _size(reason) + 16)
        if used + cost > budget:
            yield message
            message, used = make(), 0
        if reason is None:
            message.names.append(name)
        else:
            getattr(message, reasons_field).add(name=name, reason=reason)
        used += cost
    message.last = True
    message.error = error
    yield message


def _cap(text: str, limit: int, *, keep_end: bool = False) -> str:
    """At most ``limit`` characters, with a marker saying how many were cut.
    Tracebacks keep their end, where the error is."""
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    return marker + text[-limit:] if keep_end else text[:limit] + marker


def _message_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}; str() raised>"


def _read_boot(path: str) -> tuple[str, str, int]:
    """(address, token, max message bytes) from the boot file the controller
    wrote for this sandbox. The controller removes the file at Hello."""
    with open(path, "rb") as f:
        boot = json.loads(f.read())
    return str(boot["address"]), str(boot["token"]), int(boot["max_message_bytes"])


def main() -> None:
    if len(sys.argv) != 2:
        print("legion_runner: usage: python3 -m legion_runner BOOT_FILE", file=sys.__stderr__)
        sys.exit(2)
    try:
        address, token, max_message = _read_boot(sys.argv[1])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"legion_runner: cannot read the boot file: {exc!r}", file=sys.__stderr__)
        sys.exit(2)
    # Figures shown by sandbox code come back as pictures (legion_runner.mpl_backend).
    os.environ.setdefault("MPLBACKEND", "module://legion_runner.mpl_backend")
    _files.WorkDir.prepare()
    runner = Runner(address, token, max_message=max_message)
    del token
    sys.stdout = runner.stdout
    sys.stderr = runner.stderr
    runner.serve()
    # The stream is gone; daemon threads (sandbox code) must not keep us alive.
    os._exit(0)
