"""The controller API's codec: each ``controller.proto`` message and its Python
shape, both directions, in one place.

The server (:mod:`legion.server.service`) encodes with the ``*_message`` and
``*_json`` functions; the client (:mod:`legion.client`) decodes with the
others, and encodes its requests' JSON here too. The Python shapes a client
gets back (:class:`AgentInfo`, :class:`SandboxInfo`, :class:`RemoteEvent`,
:class:`legion.RunResult`) are defined here or in :mod:`legion._results`.

Nothing here imports agents, sandboxes or models: ``import legion.client``
needs none of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from . import errors
from ._proto import controller_pb2 as pb
from ._results import RunResult, Usage
from .errors import LegionError, UsageError
from .telemetry import Event

__all__ = [
    "CLIPPED_VALUE",
    "MAX_EVENT_DATA",
    "AgentInfo",
    "RemoteEvent",
    "SandboxInfo",
    "agent_info",
    "agent_message",
    "answer_json",
    "answer_of",
    "approval_message",
    "config_json",
    "config_of",
    "data_json",
    "error_message",
    "event_message",
    "file_messages",
    "files_of",
    "remote_event",
    "result_message",
    "run_error",
    "run_result",
    "sandbox_info",
    "sandbox_message",
    "to_json",
    "usage_message",
    "usage_of",
]

MAX_EVENT_DATA = 256 * 1024
"""Characters of one event's ``data_json``; bigger values are clipped."""
CLIPPED_VALUE = 4096
"""Characters kept of each field of an event whose data is over :data:`MAX_EVENT_DATA`."""


# --- the Python shapes ----------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteEvent(Event):
    """A telemetry event of a run on the server."""

    conversation_id: str = ""
    """The long-lived conversation the run is a turn of; empty for single runs."""


@dataclass(frozen=True)
class AgentInfo:
    """An agent the server offers."""

    name: str
    description: str
    tools: list[str]
    """``Name.function`` (or ``name`` for a plain function) for each thing its code may call."""
    output_schema: dict[str, Any] | None
    """The JSON Schema its answer follows; None when it answers in text."""
    system_prompt: str = ""
    """The system prompt its runs on the server use."""
    image: str = ""
    """The sandbox image its code runs in (an environment's name, or a tag)."""
    packages: list[str] = dataclasses.field(default_factory=list)
    """``name version`` of each package that image has beyond the standard library."""


@dataclass(frozen=True)
class SandboxInfo:
    """One of the caller's live sandboxes on the server."""

    container_id: str
    run_id: str
    agent: str
    age_seconds: float
    memory_bytes: int
    """In use now; 0 when unknown (as are the figures below)."""
    memory_limit_bytes: int = 0
    cpus: float = 0.0
    pids: int = 0
    """Its limits: memory (swap included), CPUs, processes."""
    cpu_seconds: float = 0.0
    """CPU time it has used since it started."""
    peak_memory_bytes: int = 0
    """The most memory it has used (0 where the engine does not say: cgroup v2)."""


# --- JSON text ------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def to_json(value: Any) -> str:
    """JSON text for any value; what JSON cannot hold goes as its repr."""
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def _loads(text: str, default: Any) -> Any:
    """What the other side sent, leniently: ``default`` for nothing or garbage."""
    if not text:
        return default
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return default


def _why(exc: Exception) -> str:
    """Why JSON did not parse (a RecursionError means nested too deeply)."""
    return "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def data_json(data: Mapping[str, Any]) -> str:
    """An event's data as JSON, each field clipped when the whole is over
    :data:`MAX_EVENT_DATA` (the data then carries ``"truncated": true``)."""
    text = to_json(dict(data))
    if len(text) <= MAX_EVENT_DATA:
        return text
    clipped: dict[str, Any] = {"truncated": True}
    for key, value in data.items():
        item = to_json(value)
        clipped[key] = value if len(item) <= CLIPPED_VALUE else item[:CLIPPED_VALUE] + "..."
    return to_json(clipped)


# --- requests: config_json and answer_json --------------------------------------------------


def config_json(config: Mapping[str, Any]) -> str:
    """A request's ``config_json``: AgentConfig keys, or empty for none."""
    try:
        return json.dumps(config) if config else ""
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config values must be JSON: {exc}") from None


