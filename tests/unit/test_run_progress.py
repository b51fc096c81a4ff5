"""`legion run`'s progress on stderr shows the code's output as it comes:
each line indented under its step (stdout with ``|``, stderr with ``!``),
chunks that split a line joined back, and progress lines never glued to an
unfinished output line."""

from __future__ import annotations

import io

from legion import telemetry
from legion.server.commands import Progress


def output(stream: str, text: str) -> telemetry.Event:
    return telemetry.Event(
        telemetry.SANDBOX_OUTPUT, "r" * 32, None, 0.0, {"stream": stream, "text": text}
    )


def test_output_lines_are_indented_under_their_step() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress(telemetry.Event(telemetry.ITERATION_START, "r" * 32, None, 0.0, {"index": 1}))
    for event in (
        output("stdout", "loading"),
        output("stdout", " rows\n12 rows\nsum"),
        output("stderr", "warning: slow\n"),
        output("stdout", "mary 4\n"),
        output("stdout", "no newline at the end"),
    ):
        progress(event)
    progress(telemetry.Event(telemetry.ITERATION_STOP, "r" * 32, None, 0.0, {"index": 1}))
    assert out.getvalue().splitlines() == [
        "  step 1: running code",
        "    | loading rows",
        "    | 12 rows",
        "    | sum",
        "    ! warning: slow",
        "    | mary 4",
        "    | no newline at the end",
        "  step 1 done",
    ]
