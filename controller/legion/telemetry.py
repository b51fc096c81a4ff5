"""Events from runs, model requests, code steps and tool calls.

Every event carries the ``run_id`` of the run it belongs to and the
``parent_run_id`` of the run that started that one (sub-agents), so a trace can
be rebuilt from the stream alone.

    >>> from legion import telemetry
    >>> seen = []
    >>> unsubscribe = telemetry.subscribe(seen.append)
    >>> ...                      # run agents
    >>> unsubscribe()

Event names: ``run.start|stop|exception``, ``iteration.start|stop``,
``llm.request.start|stop|exception``, ``sandbox.eval.start|stop``,
``tool.call.start|stop``. ``*.stop`` events carry ``duration`` (seconds).

When anyone is subscribed, events also carry what a trace shows, as text cut
to :data:`EXCERPT_CHARS` characters (with a marker saying how much was cut):
``run.stop`` the ``output``; ``llm.request`` the ``prompt`` (the last user
message) and, on ``stop``, the model's ``reply``; ``sandbox.eval.stop`` the
code's ``stdout``, ``stderr`` and ``value`` (JSON, or the repr); ``tool.call``
the ``call_id``, the ``args`` and ``kwargs`` as the sandbox sent them (JSON)
and, on ``stop``, the ``result`` (JSON, or the repr). These are what the
sandbox and the model saw; the vault never is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._log import get_logger

__all__ = ["EXCERPT_CHARS", "Event", "active", "excerpt", "span", "subscribe"]

log = get_logger("legion.telemetry")


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


def active() -> bool:
    """Whether any handler is subscribed: costly event fields are made only then."""
    return bool(_handlers)


EXCERPT_CHARS = 4000
"""Characters of text (prompts, replies, output, tool arguments) an event carries."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... {len(text) - limit} more characters cut ...]"


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


@contextlib.contextmanager
def span(name: str, **data: Any) -> Iterator[dict[str, Any]]:
    """Emit ``name.start``, then ``name.stop`` (or ``name.exception``) with the
    duration. Fields added to the yielded dict go on the stop event."""
    emit(f"{name}.start", **data)
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
                f"{name}.exception",
                **data,
                duration=time.perf_counter() - started,
                error=f"{type(exc).__name__}: {exc}",
            )
            raise
        emit(f"{name}.stop", **data, **extra, duration=time.perf_counter() - started)


def _otel_attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    run_id, parent = _run.get()
    attrs = {f"legion.{k}": v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
    if run_id:
        attrs["legion.run_id"] = run_id
    if parent:
        attrs["legion.parent_run_id"] = parent
    return attrs
