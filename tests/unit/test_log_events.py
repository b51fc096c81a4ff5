"""legion.telemetry.log_events: one log line per event, until stopped."""

from __future__ import annotations

import logging

import pytest

import legion
from legion import telemetry
from legion.testing import ScriptedModel, action


class Echo(legion.Agent):
    """Answers what its model says."""


async def test_a_run_logs_one_line_per_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="legion.events")
    stop = telemetry.log_events(level="debug")
    try:
        result = await legion.run(
            Echo, "hi", model=ScriptedModel([action("return", result="x" * 500)])
        )
    finally:
        stop()
    lines = [r for r in caplog.records if r.name == "legion.events"]
    assert [r.getMessage().split()[0] for r in lines] == [
        telemetry.RUN_START,
        telemetry.LLM_REQUEST_START,
        telemetry.LLM_REQUEST_STOP,
        telemetry.RUN_STOP,
    ]
    assert {r.levelno for r in lines} == {logging.DEBUG}
    stop_line = lines[-1].getMessage()
    assert f"run={result.run_id[:8]}" in stop_line and "agent='Echo'" in stop_line
    assert "...(302 more)" in stop_line  # the 500-character output, cut to 200
    caplog.clear()
    await legion.run(Echo, "again", model=ScriptedModel([action("return", result=1)]))
    assert not [r for r in caplog.records if r.name == "legion.events"]  # stopped


async def test_a_level_and_a_logger_of_ones_own(caplog: pytest.LogCaptureFixture) -> None:
    mine = logging.getLogger("myapp.agents")
    caplog.set_level(logging.WARNING, logger="myapp.agents")
    stop_info = telemetry.log_events(logger=mine)  # INFO: below the logger's level
    stop_warning = telemetry.log_events(logging.WARNING, logger=mine)
    try:
        await legion.run(Echo, "hi", model=ScriptedModel([action("return", result=1)]))
    finally:
        stop_info()
        stop_warning()
    lines = [r for r in caplog.records if r.name == "myapp.agents"]
    assert len(lines) == 4 and {r.levelno for r in lines} == {logging.WARNING}
    with pytest.raises(legion.UsageError, match="unknown log level 'loud'"):
        telemetry.log_events("loud")
