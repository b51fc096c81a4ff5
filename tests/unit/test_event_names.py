"""Event names: each a constant of legion.telemetry, used by producers and
consumers alike, and each listed in README.md's table of events."""

from __future__ import annotations

import re
from pathlib import Path

from legion import telemetry

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_events() -> set[str]:
    text = README.read_text(encoding="utf-8")
    assert "\n### Events\n" in text, "README.md has lost its list of events (### Events)"
    section = text.split("\n### Events\n", 1)[1].split("\n#", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}


def test_every_name_constant_is_an_event_or_a_span() -> None:
    constants = {
        name: value
        for name, value in vars(telemetry).items()
        if name.isupper() and isinstance(value, str)
    }
    assert len(set(telemetry.EVENTS)) == len(telemetry.EVENTS)
    for name, value in constants.items():
        is_span = f"{value}.start" in telemetry.EVENTS
        assert value in telemetry.EVENTS or is_span, f"telemetry.{name} is not in EVENTS"
    assert set(telemetry.EVENTS) <= set(constants.values())


def test_every_event_is_listed_in_the_readme() -> None:
    listed = _readme_events()
    missing = [name for name in telemetry.EVENTS if name not in listed]
    assert not missing, f"README.md's table of events lacks {missing}"
    unknown = sorted(listed - set(telemetry.EVENTS))
    assert not unknown, f"README.md's table of events lists names Legion never emits: {unknown}"


def test_a_span_emits_its_three_names() -> None:
    seen: list[str] = []
    unsubscribe = telemetry.subscribe(lambda event: seen.append(event.name))
    try:
        with telemetry.span(telemetry.TOOL_CALL):
            pass
        try:
            with telemetry.span(telemetry.TOOL_CALL):
                raise KeyError("x")
        except KeyError:
            pass
    finally:
        unsubscribe()
    assert seen == [
        telemetry.TOOL_CALL_START,
        telemetry.TOOL_CALL_STOP,
        telemetry.TOOL_CALL_START,
        telemetry.TOOL_CALL_EXCEPTION,
    ]
