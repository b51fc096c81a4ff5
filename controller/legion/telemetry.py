"""Events from runs, model requests, code steps and tool calls.

Every event carries the ``run_id`` of the run it belongs to and the
``parent_run_id`` of the run that started that one (sub-agents), so a trace can
be rebuilt from the stream alone.

    >>> from legion import telemetry
    >>> seen = []
    >>> unsubscribe = telemetry.subscribe(seen.append)
    >>> ...                      # run agents
    >>> unsubscribe()

Event names are the constants below (``telemetry.RUN_START`` is
``"run.start"``...), and README.md lists them with what each carries. A span
(``run``, ``iteration``, ``llm.request``, ``sandbox.eval``, ``tool.call``)
emits ``NAME.start``, then ``NAME.stop`` or ``NAME.exception``; those two
carry ``duration`` (seconds). Producers and consumers both use the
constants: a name is spelled once.

When anyone is subscribed, events also carry what a trace shows, as text cut
to :data:`EXCERPT_CHARS` characters (with a marker saying how much was cut):
``run.stop`` the ``output``; ``llm.request`` the ``prompt`` (the last user
message) and, on ``stop``, the model's ``reply``; ``llm.delta`` that reply as
it streams in; ``sandbox.eval.stop`` the
code's ``stdout``, ``stderr`` and ``value`` (JSON, or the repr); ``tool.call``
the ``call_id``, the ``args`` and ``kwargs`` as the sandbox sent them (JSON)
and, on ``stop``, the ``result`` (JSON, or the repr); ``sandbox.output`` what
running code prints, as it prints it. These are what the sandbox and the model
saw; the vault never is.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._log import get_logger
from .errors import UsageError

__all__ = [
    "EVENTS",
    "EXCERPT_CHARS",
    "Event",
    "active",
    "excerpt",
    "log_events",
    "span",
    "subscribe",
]

log = get_logger("legion.telemetry")


# --- event names ----------------------------------------------------------------------------

# Spans: see span().
RUN = "run"
"""A run of an agent: ``agent``, ``task``; on stop ``iterations``, ``usage``, ``output``."""
ITERATION = "iteration"
"""One code step of a run: ``index``, ``complete``."""
LLM_REQUEST = "llm.request"
"""One model call: ``model``, ``messages``, ``prompt``; on stop ``usage``, ``reply``."""
SANDBOX_EVAL = "sandbox.eval"
"""Code run in a sandbox: ``code``; on stop ``success``, ``timed_out``, ``error``,
``stdout``, ``stderr``, ``value``."""
TOOL_CALL = "tool.call"
"""A tool call from sandbox code: ``tool``, ``function``, ``call_id``, ``args``,
``kwargs``; on stop ``result`` or ``error``."""

SANDBOX_OUTPUT = "sandbox.output"
"""Output of code that is still running, as it arrives (only while someone is
subscribed): ``stream`` (``"stdout"`` or ``"stderr"``) and ``text``, one chunk
cut to :data:`EXCERPT_CHARS`. A ``sandbox.eval``'s chunks come before its stop
event and, uncut, add up to the ``stdout`` and ``stderr`` its result keeps."""

LLM_DELTA = "llm.delta"
"""Text of a model reply as it streams in (only while someone is subscribed, and
only from models that stream: :class:`legion.models.LiteLLMModel`): ``text``,
the characters that arrived since the previous delta, and ``attempt`` (1, or
the retry of the request they belong to). They come before the request's
``llm.request.stop``, and those of the attempt that answered add up to that
event's ``reply``: at most
:data:`EXCERPT_CHARS` characters of text, then (when the reply was longer) one
last delta with the marker that says how much was cut."""


def _span_events(span: str) -> tuple[str, str, str]:
    return f"{span}.start", f"{span}.stop", f"{span}.exception"


RUN_START, RUN_STOP, RUN_EXCEPTION = _span_events(RUN)
ITERATION_START, ITERATION_STOP, ITERATION_EXCEPTION = _span_events(ITERATION)
LLM_REQUEST_START, LLM_REQUEST_STOP, LLM_REQUEST_EXCEPTION = _span_events(LLM_REQUEST)
SANDBOX_EVAL_START, SANDBOX_EVAL_STOP, SANDBOX_EVAL_EXCEPTION = _span_events(SANDBOX_EVAL)
TOOL_CALL_START, TOOL_CALL_STOP, TOOL_CALL_EXCEPTION = _span_events(TOOL_CALL)

HUMAN_REQUEST = "human.request"
"""Sandbox code asks a person: ``ref``, ``agent``, ``question``, ``meta``."""
HUMAN_RESPONSE = "human.response"
"""The question ``ref`` was answered."""
HUMAN_TIMEOUT = "human.timeout"
"""Nobody answered the question ``ref`` within ``timeout`` seconds."""
TOOL_APPROVAL = "tool.approval"
"""A tool call waits for a person's approval: ``ref``, ``agent``, ``tool``,
``function``, ``args``, ``kwargs``, ``approvers``, ``timeout``."""
TOOL_APPROVAL_DECISION = "tool.approval.decision"
"""The held call ``ref`` was decided: ``approvers``, ``approved``, ``reason``, ``principal``."""
TOOL_APPROVAL_TIMEOUT = "tool.approval.timeout"
"""Nobody decided the held call ``ref`` within ``timeout`` seconds: ``approvers``."""

TURN_START = "turn.start"
"""A long-lived agent's turn begins: ``conversation_id``, ``turn_id``, ``agent``."""
TURN_RESULT = "turn.result"
"""The turn answered: the same fields and ``output``."""
TURN_ERROR = "turn.error"
"""The turn failed: the same fields and ``error``."""

