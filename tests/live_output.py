"""What "live" means for output, shared by the sandbox, server and CLI tests.

The code prints a line carrying the time, sleeps :data:`PAUSE` seconds, then
prints again. Its first line is live when it reaches the host whole, before
anything of the second line and before the run ends, within
:data:`BOUND_SECONDS` of the print (the sandbox's clock is the host's: one
kernel).
"""

from __future__ import annotations

import re
import time

PAUSE = 3
BOUND_SECONDS = 1.0
"""Issue 15's acceptance bound; generous on purpose, not a benchmark."""

CODE = (
    "import time\n"
    "print(f'live first {time.time()!r}')\n"
    f"time.sleep({PAUSE})\n"
    "print('live second')\n"
)
SECOND = "live second"
_FIRST = re.compile(r"live first (\d+\.\d+(?:e[+-]?\d+)?)\n")


class OutputHeldBack(AssertionError):
    """The first line reached the host only once the code had printed its
    second one (or ended): the output was held in the sandbox meanwhile."""


class FirstLine:
    """Fed chunks of one stream as they arrive; notes when the first line came
    whole, and whether the second line or the run's end had come before it."""

    def __init__(self) -> None:
        self.text = ""
        self.arrived: float | None = None
        self.printed: float | None = None
        self.after_second = False
        self.after_end = False
        self.ended = False

    def add(self, text: str) -> None:
        self.text += text
        if self.arrived is not None:
            return
        found = _FIRST.search(self.text)
        if found is not None:
            self.arrived = time.time()
            self.printed = float(found.group(1))
            self.after_second = SECOND in self.text
            self.after_end = self.ended

    def end(self) -> None:
        """The run has returned."""
        self.ended = True

    def check(self, where: str) -> float:
        """Raise unless the first line came live; its delay in seconds."""
        if self.arrived is None or self.printed is None:
            raise AssertionError(f"{where}: the first line never arrived; got {self.text!r}")
        if self.after_second or self.after_end:
            raise OutputHeldBack(
                f"{where}: the first line arrived {self.arrived - self.printed:.2f} s after the "
                f"print, together with the second line or after the run ended; got {self.text!r}"
            )
        delay = self.arrived - self.printed
        assert delay <= BOUND_SECONDS, f"{where}: the first line took {delay:.2f} s to arrive"
        return delay
