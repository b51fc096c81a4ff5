"""Pieces of the in-container runner that need no container: JSON at the
boundary, typed tool errors, bounded output capture."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sandbox_image"))
from legion_runner import runner


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"a": [1, 2.5, None, True]}, "json"),
        ({1, 2}, "json"),
        (datetime.date(2026, 1, 2), "json"),
        (object(), "repr"),
        (b"bytes", "repr"),
        (float("nan"), "repr"),
    ],
)
def test_values_cross_as_json_or_marked_repr(value: Any, kind: str) -> None:
    assert runner.encode_value(value).WhichOneof("kind") == kind


def test_hostile_repr_does_not_break_encoding() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    encoded = runner.encode_value(Hostile())
    assert "repr() raised RuntimeError" in encoded.repr


def test_tool_errors_subclass_the_builtin_of_the_same_name() -> None:
    key_error = runner.tool_error_class("KeyError")
    assert issubclass(key_error, KeyError) and issubclass(key_error, runner.ToolError)
    custom = runner.tool_error_class("InsufficientFunds")
    assert custom.__name__ == "InsufficientFunds" and issubclass(custom, runner.ToolError)
    assert runner.tool_error_class("InsufficientFunds") is custom
    assert runner.tool_error_class("ToolNotAllowed") is runner.ToolNotAllowed


class _Sink:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


def test_capture_keeps_the_limit_and_counts_the_rest() -> None:
    sink = _Sink()
    capture = runner._Capture(sink, runner.pb.STREAM_STDOUT)  # type: ignore[arg-type]
    capture.start("e1", limit=10)
    capture.write("hello ")
    capture.write("world, and more")
    dropped = capture.finish()
    data = b"".join(m.output.data for m in sink.sent)
    assert data == b"hello worl"
    assert dropped == len("d, and more")
    capture.write("between executions")  # dropped silently, nothing sent
    assert b"".join(m.output.data for m in sink.sent) == b"hello worl"


def test_capture_sends_large_output_in_chunks() -> None:
    sink = _Sink()
    capture = runner._Capture(sink, runner.pb.STREAM_STDERR)  # type: ignore[arg-type]
    capture.start("e2", limit=1_000_000)
    capture.write("y" * 200_000)
    capture.finish()
    sizes = [len(m.output.data) for m in sink.sent]
    assert sum(sizes) == 200_000 and max(sizes) <= 64 * 1024
    assert all(m.output.exec_id == "e2" for m in sink.sent)