CONVERSATION_START = "conversation.start"
"""A long-lived agent started or resumed: ``conversation_id``, ``agent``, ``turns``."""
CONVERSATION_STOP = "conversation.stop"
"""A long-lived agent stopped: ``conversation_id``, ``agent``."""
CONVERSATION_RESTORE = "conversation.restore"
"""Variables of earlier turns loaded into a fresh sandbox: ``conversation_id``,
``names``, ``lost``."""
CONVERSATION_RECLAIM = "conversation.reclaim"
"""An idle conversation's sandbox was snapshotted and removed: ``conversation_id``."""

EVENTS: tuple[str, ...] = (
    RUN_START,
    RUN_STOP,
    RUN_EXCEPTION,
    ITERATION_START,
    ITERATION_STOP,
    ITERATION_EXCEPTION,
    LLM_REQUEST_START,
    LLM_REQUEST_STOP,
    LLM_REQUEST_EXCEPTION,
    LLM_DELTA,
    SANDBOX_EVAL_START,
    SANDBOX_EVAL_STOP,
    SANDBOX_EVAL_EXCEPTION,
    SANDBOX_OUTPUT,
    TOOL_CALL_START,
    TOOL_CALL_STOP,
    TOOL_CALL_EXCEPTION,
    HUMAN_REQUEST,
    HUMAN_RESPONSE,
    HUMAN_TIMEOUT,
    TOOL_APPROVAL,
    TOOL_APPROVAL_DECISION,
    TOOL_APPROVAL_TIMEOUT,
    TURN_START,
    TURN_RESULT,
    TURN_ERROR,
    CONVERSATION_START,
    CONVERSATION_STOP,
    CONVERSATION_RESTORE,
    CONVERSATION_RECLAIM,
)
"""Every event name Legion emits."""


@dataclass(frozen=True)
class Event:
    name: str
    run_id: str | None
    parent_run_id: str | None
    time: float
    """Wall-clock time (seconds since the epoch)."""
    data: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[[Event], None]
_handlers: list[Handler] = []
_run: ContextVar[tuple[str | None, str | None]] = ContextVar("legion_run", default=(None, None))


def subscribe(handler: Handler) -> Callable[[], None]:
    """Call ``handler`` with every event; returns a function that unsubscribes."""
    _handlers.append(handler)

    def unsubscribe() -> None:
        with contextlib.suppress(ValueError):
            _handlers.remove(handler)

    return unsubscribe


# --- log_events: one log line per event ----------------------------------------


