"""Live output from a real sandbox: ``Sandbox.run(on_output=...)`` and
``sandbox.output`` telemetry events get what the code prints while it runs,
in order, exactly what the result keeps (cut where it is cut), and agent runs
emit the events under their run id without asking."""

from __future__ import annotations

import asyncio
import logging

import pytest

import legion
from legion import telemetry
from legion.testing import ScriptedModel, action
from tests.live_output import CODE, FirstLine

pytestmark = pytest.mark.docker


def output_events(seen: list[telemetry.Event], stream: str = "stdout") -> str:
    return "".join(
        str(e.data["text"])
        for e in seen
        if e.name == telemetry.SANDBOX_OUTPUT and e.data["stream"] == stream
    )


async def test_a_print_reaches_the_callback_and_telemetry_while_the_code_sleeps(
    sandbox: legion.Sandbox,
) -> None:
    """Issue 15, acceptance 4: within 1 s of the print, while the code runs on."""
    by_callback, by_event = FirstLine(), FirstLine()

    def on_event(event: telemetry.Event) -> None:
        if event.name == telemetry.SANDBOX_OUTPUT and event.data["stream"] == "stdout":
            by_event.add(str(event.data["text"]))

    unsubscribe = telemetry.subscribe(on_event)
    try:
        result = await sandbox.run(
            CODE, on_output=lambda stream, text: stream == "stdout" and by_callback.add(text)
        )
    finally:
        unsubscribe()
    by_callback.end()
    by_event.end()
    assert result.ok, result.error
    assert by_callback.text == by_event.text == result.stdout
    by_callback.check("on_output")
    by_event.check("telemetry.subscribe")


async def test_order_is_kept_across_a_thousand_prints(sandbox: legion.Sandbox) -> None:
    chunks: list[tuple[str, str]] = []
    seen: list[telemetry.Event] = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        result = await sandbox.run(
            "import sys\nfor i in range(1000):\n    print(i)\n    print(i % 10, file=sys.stderr)\n",
            on_output=lambda stream, text: chunks.append((stream, text)),
        )
    finally:
        unsubscribe()
    expected = "".join(f"{i}\n" for i in range(1000))
    assert result.stdout == expected
    assert "".join(text for stream, text in chunks if stream == "stdout") == expected
    assert "".join(text for stream, text in chunks if stream == "stderr") == result.stderr
    assert result.stderr == "".join(f"{i % 10}\n" for i in range(1000))
    # Each event's text is cut at EXCERPT_CHARS; these outputs are smaller all together.
    assert len(expected) < telemetry.EXCERPT_CHARS
    assert output_events(seen) == expected
    assert output_events(seen, "stderr") == result.stderr
    # All of them before the step's stop event.
    names = [e.name for e in seen]
    last_output = len(names) - 1 - names[::-1].index(telemetry.SANDBOX_OUTPUT)
    assert names.index(telemetry.SANDBOX_EVAL_STOP) > last_output


async def test_what_is_cut_is_cut_for_the_callback_too(runtime: legion.SandboxRuntime) -> None:
    limits = legion.SandboxLimits(output_limit_bytes=1000)
    chunks: list[str] = []
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        result = await sandbox.run(
            "for i in range(500):\n    print('x' * 9)",
            on_output=lambda stream, text: chunks.append(text),
        )
    assert result.stdout_truncated
    assert "".join(chunks) == result.stdout
    assert result.stdout.count("output truncated") == 1
    assert result.stdout.startswith("xxxxxxxxx\n" * 100)


async def test_a_character_split_between_chunks_arrives_whole(
    runtime: legion.SandboxRuntime,
) -> None:
    # The runner sends at most 64 KiB a message: one 'é' (2 bytes) straddles the cut.
    chunks: list[str] = []
    async with legion.Sandbox(runtime=runtime) as sandbox:
        result = await sandbox.run(
            "print('a' + 'é' * 40000)", on_output=lambda stream, text: chunks.append(text)
        )
    assert len(chunks) > 1
    assert "".join(chunks) == result.stdout == "a" + "é" * 40000 + "\n"


async def test_an_async_callback_is_awaited_in_order_and_one_that_raises_stops_nothing(
    sandbox: legion.Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []

    async def slow(stream: str, text: str) -> None:
        await asyncio.sleep(0.01)  # later chunks queue up behind it, in order
        got.append(text)

    code = "import time\nfor i in range(20):\n    print(i)\n    time.sleep(0.02)\n"
    result = await sandbox.run(code, on_output=slow)
    assert "".join(got) == result.stdout == "".join(f"{i}\n" for i in range(20))

    def fails(stream: str, text: str) -> None:
        raise ValueError("a bug in the callback")

    with caplog.at_level(logging.WARNING, logger="legion.sandbox"):
        result = await sandbox.run("print('still here')\n6 * 7", on_output=fails)
    assert result.ok and result.value == 42 and result.stdout == "still here\n"
    assert any("a bug in the callback" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="on_output must be callable"):
        await sandbox.run("1", on_output="print")  # type: ignore[arg-type]


class Printer(legion.Agent):
    """Prints while it works."""

    config = {"max_iterations": 2, "max_retries": 1}


async def test_an_agent_run_emits_its_output_under_its_run_id(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel([action("eval_and_complete", "print('working')\n'done'")])
    seen: list[telemetry.Event] = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        result = await legion.run(Printer, "print", model=model, runtime=runtime)
    finally:
        unsubscribe()
    assert result.output == "done"
    outputs = [e for e in seen if e.name == telemetry.SANDBOX_OUTPUT]
    assert outputs and {e.run_id for e in outputs} == {result.run_id}
    assert output_events(seen) == "working\n"
