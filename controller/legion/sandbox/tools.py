"""Host-side tools: what sandbox code may call, checked and run on the controller.

A tool is a plain function, a class whose public methods are the functions (an
instance is made with no arguments when a method needs ``self``), an instance,
or a module (its public functions, or ``__all__``). The sandbox only ever gets
names, signatures and docstrings; the functions run here, with the caller's
vault, their arguments validated against the real signature by pydantic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import json
import math
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pydantic

from .. import telemetry
from .._proto import sandbox_pb2 as pb
from ..errors import UsageError
from . import _codec
from .channel import ENVELOPE_BYTES


@dataclass(frozen=True)
class ToolFunction:
    name: str
    signature: str
    doc: str
    call: Callable[..., Any] = field(repr=False)
    is_async: bool
    positional: tuple[str, ...] = ()
    """Names of the parameters that can be passed by position, in order."""
    timeout: float | None = None
    """Seconds a call may take; None: the sandbox's ``tool_timeout_seconds``;
    ``math.inf``: the function keeps its own time (see :func:`own_timeout`)."""
    approval: ApprovalGate | None = None
    """Held for a person's approval before each call (``legion.human.requires_approval``)."""


class ApprovalGate(Protocol):
    """What holds a call until a person approves it (``legion.tool.Approval``)."""

    async def hold(
        self, *, tool: str, function: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[str, str] | None:
        """None once approved; else the error type and message the code gets."""
        ...


def own_timeout(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a tool function that enforces its own time limit (waiting for a
    human, running a sub-agent), so the per-call tool timeout does not cut it."""
    fn.__legion_timeout__ = math.inf  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class ToolDef:
    """One tool as sandbox code sees it: ``Name.function(...)``, or ``name(...)``."""

    name: str
    doc: str
    functions: Mapping[str, ToolFunction]
    is_function: bool = False
    sandbox_source: str = ""
    """Python that defines more of the tool's functions inside the sandbox
    (from the object's ``_legion_sandbox_source``); they call the host ones."""

    def spec(self) -> pb.ToolSpec:
        return pb.ToolSpec(
            name=self.name,
            doc=self.doc,
            is_function=self.is_function,
            sandbox_source=self.sandbox_source,
            functions=[
                pb.FunctionSpec(name=f.name, signature=f.signature, doc=f.doc)
                for f in self.functions.values()
            ],
        )


def _function(name: str, fn: Callable[..., Any], *, label: str) -> ToolFunction:
    try:
        signature = str(inspect.signature(fn, eval_str=True))
    except (NameError, TypeError, ValueError, SyntaxError):
        try:
            signature = str(inspect.signature(fn))
        except (TypeError, ValueError):
            signature = "(*args, **kwargs)"
    try:
        positional = tuple(
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
    except (TypeError, ValueError):
        positional = ()
    unwrapped = inspect.unwrap(fn)
    is_async = inspect.iscoroutinefunction(unwrapped)
    try:
        validated = pydantic.validate_call(
            config=pydantic.ConfigDict(arbitrary_types_allowed=True)
        )(fn)
    except (pydantic.PydanticUserError, TypeError) as exc:
        raise UsageError(
            f"tool function {label}: its signature cannot be validated ({exc}); "
            f"annotate its parameters with JSON-compatible types"
        ) from exc
    return ToolFunction(
        name=name,
        signature=signature,
        doc=inspect.getdoc(fn) or "",
        call=validated,
        is_async=is_async,
        positional=positional,
        timeout=getattr(fn, "__legion_timeout__", None),
        approval=getattr(fn, "__legion_approval__", None),
    )


def _public_methods(obj: Any, owner: type) -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for klass in reversed(owner.__mro__[:-1]):  # every base but object
        for name, attr in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
                found[name] = getattr(obj, name)
    return found


def _check_name(name: str) -> str:
    if not name.isidentifier() or name.startswith("_"):
        raise UsageError(f"tool name {name!r} is not a public Python identifier; pass name=...")
    return name


def tool_from(obj: Any, *, name: str | None = None) -> ToolDef:
    """Describe ``obj`` as a tool; raises UsageError saying how to fix a bad one."""
    if isinstance(obj, ToolDef):
        return obj
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj):
        tool_name = _check_name(name or obj.__name__)
        fn = _function("", obj, label=tool_name)
        return ToolDef(name=tool_name, doc=fn.doc, functions={"": fn}, is_function=True)
    if isinstance(obj, types.ModuleType):
        tool_name = name or obj.__name__.rsplit(".", 1)[-1]
        names = getattr(obj, "__all__", None) or [
            n
            for n, v in vars(obj).items()
            if not n.startswith("_")
            and callable(v)
            and getattr(v, "__module__", None) == obj.__name__
            and not isinstance(v, type)
        ]
        members = {n: getattr(obj, n) for n in names}
    elif isinstance(obj, type):
        tool_name = name or obj.__name__
        needs_self = any(
            inspect.isfunction(a)
            for k in obj.__mro__[:-1]
            for n, a in vars(k).items()
            if not n.startswith("_")
        )
        instance: Any = obj
        if needs_self:
            try:
                instance = obj()
            except TypeError as exc:
                raise UsageError(
                    f"tool {tool_name}: its methods need an instance and {tool_name}() failed "
                    f"({exc}); pass an instance instead of the class"
                ) from exc
        members = _public_methods(instance, obj)
    else:
        tool_name = name or type(obj).__name__
        members = _public_methods(obj, type(obj))
    _check_name(tool_name)
    if not members:
        raise UsageError(
            f"tool {tool_name} has no public functions to call: define a method "
            f"whose name does not start with '_' (or list them in __all__)"
        )
    functions = {n: _function(n, fn, label=f"{tool_name}.{n}") for n, fn in members.items()}
    doc = inspect.getdoc(obj) if not isinstance(obj, types.ModuleType) else (obj.__doc__ or "")
    return ToolDef(
        name=tool_name,
        doc=(doc or "").strip(),
        functions=functions,
        sandbox_source=getattr(obj, "_legion_sandbox_source", ""),
    )


def is_tool_source(obj: Any) -> bool:
    """Whether ``obj`` learns its tools when connected (an MCP server): it has
    ``name``, ``resolved`` (a ToolDef, or None until then) and ``async resolve()``."""
    return bool(getattr(type(obj), "__legion_tool_source__", False))


def toolset(tools: Iterable[Any]) -> dict[str, ToolDef]:
    """ToolDefs by name; a tool source not yet connected is left out (its
    owner resolves it, e.g. ``Sandbox.start``)."""
    out: dict[str, ToolDef] = {}
    for obj in tools:
        if is_tool_source(obj):
            if obj.resolved is None:
                continue
            tool = obj.resolved
        else:
            tool = tool_from(obj)
        if tool.name in out:
            raise UsageError(f"two tools are named {tool.name!r}; tool names must be unique")
        out[tool.name] = tool
    return out


_TOOL_THREADS = 64
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _tool_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for sync tools. Not asyncio's default executor: that has
    cpu_count + 4 threads, fewer than the tool calls one sandbox may have in
    flight, and blocking tools must not starve the rest of the program."""
    global _executor  # noqa: PLW0603 - one pool per process, made on first use
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_TOOL_THREADS, thread_name_prefix="legion-tool"
        )
    return _executor


def _in_thread(work: Callable[[], Any]) -> asyncio.Future[Any]:
    """``work()`` on a tool thread; its outcome as a future of the running loop.
    What ``loop.run_in_executor`` does, with one wake-up of the loop and no
    chained concurrent future (it is on every sync tool call's path)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, outcome: Any) -> None:
        if future.cancelled():
            return
        if ok:
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    def run() -> None:
        try:
            outcome, ok = work(), True
        except BaseException as exc:  # handed to the caller's loop
            outcome, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, ok, outcome)

    _tool_executor().submit(run)
    return future


RateLimitMode = Literal["wait", "fail"]
RATE_LIMIT_MODES: tuple[RateLimitMode, ...] = ("wait", "fail")
"""What a tool call over the rate does (``SandboxLimits.tool_rate_limit_mode``):
wait for its turn, or fail at once with ``ToolRateLimited``."""


class _RateLimit:
    """A token bucket: ``rate`` calls a second, bursts of up to ``rate`` (at least 1).

    Waiting calls reserve their turn in the order they ask (the bucket goes
    below zero by one token per waiter), so they are served first come, first
    served, and their turns never come faster than ``rate``.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)  # below 1, a full bucket could never pay for a call
        self._tokens = self.burst
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Take a token now, if there is one."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def reserve(self, longest: float) -> float | None:
        """Reserve the next turn; the seconds until it comes. None, and nothing
        reserved, when it is more than ``longest`` seconds away."""
        self._refill()
        wait = max(0.0, (1 - self._tokens) / self.rate)
        if wait > longest:
            return None
        self._tokens -= 1
        return wait


MAX_QUEUED_CALLS = 1024
"""Tool calls of one sandbox waiting for a slot or in one; a call past it
fails at once with ``ToolRateLimited``. However many calls sandbox code
sends at once (threads, ``.map``, ``asyncio.gather``, or a hostile runner),
the controller holds no more than this many for it."""

MAX_ERROR_MESSAGE = 16 * 1024
"""A tool's error message is cut to this many characters: it must fit in a
message under the smallest allowed limit, and a model gains nothing past it."""


def _error(call_id: str, type_name: str, message: str) -> pb.ToolResult:
    if len(message) > MAX_ERROR_MESSAGE:
        cut = len(message) - MAX_ERROR_MESSAGE
        message = f"{message[:MAX_ERROR_MESSAGE]}\n[... {cut} characters cut ...]"
    return pb.ToolResult(call_id=call_id, error=pb.ToolError(type=type_name[:200], message=message))


def _describe_validation(exc: pydantic.ValidationError, fn: ToolFunction) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        path = list(err.get("loc", ()))
        if path and isinstance(path[0], int) and path[0] < len(fn.positional):
            path[0] = fn.positional[path[0]]  # validate_call names positional args by index
        loc = ".".join(str(p) for p in path)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


class ToolDispatcher:
    """Serves one sandbox's ToolCalls: allowlist, arguments, caps, then the real call.

    ``rate_mode`` says what a call over ``rate`` calls a second does:
    ``"wait"`` for its turn (at most ``timeout`` seconds; a longer wait fails
    at once with ``ToolRateLimited``), or ``"fail"`` at once.
    """

    def __init__(
        self,
        tools: Mapping[str, ToolDef],
        *,
        timeout: float,
        max_concurrent: int,
        rate: float,
        max_message: int,
        rate_mode: RateLimitMode = "wait",
    ) -> None:
        if rate_mode not in RATE_LIMIT_MODES:
            raise UsageError(
                f"tool rate limit mode must be one of {', '.join(map(repr, RATE_LIMIT_MODES))}, "
                f"got {rate_mode!r}"
            )
        self.tools = tools
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrent)
        self._queued = 0  # calls waiting for a slot or holding one
        self._rate = _RateLimit(rate)
        self._rate_mode = rate_mode
        self._max_message = max_message

    async def handle(self, call: pb.ToolCall, context: contextvars.Context) -> pb.ToolResult:
        label = f"{call.tool}.{call.function}" if call.function else call.tool
        tool = self.tools.get(call.tool)
        fn = tool.functions.get(call.function or "") if tool is not None else None
        if tool is None or fn is None:
            allowed = (
                ", ".join(
                    sorted(
                        t.name if t.is_function else f"{t.name}.{f}"
                        for t in self.tools.values()
                        for f in t.functions
                    )
                )
                or "none"
            )
            return _error(
                call.call_id,
                "ToolNotAllowed",
                f"{label} is not a tool this sandbox may call (allowed: {allowed})",
            )
        try:
            args = json.loads(call.args_json or "[]")
            kwargs = json.loads(call.kwargs_json or "{}")
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError("expected a JSON array and a JSON object")
        except ValueError as exc:
            return _error(call.call_id, "ToolArgumentError", f"{label}: malformed arguments: {exc}")
        if fn.approval is not None:  # held outside the slots: a person may take minutes
            gate = fn.approval.hold(
                tool=call.tool, function=call.function, args=args, kwargs=kwargs
            )
            withheld = await asyncio.create_task(gate, context=context.copy())
            if withheld is not None:
                return _error(call.call_id, *withheld)
        traced = telemetry.active()
        extra = (  # what a trace shows, as the sandbox sent it; skipped when nobody listens
            {
                "call_id": call.call_id[:100],
                "args": telemetry.excerpt(call.args_json or "[]"),
                "kwargs": telemetry.excerpt(call.kwargs_json or "{}"),
            }
            if traced
            else {}
        )
        if self._queued >= MAX_QUEUED_CALLS:
            return _error(
                call.call_id,
                "ToolRateLimited",
                f"{label}: {MAX_QUEUED_CALLS} tool calls of this sandbox are already waiting "
                "or running; wait for some results before making more (Tool.function.map and "
                "the async stubs keep 64 in flight)",
            )
        self._queued += 1
        try:
            async with self._slots:
                # The turn is taken with a concurrency slot held, so calls start at
                # most at the rate: taken before, calls queued behind a slow one
                # would all start at once when it ends. Holding the slot cannot
                # deadlock: the wait is a timer, bounded, never another call.
                refused = await self._await_turn(call.call_id, label)
                if refused is not None:
                    return refused
                with telemetry.span(
                    telemetry.TOOL_CALL, tool=call.tool, function=call.function, **extra
                ) as stop:
                    result = await self._invoke(
                        call.call_id, label, fn, args=args, kwargs=kwargs, context=context
                    )
                    if result.WhichOneof("outcome") == "error":
                        stop["error"] = f"{result.error.type}: {result.error.message[:200]}"
                    elif traced:
                        stop["result"] = telemetry.excerpt(result.value.json or result.value.repr)
                return result
        finally:
            self._queued -= 1

    async def _await_turn(self, call_id: str, label: str) -> pb.ToolResult | None:
        """Wait for this call's turn under the rate; the error when it gets none."""
        rate = self._rate
        if self._rate_mode == "fail":
            if rate.take():
                return None
            return _error(
                call_id,
                "ToolRateLimited",
                f"{label}: more than {rate.rate:g} tool calls a second "
                f"(SandboxLimits.tool_rate_limit_mode='fail')",
            )
        wait = rate.reserve(self._timeout)
        if wait is None:
            return _error(
                call_id,
                "ToolRateLimited",
                f"{label}: over the rate of {rate.rate:g} tool calls a second, this call "
                f"would wait longer than the tool timeout ({self._timeout:g} s) for its "
                f"turn; make fewer calls at once, or raise "
                f"SandboxLimits.tool_calls_per_second",
            )
        if wait > 0:
            await asyncio.sleep(wait)
        return None

    async def _invoke(
        self,
        call_id: str,
        label: str,
        fn: ToolFunction,
        *,
        args: list[Any],
        kwargs: dict[str, Any],
        context: contextvars.Context,
    ) -> pb.ToolResult:
        # Each call gets its own copy: one Context cannot be entered by two
        # threads at once, and a tool must not leak changes into the caller's.
        ctx = context.copy()
        timeout = self._timeout if fn.timeout is None else fn.timeout
        limit = None if math.isinf(timeout) else timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if fn.is_async:
                    value = await asyncio.create_task(fn.call(*args, **kwargs), context=ctx)
                else:
                    value = await _in_thread(functools.partial(ctx.run, fn.call, *args, **kwargs))
        except pydantic.ValidationError as exc:
            return _error(
                call_id,
                "ToolArgumentError",
                f"{label}{fn.signature}: {_describe_validation(exc, fn)}",
            )
        except TimeoutError as exc:
            if deadline.expired():
                return _error(
                    call_id, "ToolTimeout", f"{label} did not answer within {timeout:g} s"
                )
            return _error(call_id, "TimeoutError", str(exc) or "TimeoutError")  # the tool's own
        except Exception as exc:
            # The type name and message only: a host traceback would show the
            # sandbox host paths and code it has no business seeing.
            return _error(call_id, type(exc).__name__, str(exc) or type(exc).__name__)
        encoded = _codec.encode(value)
        size = _codec.payload_size(encoded)
        if size > self._max_message - ENVELOPE_BYTES:
            return _error(
                call_id,
                "MessageTooLarge",
                f"{label} returned {size} bytes; a tool result may be at most "
                f"{self._max_message - ENVELOPE_BYTES} bytes",
            )
        return pb.ToolResult(call_id=call_id, value=encoded)
