"""Pieces of the in-container runner that need no container: JSON at the
boundary, typed tool errors, bounded output capture."""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sandbox_image"))
from legion_runner import runner, snapshot


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


# --- namespace snapshots (legion_runner.snapshot) -----------------------------


def _sandbox_namespace(code: str) -> dict[str, Any]:
    """A namespace as sandbox code leaves it (its module is ``__main__``)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(code, namespace)
    return namespace


def _no_refs(reference: tuple[str, ...]) -> Any:
    raise LookupError(f"no reference {reference}")


def test_snapshot_round_trips_data_and_reimports_modules() -> None:
    namespace = _sandbox_namespace(
        "import os.path as osp\nimport json\n"
        "data = {'n': 1, 'f': 2.5, 's': 'é', 'b': b'\\x00', 'set': {1, 2}, 'nest': [(1, None)]}"
    )
    saved = snapshot.save(namespace, max_bytes=1 << 20)
    assert saved.names == ["osp", "json", "data"]
    assert saved.skipped == {}
    into: dict[str, Any] = {}
    loaded = snapshot.load(saved.blob, into, resolve=_no_refs)
    assert loaded.names == ["osp", "json", "data"] and loaded.failed == {}
    assert into["data"] == namespace["data"]
    assert into["osp"] is os.path and into["json"] is json


def test_snapshot_skips_what_sandbox_code_defined_with_reasons() -> None:
    namespace = _sandbox_namespace(
        "class Point:\n    pass\n"
        "def f():\n    pass\n"
        "p = Point()\nnested = {'k': [Point()]}\nlam = lambda: 1\n"
        "gen = (i for i in range(2))\nkept = 1\n"
    )
    saved = snapshot.save(namespace, max_bytes=1 << 20)
    assert saved.names == ["kept"]
    assert saved.skipped == {
        "Point": "a class defined in sandbox code: define it again",
        "f": "a function defined in sandbox code: define it again",
        "p": "an instance of Point, a class defined in sandbox code: define the class and "
        "create it again",
        "nested": "it holds an instance of Point, a class defined in sandbox code: define the "
        "class and create it again",
        "lam": "a function defined in sandbox code: define it again",
        "gen": "a generator: create it again (its progress cannot be saved)",
    }


def test_snapshot_leaves_out_what_the_runner_put_there() -> None:
    stub = runner.ToolStub("Calc", "")
    namespace = {"__builtins__": {}, "Calc": stub, "ToolError": runner.ToolError, "x": 1}
    saved = snapshot.save(
        namespace, max_bytes=1 << 20, exclude={"Calc": stub, "ToolError": runner.ToolError}
    )
    assert saved.names == ["x"] and saved.skipped == {}


def test_tools_are_saved_as_references_resolved_on_load() -> None:
    stub = runner.ToolStub("Calc", "")
    namespace = {"alias": stub, "in_list": [stub]}
    saved = snapshot.save(namespace, max_bytes=1 << 20, refs={id(stub): ("tool", "Calc", "")})
    other = runner.ToolStub("Calc", "")
    into: dict[str, Any] = {}
    loaded = snapshot.load(saved.blob, into, resolve=lambda ref: other)
    assert loaded.names == ["alias", "in_list"]
    assert into["alias"] is other and into["in_list"][0] is other
    missing = snapshot.load(saved.blob, {}, resolve=_no_refs)
    assert missing.names == [] and set(missing.failed) == {"alias", "in_list"}
    assert "LookupError: no reference ('tool', 'Calc', '')" in missing.failed["alias"]


def test_snapshot_drops_the_largest_values_first_until_it_fits() -> None:
    mib = 1 << 20
    namespace = {
        "small": random.randbytes(300 * 1024),
        "huge": random.randbytes(3 * mib),  # over the limit on its own
        "large": random.randbytes(500 * 1024),
        "medium": random.randbytes(400 * 1024),
        "tiny": 1,
    }
    saved = snapshot.save(namespace, max_bytes=mib)
    assert len(saved.blob) <= mib
    assert saved.names == ["small", "medium", "tiny"]
    assert saved.skipped["huge"] == "too large: 3.0 MiB (limit 1 MiB)"
    assert saved.skipped["large"].startswith("too large: 500.")
    assert saved.skipped["large"].endswith("(limit 1 MiB for the whole snapshot)")
    assert list(saved.skipped) == ["huge", "large"]  # in namespace order


def test_odd_names_are_listed_not_saved() -> None:
    namespace = {"ok": 1, "not a name": 2, "\ud800": 3, 7: "not a str"}
    saved = snapshot.save(namespace, max_bytes=1 << 20)
    assert saved.names == ["ok"]
    assert saved.skipped == {
        "'not a name'": "not a Python identifier",
        "'\\ud800'": "not a Python identifier",
    }


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (b"", "not a Legion namespace snapshot"),
        (b"\x80\x05garbage", "not a Legion namespace snapshot"),
        (snapshot.MAGIC, "truncated or damaged"),
        (snapshot.pack({"x": b"abc"})[:-1], "truncated or damaged"),
        (snapshot.pack({"x": b"abc"}) + b"extra", "truncated or damaged"),
    ],
)
def test_blobs_that_are_not_whole_snapshots_load_nothing(blob: bytes, problem: str) -> None:
    into: dict[str, Any] = {}
    with pytest.raises(snapshot.SnapshotFormatError, match=problem):
        snapshot.load(blob, into, resolve=_no_refs)
    assert into == {}


def test_a_damaged_entry_fails_alone() -> None:
    good = snapshot.save({"a": 1, "b": 2}, max_bytes=1 << 20).blob
    records = dict(snapshot.unpack(good))
    records["a"] = b"not zlib"
    records["__builtins__"] = records["b"]
    into: dict[str, Any] = {}
    loaded = snapshot.load(snapshot.pack(records), into, resolve=_no_refs)
    assert loaded.names == ["b"] and into == {"b": 2}
    assert loaded.failed["a"].startswith("cannot be loaded: error: Error -3")
    assert loaded.failed["__builtins__"] == "a reserved name"


def test_snapshot_messages_fit_the_budget() -> None:
    names = [f"name_{i}" for i in range(5000)]
    saved = snapshot.Saved(
        blob=b"x" * 150_000, names=names, skipped={f"s{i}": "why " * 20 for i in range(500)}
    )
    budget = 60 * 1024
    messages = list(runner.snapshot_messages("r1", saved, "", budget))
    assert all(m.ByteSize() <= budget + 64 for m in messages)
    assert [m.last for m in messages] == [False] * (len(messages) - 1) + [True]
    assert b"".join(m.chunk for m in messages) == saved.blob
    assert [n for m in messages for n in m.names] == names
    assert {s.name: s.reason for m in messages for s in m.skipped} == saved.skipped
    assert len(messages) > 4  # the blob took three pieces, the names more than one
    loaded = snapshot.Loaded(names=names, failed={"f": "why"})
    results = list(runner.restore_messages("r2", loaded, "", 16 * 1024))
    assert len(results) > 1 and results[-1].last and not results[0].last
    assert [n for m in results for n in m.names] == names


def test_error_text_with_a_lone_surrogate_still_reaches_the_controller() -> None:
    # Protobuf refuses lone surrogates; such an error once killed the worker.
    worker = runner.Runner("unused", "token", max_message=1 << 20)
    worker._execute(runner.pb.Execute(exec_id="e", code="raise ValueError('\\ud800')"))
    message = worker._outbox.get_nowait()
    assert message is not None
    assert message.execute_result.error.type == "ValueError"
    assert message.execute_result.error.message == "?"
