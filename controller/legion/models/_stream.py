"""A streamed model reply as ``llm.delta`` events.

The action is still parsed from the complete reply only (the chunks are put
back together by litellm); the deltas are for whoever watches the run.
"""

from __future__ import annotations

import time

from .. import telemetry

DELTA_INTERVAL = 0.05
"""Seconds: pieces that arrive closer together than this go out as one delta,
so a fast stream of one-token chunks does not become one event per token."""


class DeltaFeed:
    """Sends one attempt of a model request as ``llm.delta`` events.

    Pieces arriving within :data:`DELTA_INTERVAL` of the last delta are held
    and sent with the next one (or at :meth:`close`). At most ``limit``
    characters go out in all; at :meth:`close` a reply that was longer gets one
    last delta with :func:`legion.telemetry.cut_marker`, so the deltas add up
    to :func:`legion.telemetry.excerpt` of the reply, which the request's stop
    event carries.
    """

    def __init__(self, attempt: int, *, limit: int = telemetry.EXCERPT_CHARS) -> None:
        self.attempt = attempt
        self.limit = limit
        self.received = 0
        """Characters of the reply received so far."""
        self._held = ""
        self._sent = 0
        self._last = float("-inf")

    def add(self, text: str) -> None:
        if not text:
            return
        room = self.limit - self._sent - len(self._held)
        self.received += len(text)
        if room > 0:
            self._held += text[:room]
        if self._held and time.monotonic() - self._last >= DELTA_INTERVAL:
            self._send()

    def close(self) -> None:
        """The reply is complete: send what is held, and the cut marker."""
        self._send()
        if self.received > self.limit:
            self._emit(telemetry.cut_marker(self.received - self.limit))

    def _send(self) -> None:
        if self._held:
            self._sent += len(self._held)
            self._emit(self._held)
            self._held = ""

    def _emit(self, text: str) -> None:
        self._last = time.monotonic()
        telemetry.emit(telemetry.LLM_DELTA, text=text, attempt=self.attempt)