def config_of(text: str) -> dict[str, Any]:
    """The AgentConfig keys a request's ``config_json`` holds (empty: none).
    Raises UsageError saying what is wrong with it."""
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"config_json is not valid JSON: {_why(exc)}") from None
    if not isinstance(config, dict):
        raise UsageError('config_json must be a JSON object, e.g. {"max_iterations": 3}')
    return config


def answer_json(answer: Any) -> str:
    """A human request's answer (any JSON value) as ``answer_json``."""
    try:
        return json.dumps(answer)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the answer must be JSON data: {exc}") from None


def answer_of(text: str) -> Any:
    """The answer ``answer_json`` holds. Raises UsageError when it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(
            f'answer_json must be JSON (e.g. "yes", with the quotes): {_why(exc)}'
        ) from None


def approval_message(ref: str, *, approved: bool, reason: str) -> pb.RespondApprovalRequest:
    """A decision on the held tool call ``ref``, as ``RespondApproval`` takes it."""
    if not isinstance(approved, bool):
        raise UsageError(f"approved must be True or False, not {approved!r}")
    if not isinstance(ref, str) or not isinstance(reason, str):
        raise UsageError("an approval's ref and reason are strings")
    return pb.RespondApprovalRequest(ref=ref, approved=approved, reason=reason)


# --- Usage ------------------------------------------------------------------------------------


def usage_message(usage: Usage | None) -> pb.Usage:
    if not isinstance(usage, Usage):
        return pb.Usage()
    message = pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        requests=usage.requests,
        tool_calls=usage.tool_calls,
        sandbox_seconds=usage.sandbox_seconds,
    )
    if usage.cost_usd is not None:
        message.cost_usd = usage.cost_usd
    return message


def usage_of(message: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        total_tokens=message.total_tokens,
        cost_usd=message.cost_usd if message.HasField("cost_usd") else None,
        requests=message.requests,
        tool_calls=message.tool_calls,
        sandbox_seconds=message.sandbox_seconds,
    )


# --- RunResult --------------------------------------------------------------------------------


def file_messages(files: Mapping[str, bytes | str] | None) -> list[pb.FileData]:
    """Files (name -> bytes, or str as UTF-8) as FileData messages."""
    return [
        pb.FileData(name=name, data=data.encode("utf-8") if isinstance(data, str) else data)
        for name, data in (files or {}).items()
    ]


def files_of(messages: Iterable[pb.FileData]) -> dict[str, bytes]:
    """FileData messages as name -> bytes (a later name wins)."""
    return {message.name: bytes(message.data) for message in messages}


def result_message(result: RunResult) -> pb.RunResult:
    return pb.RunResult(
        run_id=result.run_id,
        output_json=to_json(result.output),
        iterations=result.iterations,
        usage=usage_message(result.usage),
        messages_json=to_json(result.messages),
        files=file_messages(result.files),
        files_note=result.files_note,
    )


def run_result(message: pb.RunResult) -> RunResult:
    """A RunResult message as :class:`legion.RunResult`."""
    return RunResult(
        output=_loads(message.output_json, None),
        iterations=message.iterations,
        usage=usage_of(message.usage),
        run_id=message.run_id,
        messages=_loads(message.messages_json, []),
        files=files_of(message.files),
        files_note=message.files_note,
    )


# --- RunError ---------------------------------------------------------------------------------


def error_message(exc: BaseException, run_id: str) -> pb.RunError:
    """How a run that started and failed ends its stream."""
    if isinstance(exc, errors.RunError):
        message = pb.RunError(
            run_id=exc.run_id or run_id,
            type=type(exc).__name__,
            message=str(exc),
            iterations=exc.iterations,
            usage=usage_message(exc.usage),
            messages_json=to_json(exc.messages),
        )
        if isinstance(exc, errors.UsageLimitExceeded):
            _budget_fields(exc, message)
        return message
    return pb.RunError(run_id=run_id, type=type(exc).__name__, message=str(exc) or repr(exc))


def _budget_fields(exc: errors.UsageLimitExceeded, message: pb.RunError) -> None:
    """Which budget ``exc`` spent, and whose, into ``message``."""
    message.limit = exc.limit
    message.scope = exc.scope
    for name in ("allowed", "used"):
        value = getattr(exc, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(message, name, float(value))
    if isinstance(exc.counted, Usage):
        message.counted.CopyFrom(usage_message(exc.counted))


def _figure(message: pb.RunError, name: str) -> float | None:
    """A budget figure as sent; a count (tokens, calls, MiB) as an int again."""
    if not message.HasField(name):
        return None
    value: float = getattr(message, name)
    measured = "cost" in message.limit or "seconds" in message.limit
    return int(value) if value.is_integer() and not measured else value


def _error_types() -> dict[str, type[LegionError]]:
    found: dict[str, type[LegionError]] = {}
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, (errors.RunError, errors.SandboxError)):
            found[name] = value
    return found


_RUN_ERROR_TYPES = _error_types()


def run_error(message: pb.RunError) -> LegionError:
    """A RunError message as the exception an embedded run would have raised,
    carrying ``run_id``, ``iterations``, ``usage`` and ``messages`` (and, for
    :class:`legion.UsageLimitExceeded`, ``limit``, ``allowed``, ``used``,
    ``scope`` and ``counted``)."""
    usage = usage_of(message.usage)
    history = _loads(message.messages_json, [])
    kind = _RUN_ERROR_TYPES.get(message.type)
    if kind is errors.UsageLimitExceeded:
        return errors.UsageLimitExceeded(
            message.message,
            run_id=message.run_id,
            messages=history,
            usage=usage,
            iterations=message.iterations,
            limit=message.limit,
            allowed=_figure(message, "allowed"),
            used=_figure(message, "used"),
            scope=message.scope,
            counted=usage_of(message.counted) if message.HasField("counted") else None,
        )
    if kind is not None and issubclass(kind, errors.RunError):
        return kind(
            message.message,
            run_id=message.run_id,
            messages=history,
            usage=usage,
            iterations=message.iterations,
        )
    exc: LegionError
    if kind is not None:
        exc = kind(message.message)
    elif message.type == "UsageError":
        exc = UsageError(message.message)
    else:
        exc = errors.RunError(
            f"{message.type}: {message.message}" if message.type else message.message,
            run_id=message.run_id,
            messages=history,
            usage=usage,
            iterations=message.iterations,
        )
        return exc
    exc.run_id = message.run_id  # type: ignore[attr-defined]
    exc.messages = history  # type: ignore[attr-defined]
    exc.usage = usage  # type: ignore[attr-defined]
    exc.iterations = message.iterations  # type: ignore[attr-defined]
    return exc


# --- Event ------------------------------------------------------------------------------------


def event_message(event: Event, conversation_id: str) -> pb.Event:
    return pb.Event(
        name=event.name,
        run_id=event.run_id or "",
        parent_run_id=event.parent_run_id or "",
        time=event.time,
        data_json=data_json(event.data),
        conversation_id=conversation_id,
    )


def remote_event(message: pb.Event) -> RemoteEvent:
    data = _loads(message.data_json, {})
    return RemoteEvent(
        name=message.name,
        run_id=message.run_id or None,
        parent_run_id=message.parent_run_id or None,
        time=message.time,
        data=data if isinstance(data, dict) else {"value": data},
        conversation_id=message.conversation_id,
    )


# --- AgentInfo --------------------------------------------------------------------------------


def agent_message(info: AgentInfo) -> pb.AgentInfo:
    return pb.AgentInfo(
        name=info.name,
        description=info.description,
        tools=info.tools,
        output_schema_json=to_json(info.output_schema) if info.output_schema is not None else "",
        system_prompt=info.system_prompt,
        image=info.image,
        packages=info.packages,
    )


def agent_info(message: pb.AgentInfo) -> AgentInfo:
    return AgentInfo(
        name=message.name,
        description=message.description,
        tools=list(message.tools),
        output_schema=_loads(message.output_schema_json, None),
        system_prompt=message.system_prompt,
        image=message.image,
        packages=list(message.packages),
    )


# --- SandboxInfo ------------------------------------------------------------------------------


def sandbox_message(info: SandboxInfo) -> pb.SandboxInfo:
    return pb.SandboxInfo(**dataclasses.asdict(info))


def sandbox_info(message: pb.SandboxInfo) -> SandboxInfo:
    return SandboxInfo(
        **{f.name: getattr(message, f.name) for f in dataclasses.fields(SandboxInfo)}
    )
