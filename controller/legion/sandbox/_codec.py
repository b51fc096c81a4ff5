"""JSON at the sandbox boundary. Never pickle: a value JSON cannot carry
crosses as its repr, marked as such."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

from .._proto import sandbox_pb2 as pb


def encode(value: Any) -> pb.Value:
    """pydantic-compatible JSON (models, dataclasses, datetimes, sets...), else repr."""
    try:
        return pb.Value(json=pydantic_core.to_json(value).decode())
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError, RecursionError):
        try:
            text = repr(value)
        except Exception as exc:
            text = f"<{type(value).__name__} object; repr() raised {type(exc).__name__}>"
        return pb.Value(repr=text)


def payload_size(value: pb.Value) -> int:
    return len((value.json or value.repr).encode())


def decode(value: pb.Value) -> tuple[Any, str | None]:
    """(the JSON value, None), or (None, the repr) for a value JSON could not carry."""
    kind = value.WhichOneof("kind")
    if kind == "repr":
        return None, value.repr
    if kind == "json":
        return json.loads(value.json), None
    return None, None
