"""How soon a printed line reaches the host: ``live_output_delay``.

One run prints a line holding ``time.time()`` every :data:`INTERVAL` seconds
(longer than the runner's 0.1 s flush interval, so each line stands alone);
each sample is the time from that print to the moment its whole line (the
newline included) has reached an ``on_output`` callback on the host. The
sandbox's clock is the host's (one kernel), so the two times compare.
"""

from __future__ import annotations

import time
from typing import Any

import legion

from .common import Measures, check, summary

INTERVAL = 0.25


async def live_output_delay(runtime: legion.SandboxRuntime, n: int) -> dict[str, Any]:
    samples: list[float] = []
    pending = ""

    def on_output(stream: str, text: str) -> None:
        nonlocal pending
        now = time.time()
        pending += text
        *lines, pending = pending.split("\n")
        samples.extend(now - float(line) for line in lines)

    code = (
        "import time\n"
        f"for _ in range({n}):\n"
        "    print(repr(time.time()))\n"
        f"    time.sleep({INTERVAL})\n"
    )
    async with legion.Sandbox(runtime=runtime) as sandbox:
        result = await sandbox.run(code, on_output=on_output, timeout=30 + n * INTERVAL * 2)
    check(result.error, None, "error of the printing loop")
    check(len(samples), n, "lines that reached on_output")
    return dict(summary(samples))


async def measure(runtime: legion.SandboxRuntime, smoke: bool, log: Measures) -> dict[str, Any]:
    """``live_output_delay`` (or nothing, when it failed: then in ``log.failures``)."""
    value = await log.run(
        "live_output_delay", lambda: live_output_delay(runtime, 4 if smoke else 40)
    )
    return {"live_output_delay": value} if value is not None else {}