def log_events(
    level: int | str = logging.INFO,
    *,
    logger: logging.Logger | str = "legion.events",
    value_chars: int = 200,
) -> Callable[[], None]:
    """Log every event as one line, at ``level``, to ``logger`` (a stdlib
    logger or its name); returns a function that stops it. Each field's value
    is cut to ``value_chars`` characters::

        legion.telemetry.log_events()        # with logging configured, e.g. basicConfig
        # INFO legion.events run.stop run=3f2a9c01 agent='Echo' iterations=1 duration=0.41 ...
    """
    if isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise UsageError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = named
    target = logging.getLogger(logger) if isinstance(logger, str) else logger

    def line(event: Event) -> None:
        if not target.isEnabledFor(level):
            return
        parts = [event.name]
        if event.run_id:
            parts.append(f"run={event.run_id[:8]}")
        if event.parent_run_id:
            parts.append(f"parent={event.parent_run_id[:8]}")
        for key, value in event.data.items():
            shown = f"{value:.2f}" if isinstance(value, float) else repr(value)
            if len(shown) > value_chars:
                shown = f"{shown[:value_chars]}...({len(shown) - value_chars} more)"
            parts.append(f"{key}={shown}")
        target.log(level, " ".join(parts))

    return subscribe(line)


def active() -> bool:
    """Whether any handler is subscribed: costly event fields are made only then."""
    return bool(_handlers)


EXCERPT_CHARS = 4000
"""Characters of text (prompts, replies, output, tool arguments) an event carries."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + cut_marker(len(text) - limit)


def cut_marker(cut: int) -> str:
    """What :func:`excerpt` puts after the text it keeps when ``cut`` characters went."""
    return f"\n[... {cut} more characters cut ...]"


def current_run() -> tuple[str | None, str | None]:
    """(run_id, parent_run_id) of the run this code is part of."""
    return _run.get()


@contextlib.contextmanager
def run_context(run_id: str, parent_run_id: str | None) -> Iterator[None]:
    token = _run.set((run_id, parent_run_id))
    try:
        yield
    finally:
        _run.reset(token)


def emit(name: str, **data: Any) -> None:
    if not _handlers:
        return
    run_id, parent = _run.get()
    event = Event(name, run_id, parent, time.time(), MappingProxyType(data))
    for handler in list(_handlers):
        try:
            handler(event)
        except Exception as exc:
            log.warning("telemetry_handler_failed", handler=repr(handler), error=repr(exc))


try:  # pragma: no cover - exercised only where OpenTelemetry is installed
    from opentelemetry import trace as _otel_trace

    _tracer: Any = _otel_trace.get_tracer("legion")
except ImportError:
    _tracer = None


class _QuietSpan:
    """What :func:`span` is when nobody listens and no tracer is installed:
    no events to make, so nothing to time (the tool-call hot path)."""

    __slots__ = ()

    def __enter__(self) -> dict[str, Any]:
        return {}

    def __exit__(self, *exc: object) -> None:
        return None


_QUIET = _QuietSpan()


def span(name: str, **data: Any) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """Emit ``name.start``, then ``name.stop`` (or ``name.exception``) with the
    duration. Fields added to the yielded dict go on the stop event."""
    if not _handlers and _tracer is None:
        return _QUIET
    return _span(name, **data)


@contextlib.contextmanager
def _span(name: str, **data: Any) -> Iterator[dict[str, Any]]:
    start, stop, exception = _span_events(name)
    emit(start, **data)
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    otel = (
        _tracer.start_as_current_span(name, attributes=_otel_attributes(data))
        if _tracer
        else (contextlib.nullcontext())
    )
    with otel:
        try:
            yield extra
        except BaseException as exc:
            emit(
                exception,
                **data,
                duration=time.perf_counter() - started,
                error=f"{type(exc).__name__}: {exc}",
            )
            raise
        emit(stop, **data, **extra, duration=time.perf_counter() - started)


def _otel_attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    run_id, parent = _run.get()
    attrs = {f"legion.{k}": v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
    if run_id:
        attrs["legion.run_id"] = run_id
    if parent:
        attrs["legion.parent_run_id"] = parent
    return attrs
