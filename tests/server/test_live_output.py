"""Live output through `legion serve`: a run's ``sandbox.output`` events reach
``Client.run(on_event=...)`` while the code runs, the owner's ``Events``
stream carries the same chunks, and `legion run --remote` prints the code's
lines on stderr as they come."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import legion
from legion import telemetry
from legion.client import RemoteEvent
from legion.testing import FakeOpenAIServer
from tests.live_output import CODE, SECOND, FirstLine, OutputHeldBack

from .conftest import ROOT, Served, server_env
from .support import next_event

pytestmark = pytest.mark.docker


async def test_a_print_reaches_a_remote_client_while_the_code_sleeps(
    alice: legion.Client,
) -> None:
    """Issue 15, acceptance 4, through a `legion serve` subprocess."""
    first = FirstLine()
    streamed: list[telemetry.Event] = []

    def on_event(event: telemetry.Event) -> None:
        streamed.append(event)
        if event.name == telemetry.SANDBOX_OUTPUT and event.data["stream"] == "stdout":
            first.add(str(event.data["text"]))

    async with alice.events() as events:
        result = await alice.run("Coder", f"#code {CODE}", on_event=on_event)
        first.end()
        published: list[RemoteEvent] = []
        await next_event(
            events, lambda e: e.name == "run.stop" and e.run_id == result.run_id, seen=published
        )
    outputs = [e for e in streamed if e.name == telemetry.SANDBOX_OUTPUT]
    assert outputs and {e.run_id for e in outputs} == {result.run_id}
    assert re.fullmatch(r"live first \S+\nlive second\n", first.text), first.text
    # Before the step's stop, and on the Events stream too, in the same order.
    names = [e.name for e in streamed]
    assert names.index(telemetry.SANDBOX_EVAL_STOP) > names.index(telemetry.SANDBOX_OUTPUT)
    assert [dict(e.data) for e in published if e.name == telemetry.SANDBOX_OUTPUT] == [
        dict(e.data) for e in outputs
    ]
    first.check("Client.run(on_event=...)")


def test_legion_run_prints_the_code_output_on_stderr_as_it_comes(
    served: Served, fake_model: FakeOpenAIServer
) -> None:
    env = server_env(fake_model, LEGION_SERVER_TOKEN=served.tokens.alice)
    command = [sys.executable, "-m", "legion.cli", "run", "Coder", f"#code {CODE}"]
    process = subprocess.Popen(
        [*command, "--remote", served.address],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None and process.stdout is not None
    printed = b""
    when_first: tuple[bool, bool] | None = None
    """(the second line was there already, the command had ended) when the first line was."""
    while chunk := os.read(process.stderr.fileno(), 65536):
        printed += chunk
        if when_first is None and re.search(rb"\n    \| live first \S+\n", printed):
            # The second output line, not the code's text: stderr also shows
            # the model's reply (the code) as it streams in.
            second = f"\n    | {SECOND}".encode()
            when_first = (second in printed, process.poll() is not None)
    answer = process.stdout.read()
    assert process.wait(timeout=60) == 0, printed.decode(errors="replace")
    assert answer.strip() == b"null"
    lines = printed.decode().splitlines()
    step = lines.index("  step 1: running code")
    assert lines[step + 1].startswith("    | live first ")
    assert lines[step + 2] == "    | live second"
    assert lines[step + 3].startswith("  step 1 done in ")
    assert when_first is not None
    if any(when_first):
        raise OutputHeldBack(f"the first line came with the second, or after the end: {lines}")
