"""Namespace snapshots against real containers: what is saved and restored,
what is skipped and why, the size bound, chunking past the message size, bad
blobs, and that a blob is only ever unpickled inside a sandbox."""

from __future__ import annotations

import pickle
import sys
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import legion
from legion.sandbox import Restored, Snapshot, SnapshotError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sandbox_image"))
from legion_runner import snapshot as snapshot_format

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


class Calculator:
    """Arithmetic on the host."""

    def add(self, a: int, b: int) -> int:
        return a + b

    def divide(self, a: float, b: float) -> float:
        return a / b


class Payload:
    """Pickles as a call of exec(code): whoever unpickles it runs ``code``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def crafted_blob(**entries: Any) -> bytes:
    """A well-formed snapshot whose entries are pickles of our choosing, as
    hostile sandbox code could make one."""
    return snapshot_format.pack(
        {name: zlib.compress(pickle.dumps(value)) for name, value in entries.items()}
    )


@pytest.fixture
def find_class_events() -> Iterator[list[tuple[str, str]]]:
    """Every global an unpickler in this (host) process looks up meanwhile:
    the ``pickle.find_class`` audit event. Audit hooks cannot be removed, so
    the hook records only while a test holds this fixture."""
    events: list[tuple[str, str]] = []
    _recording.append(events)
    try:
        yield events
    finally:
        _recording.remove(events)


_recording: list[list[tuple[str, str]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class":
        for events in _recording:
            events.append((str(args[0]), str(args[1])))


sys.addaudithook(_audit)


DATA = """
n = 42
neg = -7
big_int = 2 ** 100
f = 2.5
s = 'héllo ✓'
empty = ''
none = None
flag = True
raw = bytes(range(256))
buf = bytearray(b'abc')
items = [1, 'two', [3.0, None]]
pair = (1, (2, 3))
tags = {30, 10, 20}
labels = {'x', 'y'}  # str hashes differ per process: checked sorted
frozen = frozenset({1, 2})
table = {'k': {'nested': [1, {2: 'x'}]}, 3: None}
"""
NAMES = ("n", "neg", "big_int", "f", "s", "empty", "none", "flag", "raw", "buf", "items", "pair",
         "tags", "labels", "frozen", "table")  # fmt: skip
ALL_REPR = "repr([" + ", ".join(n for n in NAMES if n != "labels") + "])"


async def test_data_round_trips_into_another_container(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        assert (await first.run(DATA)).ok
        expected = (await first.run(ALL_REPR)).value
        snap = await first.snapshot()
        first_id = first.container_id
    assert isinstance(snap, Snapshot) and isinstance(snap.blob, bytes)
    assert snap.names == NAMES
    assert dict(snap.skipped) == {}
    async with legion.Sandbox(runtime=runtime) as second:
        restored = await second.restore(snap.blob)
        assert second.container_id != first_id
        assert isinstance(restored, Restored)
        assert restored.names == NAMES and dict(restored.failed) == {}
        assert (await second.run(ALL_REPR)).value == expected
        types = await second.run("[type(v).__name__ for v in (raw, buf, pair, tags, frozen)]")
        assert types.value == ["bytes", "bytearray", "tuple", "set", "frozenset"]
        assert (await second.run("sorted(labels)")).value == ["x", "y"]


async def test_what_sandbox_code_defined_is_skipped_with_a_reason(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        setup = await first.run(
            "from dataclasses import dataclass\n"
            "@dataclass\nclass Point:\n    x: int\n"
            "class Plain:\n    pass\n"
            "point = Point(1)\n"
            "points = {'p': [Point(2)]}\n"
            "def double(v):\n    return v * 2\n"
            "triple = lambda v: v * 3\n"
            "gen = (i for i in range(3))\n"
            "fh = open('/tmp/notes.txt', 'w')\n"
            "kept = 'me'\n"
        )
        assert setup.ok, setup.error
        snap = await first.snapshot()
    assert snap.names == ("dataclass", "kept")  # a function imported from a module is kept
    assert dict(snap.skipped) == {
        "Point": "a class defined in sandbox code: define it again",
        "Plain": "a class defined in sandbox code: define it again",
        "point": "an instance of Point, a class defined in sandbox code: define the class and "
        "create it again",
        "points": "it holds an instance of Point, a class defined in sandbox code: define the "
        "class and create it again",
        "double": "a function defined in sandbox code: define it again",
        "triple": "a function defined in sandbox code: define it again",
        "gen": "a generator: create it again (its progress cannot be saved)",
        "fh": "an open file: open it again",
    }
    async with legion.Sandbox(runtime=runtime) as second:
        await second.restore(snap)
        assert (await second.run("kept")).value == "me"
        gone = await second.run("point")
        assert gone.error is not None and gone.error.type == "NameError"


async def test_modules_and_aliases_are_imported_again(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        await first.run(
            "import json\nimport os.path as osp\nimport xml.etree.ElementTree as ET\n"
            "from collections import OrderedDict\n"
            "mods = {'math': __import__('math')}\n"
        )
        snap = await first.snapshot()
    assert snap.names == ("json", "osp", "ET", "OrderedDict", "mods")
    assert dict(snap.skipped) == {}
    async with legion.Sandbox(runtime=runtime) as second:
        restored = await second.restore(snap)
        assert restored.names == snap.names and dict(restored.failed) == {}
        check = await second.run(
            "import os, sys, math\n"
            "[osp is os.path, json is sys.modules['json'], ET.fromstring('<a/>').tag,"
            " OrderedDict(b=1).popitem(), mods['math'] is math]"
        )
        assert check.value == [True, True, "a", ["b", 1], True]


async def test_tools_work_after_a_restore(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, tools=[Calculator]) as first:
        setup = await first.run(
            "add = Calculator.add\nops = {'add': Calculator.add}\ntotal = add(1, 2)\n"
            "try:\n    Calculator.divide(1, 0)\nexcept ZeroDivisionError as exc:\n    err = exc"
        )
        assert setup.ok, setup.error
        snap = await first.snapshot()
    # The tool itself is the sandbox's own, not saved; names bound to it are
    # saved as references to the tool of that name.
    assert snap.names == ("add", "ops", "total", "err")
    async with legion.Sandbox(runtime=runtime, tools=[Calculator]) as second:
        restored = await second.restore(snap)
        assert restored.names == ("add", "ops", "total", "err")
        result = await second.run(
            "[Calculator.add(total, 1), add(10, 20), ops['add'](2, 2),"
            " isinstance(err, ZeroDivisionError) and isinstance(err, ToolError), str(err)]"
        )
        assert result.value == [4, 30, 4, True, "float division by zero"]
    async with legion.Sandbox(runtime=runtime) as toolless:
        partial = await toolless.restore(snap)
        assert partial.names == ("total", "err")
        assert set(partial.failed) == {"add", "ops"}
        assert "the tool Calculator, which this sandbox does not have" in partial.failed["add"]


async def test_snapshot_of_an_empty_namespace(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, tools=[Calculator]) as first:
        snap = await first.snapshot()
    assert snap.names == () and dict(snap.skipped) == {} and snap.blob
    async with legion.Sandbox(runtime=runtime) as second:
        restored = await second.restore(snap.blob)
        assert restored.names == () and dict(restored.failed) == {}
        assert (await second.run("1 + 1")).value == 2


async def test_values_over_the_bound_are_skipped_the_rest_kept(
    runtime: legion.SandboxRuntime,
) -> None:
    limits = legion.SandboxLimits(max_snapshot_bytes=1 * MiB)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        setup = await sandbox.run(
            "import os\n"
            "huge = os.urandom(20 * 1024 * 1024)\n"  # random: compression cannot shrink it
            "a = os.urandom(300 * 1024)\n"
            "b = os.urandom(500 * 1024)\n"
            "c = os.urandom(400 * 1024)\n"
            "small = list(range(100))\n"
        )
        assert setup.ok, setup.error
        snap = await sandbox.snapshot()
    assert len(snap.blob) <= 1 * MiB
    assert snap.names == ("os", "a", "c", "small")
    assert snap.skipped["huge"] == "too large: 20.0 MiB (limit 1 MiB)"
    # Together a, b and c do not fit: the largest of them goes.
    assert snap.skipped["b"].startswith("too large: 500.")
    assert snap.skipped["b"].endswith("(limit 1 MiB for the whole snapshot)")
    assert list(snap.skipped) == ["huge", "b"]


async def test_a_blob_larger_than_a_message_round_trips_in_pieces(
    runtime: legion.SandboxRuntime,
) -> None:
    limits = legion.SandboxLimits(max_message_bytes=64 * 1024)
    async with legion.Sandbox(runtime=runtime, limits=limits) as first:
        await first.run("import os, hashlib\ndata = os.urandom(1024 * 1024)")
        digest = (await first.run("hashlib.sha256(data).hexdigest()")).value
        snap = await first.snapshot()
    assert isinstance(digest, str) and len(digest) == 64
    assert len(snap.blob) > 10 * limits.max_message_bytes
    assert snap.names == ("os", "hashlib", "data")
    async with legion.Sandbox(runtime=runtime, limits=limits) as second:
        restored = await second.restore(snap.blob)
        assert restored.names == snap.names
        assert (await second.run("hashlib.sha256(data).hexdigest()")).value == digest


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (b"garbage", "not a Legion namespace snapshot"),
        (b"", "not a Legion namespace snapshot"),
        (snapshot_format.MAGIC + b"\x00\x00\x00\x05", "truncated or damaged"),
    ],
)
async def test_a_blob_that_is_not_a_snapshot_is_a_clear_error(
    sandbox: legion.Sandbox, blob: bytes, problem: str
) -> None:
    await sandbox.run("x = 1")
    container = sandbox.container_id
    with pytest.raises(SnapshotError, match=problem):
        await sandbox.restore(blob)
    # Nothing crashed: same container, same variables.
    assert sandbox.container_id == container
    assert (await sandbox.run("x")).value == 1


async def test_a_truncated_blob_restores_nothing(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        await first.run("a = 1\nb = 'two'")
        snap = await first.snapshot()
    async with legion.Sandbox(runtime=runtime) as second:
        with pytest.raises(SnapshotError, match="truncated or damaged"):
            await second.restore(snap.blob[:-2])
        assert (await second.run("'a' in globals() or 'b' in globals()")).value is False
        assert (await second.restore(snap.blob)).names == ("a", "b")


async def test_a_blob_over_the_limit_is_refused_before_it_is_sent(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        await first.run("import os\nnoise = os.urandom(8 * 1024)")
        snap = await first.snapshot()
    assert len(snap.blob) > 8 * 1024
    small = legion.SandboxLimits(max_snapshot_bytes=4096)
    async with legion.Sandbox(runtime=runtime, limits=small) as second:
        with pytest.raises(SnapshotError, match="max_snapshot_bytes"):
            await second.restore(snap)
        assert (await second.run("'noise' in globals()")).value is False


async def test_a_crafted_blob_runs_its_payload_only_inside_the_sandbox(
    sandbox: legion.Sandbox, find_class_events: list[tuple[str, str]]
) -> None:
    marker = f"legion-pwned-{uuid.uuid4().hex}"
    on_host = Path(tempfile.gettempdir()) / marker
    write = f"open('/tmp/{marker}', 'w').write('ran')"
    blob = crafted_blob(evil=Payload(write), fine=[1, 2])
    restored = await sandbox.restore(blob)
    assert restored.names == ("evil", "fine")  # exec returned None; the payload ran
    assert (await sandbox.run(f"open('/tmp/{marker}').read()")).value == "ran"
    assert not on_host.exists()
    # A blob that is one whole pickle is refused by the runner before any
    # unpickling, and the controller never tries.
    with pytest.raises(SnapshotError, match="not a Legion namespace snapshot"):
        await sandbox.restore(pickle.dumps(Payload(write.replace(marker, marker + "-2"))))
    assert (await sandbox.run(f"import os\nos.path.exists('/tmp/{marker}-2')")).value is False
    assert not on_host.with_name(marker + "-2").exists()
    # The host process looked up no pickled global while it took and restored
    # snapshots of values full of them.
    await sandbox.run("import collections, decimal\nd = collections.deque([decimal.Decimal(1)])")
    snap = await sandbox.snapshot()
    assert "d" in snap.names
    await sandbox.restore(snap)
    assert find_class_events == []


async def test_a_restore_that_hangs_times_out_and_replaces_the_container(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as sandbox:
        await sandbox.run("x = 1")
        first = sandbox.container_id
        with pytest.raises(SnapshotError, match="did not finish within 1 s"):
            await sandbox.restore(
                crafted_blob(stuck=Payload("import time; time.sleep(60)")), timeout=1
            )
        assert sandbox.container_id is None
        fresh = await sandbox.run("'x' in globals()")
        assert fresh.value is False and sandbox.container_id != first


async def test_a_restore_that_kills_the_runner_raises_sandbox_crashed(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as sandbox:
        await sandbox.run("x = 1")
        with pytest.raises(legion.SandboxCrashed, match="while restoring a snapshot"):
            await sandbox.restore(crafted_blob(bye=Payload("import os; os._exit(3)")))
        assert (await sandbox.run("'x' in globals()")).value is False


async def test_a_hostile_runner_cannot_make_the_controller_hold_more_than_the_bound(
    runtime: legion.SandboxRuntime,
) -> None:
    limits = legion.SandboxLimits(max_snapshot_bytes=64 * 1024)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        # Sandbox code takes over its runner: stray answers nobody asked for,
        # then a snapshot maker that ignores the bound.
        takeover = await sandbox.run(
            "import gc\n"
            "import legion_runner.snapshot as snap\n"
            "from legion_runner.runner import Runner\n"
            "from legion_runner._proto import sandbox_pb2 as pb\n"
            "runner = next(o for o in gc.get_objects() if isinstance(o, Runner))\n"
            "M = pb.RunnerMessage\n"
            "runner.send(M(snapshot_chunk=pb.SnapshotChunk(chunk=b'x', last=True)))\n"
            "runner.send(M(restore_result=pb.RestoreResult(names=['y'], last=True)))\n"
            "snap.save = lambda *a, **k: snap.Saved(blob=b'x' * (1024 * 1024), names=['x'])\n"
        )
        assert takeover.ok, takeover.error
        with pytest.raises(SnapshotError, match="sent more than max_snapshot_bytes"):
            await sandbox.snapshot()
        assert (await sandbox.run("6 * 7")).value == 42
