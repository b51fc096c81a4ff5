"""Helpers for the controller-service tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import legion
from legion.client import EventStream, RemoteEvent


async def next_event(
    stream: EventStream,
    predicate: Callable[[RemoteEvent], bool],
    *,
    seen: list[RemoteEvent] | None = None,
    timeout: float = 60,
) -> RemoteEvent:
    """Read ``stream`` until an event matches (every event read goes into ``seen``)."""

    async def read() -> RemoteEvent:
        async for event in stream:
            if seen is not None:
                seen.append(event)
            if predicate(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(read(), timeout)


async def wait_for_condition(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (off the loop: it may call Docker) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)


class Beacon:
    """An ``on_event`` handler that notes a run's events and signals one by name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = asyncio.Event()
        self.events: list[legion.telemetry.Event] = []

    def __call__(self, event: legion.telemetry.Event) -> None:
        self.events.append(event)
        if event.name == self.name:
            self.reached.set()

    @property
    def run_id(self) -> str:
        return next(e.run_id for e in self.events if e.run_id)
