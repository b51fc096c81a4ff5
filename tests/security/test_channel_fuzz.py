"""Property-based fuzzing of the sandbox channel from the hostile side.

Sandbox code can take over its runner and send anything on its stream. Here
hypothesis builds arbitrary runner messages on the host (every kind, ids that
match and don't, unknown tools, malformed JSON, out-of-range enums, stray
Hellos, big payloads); code inside a real sandbox injects each batch onto its
own stream; after each batch the same sandbox must still run code and serve a
tool call correctly, and the controller must hold no more output than the limit.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import legion
from legion._proto import sandbox_pb2 as pb

pytestmark = pytest.mark.docker

INJECT = """
import base64, gc
from legion_runner.runner import Runner
from legion_runner._proto import sandbox_pb2 as pb
runner = next(o for o in gc.get_objects() if isinstance(o, Runner))
for blob in BATCH:
    message = pb.RunnerMessage.FromString(base64.b64decode(blob))
    inner = getattr(message, message.WhichOneof('kind'))
    if getattr(inner, 'exec_id', None) == 'CURRENT':
        inner.exec_id = runner._current_exec   # aim at the running execution
    runner.send(message)
len(BATCH)
"""

texts = st.text(max_size=200)
json_ish = st.one_of(
    texts, st.sampled_from(["[]", "{}", "[1, 2]", '{"a": 1}', "null", "[", '"x"', "[" * 50])
)
ids = st.one_of(st.just("CURRENT"), texts)


def _hello() -> st.SearchStrategy[pb.RunnerMessage]:
    return st.builds(lambda t: pb.RunnerMessage(hello=pb.Hello(token=t)), texts)


def _tool_call() -> st.SearchStrategy[pb.RunnerMessage]:
    return st.builds(
        lambda call_id, exec_id, tool, fn, args, kwargs: pb.RunnerMessage(
            tool_call=pb.ToolCall(
                call_id=call_id,
                exec_id=exec_id,
                tool=tool,
                function=fn,
                args_json=args,
                kwargs_json=kwargs,
            )
        ),
        texts,
        ids,
        st.sampled_from(["echo", "Nope", "", "echo.__class__"]) | texts,
        st.sampled_from(["", "__call__", "__globals__"]) | texts,
        json_ish,
        json_ish,
    )


def _output() -> st.SearchStrategy[pb.RunnerMessage]:
    return st.builds(
        lambda exec_id, stream, data: pb.RunnerMessage(
            output=pb.Output(exec_id=exec_id, stream=stream, data=data)
        ),
        ids,
        st.integers(min_value=0, max_value=7),
        st.binary(max_size=70_000),
    )


def _result() -> st.SearchStrategy[pb.RunnerMessage]:
    return st.builds(
        lambda exec_id, value: pb.RunnerMessage(
            execute_result=pb.ExecuteResult(
                exec_id=exec_id, has_value=True, value=pb.Value(json=value)
            )
        ),
        st.just("stale") | texts,
        json_ish,
    )


def _snapshot_reply() -> st.SearchStrategy[pb.RunnerMessage]:
    """Unasked-for (or forged) answers to a snapshot or a restore."""
    skipped = st.lists(
        st.builds(lambda n, r: pb.Skipped(name=n, reason=r), texts, texts), max_size=3
    )
    chunk = st.builds(
        lambda rid, data, last, names, skip: pb.RunnerMessage(
            snapshot_chunk=pb.SnapshotChunk(
                request_id=rid, chunk=data, last=last, names=names, skipped=skip
            )
        ),
        ids,
        st.binary(max_size=70_000),
        st.booleans(),
        st.lists(texts, max_size=3),
        skipped,
    )
    restored = st.builds(
        lambda rid, names, failed, error, last: pb.RunnerMessage(
            restore_result=pb.RestoreResult(
                request_id=rid, names=names, failed=failed, error=error, last=last
            )
        ),
        ids,
        st.lists(texts, max_size=3),
        skipped,
        texts,
        st.booleans(),
    )
    return st.one_of(chunk, restored)


messages = st.lists(
    st.one_of(_hello(), _tool_call(), _output(), _result(), _snapshot_reply()),
    min_size=1,
    max_size=12,
)


def echo(text: str) -> str:
    return text


@pytest.fixture(scope="module")
async def target(runtime: legion.SandboxRuntime) -> AsyncIterator[legion.Sandbox]:
    limits = legion.SandboxLimits(output_limit_bytes=64 * 1024, timeout_seconds=20)
    async with legion.Sandbox(runtime=runtime, tools=[echo], limits=limits) as sandbox:
        yield sandbox


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=messages)
async def test_any_runner_messages_leave_the_controller_serving(
    target: legion.Sandbox, batch: list[pb.RunnerMessage]
) -> None:
    blobs = [base64.b64encode(m.SerializeToString()).decode() for m in batch]
    injected = await target.run(f"BATCH = {blobs!r}\n{INJECT}")
    # The injecting run ends normally (its own forged results may answer it:
    # sandbox code can always lie about its own result, and only that).
    assert injected.timed_out is False
    assert len(injected.stdout) <= 64 * 1024 + 200
    follow_up = await target.run("echo('still served') + '!'")
    assert follow_up.error is None, follow_up.error
    assert follow_up.value == "still served!"
    # Stray snapshot replies never stand in for a real one.
    await target.run("kept = 'yes'")
    snap = await target.snapshot()
    assert "kept" in snap.names
