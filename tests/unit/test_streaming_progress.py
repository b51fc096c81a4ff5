"""`legion run`'s progress on stderr shows the model's reply as it streams
in: one live line (marked ``>``) under "asking the model" that grows with
each ``llm.delta``, ended before the next progress line; a retried request's
reply starts a line of its own."""

from __future__ import annotations

import io
from typing import Any

from legion import telemetry
from legion.server.commands import Progress

RUN = "r" * 32


def event(name: str, **data: Any) -> telemetry.Event:
    return telemetry.Event(name, RUN, None, 0.0, data)


def delta(text: str, attempt: int = 1) -> telemetry.Event:
    return event(telemetry.LLM_DELTA, text=text, attempt=attempt)


def test_the_reply_grows_on_one_line_under_its_request() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress(event(telemetry.LLM_REQUEST_START, model="openai/fake-model"))
    progress(delta('{"action": "eval_'))
    assert out.getvalue().endswith('    > {"action": "eval_')  # there before the reply ends
    progress(delta('and_complete", "code": "6 * 7"}'))
    progress(event(telemetry.LLM_REQUEST_STOP, duration=0.25))
    progress(event(telemetry.ITERATION_START, index=1))
    assert out.getvalue().splitlines() == [
        "  asking the model (openai/fake-model)",
        '    > {"action": "eval_and_complete", "code": "6 * 7"}',
        "  the model answered in 0.2s",
        "  step 1: running code",
    ]


def test_a_retried_request_starts_a_new_line_and_raw_newlines_stay_indented() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress(event(telemetry.LLM_REQUEST_START, model="m"))
    progress(delta('{"action": "ret', attempt=1))
    progress(delta("Thinking first.\nThen", attempt=2))
    progress(delta(' {"action": "done"}', attempt=2))
    progress(event(telemetry.LLM_REQUEST_STOP))
    assert out.getvalue().splitlines() == [
        "  asking the model (m)",
        '    > {"action": "ret',
        "    > Thinking first.",
        '    > Then {"action": "done"}',
        "  the model answered",
    ]
