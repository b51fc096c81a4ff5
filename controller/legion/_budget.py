"""Budgets: what a run, a conversation or a principal may spend. No I/O.

A run charges its :class:`Budget`; every charge also lands on the budgets
above it (:attr:`Budget.parent`): the calling run's for a sub-agent, the
conversation's for a long-lived agent's turn, the principal's under
``legion serve``. So a sub-agent spends its caller's budget, and every run
of a principal spends that principal's day.

A budget that is spent *trips*: it remembers why (:class:`Exceeded`) and
tells its listeners, so every run under it stops (the driver cancels the
model request or code step in flight) with :class:`legion.UsageLimitExceeded`.

Counters are charged from the event loop and from tool threads, so every
change happens under one lock.
"""

from __future__ import annotations

import datetime
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from ._results import Usage

__all__ = [
    "Budget",
    "Exceeded",
    "PrincipalBudget",
    "day_of",
    "next_reset",
]

_lock = threading.RLock()
_steps = itertools.count()


@dataclass(frozen=True)
class Exceeded:
    """Why a budget stopped a run."""

    limit: str
    """The budget's name: ``max_tokens``, ``max_tokens_per_day``, ``max_sandboxes``..."""
    allowed: float
    used: float
    """What is counted against it (with what was asked for, for sandboxes)."""
    scope: str
    """Whose budget: ``run of Editor``, ``conversation``, ``principal alice``."""
    resets: str = ""
    """When it is given back, in words (empty: never, for a run's budget)."""

    def describe(self) -> str:
        text = f"the {self.scope}'s budget {self.limit}={_figure(self.allowed)} is spent "
        text += f"({_figure(self.used)} counted)"
        return text + (f"; {self.resets}" if self.resets else "")


def _figure(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.6g}"


_RUN_LIMITS: dict[str, Callable[[Usage], float]] = {
    "max_tokens": lambda u: u.total_tokens,
    "max_cost_usd": lambda u: u.cost_usd or 0.0,
    "max_tool_calls": lambda u: u.tool_calls,
    "max_sandbox_seconds": lambda u: u.sandbox_seconds,
}
_MODEL_LIMITS = ("max_tokens", "max_cost_usd")


class Budget:
    """The budget of a run or a conversation: the limits of
    :data:`legion.config.BUDGET_KEYS` (None: unlimited) over what it and
    every budget under it spent."""

    def __init__(
        self,
        limits: Mapping[str, float | None] | None = None,
        *,
        scope: str = "run",
        parent: Budget | None = None,
    ) -> None:
        self.limits = {k: v for k, v in (limits or {}).items() if v is not None}
        unknown = set(self.limits) - set(_RUN_LIMITS)
        if unknown:
            raise ValueError(f"unknown budget limits {sorted(unknown)}")
        self.scope = scope
        self.parent = parent
        self.own = Usage()
        """What this run spent itself."""
        self._counted = Usage()
        self._running: dict[int, float] = {}
        self._tripped: Exceeded | None = None
        self._listeners: dict[int, Callable[[], None]] = {}

    # the tree -----------------------------------------------------------------

    def chain(self) -> Iterator[Budget]:
        """This budget and every one above it, nearest first."""
        node: Budget | None = self
        while node is not None:
            yield node
            node = node.parent

    def child(self, limits: Mapping[str, float | None] | None = None, *, scope: str) -> Budget:
        return Budget(limits, scope=scope, parent=self)

    @property
    def counted(self) -> Usage:
        """Everything counted against this budget (budgets under it included)."""
        with _lock:
            return replace(self._counted, sandbox_seconds=self._seconds_now(time.monotonic()))

    # charging -------------------------------------------------------------------

    def _add(self, usage: Usage) -> None:
        self._counted += usage

    def charge(self, usage: Usage) -> Exceeded | None:
        """Count a model request's usage here and above; the first budget it
        overspent (which trips), or None."""
        with _lock:
            self.own += usage
            for node in self.chain():
                node._add(usage)
            for node in self.chain():
                found = node._over(strict=True)
                if found is not None:
                    node.trip(found)
                    return found
        return None

    def before_request(self) -> Exceeded | None:
        """Why no model request may be sent now (a budget tripped, or no
        tokens or dollars left), or None."""
        return self._first_spent(_MODEL_LIMITS)

    def exceeded_now(self) -> Exceeded | None:
        """Why no code step may start or go on now: a budget here or above
        tripped, or its sandbox seconds are spent (measured up to this
        moment). A spent one trips. None: none is."""
        return self._first_spent(("max_sandbox_seconds",))

    def _first_spent(self, limits: tuple[str, ...]) -> Exceeded | None:
        with _lock:
            for node in self.chain():
                found = node.tripped() or node._over(strict=False, only=limits)
                if found is not None:
                    node.trip(found)
                    return found
        return None

    def take_tool_call(self) -> Exceeded | None:
        """Count one tool call here and above, unless that overspends a
        budget: then nothing is counted, the budget trips, and it is returned."""
        with _lock:
            for node in self.chain():
                found = node.tripped()
                allowed = node.limits.get("max_tool_calls")
                if found is None and allowed is not None and node._counted.tool_calls >= allowed:
                    found = Exceeded(
                        "max_tool_calls", allowed, node._counted.tool_calls + 1, node.scope
                    )
                if found is not None:
                    node.trip(found)
                    return found
            one = Usage(tool_calls=1)
            self.own += one
            for node in self.chain():
                node._add(one)
        return None

    # code steps: sandbox seconds ------------------------------------------------

    def step_started(self) -> int:
        """A code step starts now; its seconds count from here (here and above)."""
        token = next(_steps)
        now = time.monotonic()
        with _lock:
            for node in self.chain():
                node._running[token] = now
        return token

    def step_ended(self, token: int) -> float:
        """The step is over: its wall time is added; returns it."""
        now = time.monotonic()
        with _lock:
            started = self._running.get(token, now)
            seconds = Usage(sandbox_seconds=now - started)
            self.own += seconds
            for node in self.chain():
                node._running.pop(token, None)
                node._add(seconds)
        return now - started

    def _seconds_now(self, now: float) -> float:
        return self._counted.sandbox_seconds + sum(now - s for s in self._running.values())

    def seconds_left(self) -> float | None:
        """Seconds until a sandbox-seconds budget here or above runs out at the
        rate its steps run now (None: no such budget)."""
        now = time.monotonic()
        left: float | None = None
        with _lock:
            for node in self.chain():
                allowed = node.limits.get("max_sandbox_seconds")
                if allowed is None:
                    continue
                rate = max(1, len(node._running))
                mine = (allowed - node._seconds_now(now)) / rate
                left = mine if left is None else min(left, mine)
        return left

    # sandboxes (a principal's allowance; a run's budget has none) -----------------

    def acquire_sandbox(self, memory_mb: int) -> Exceeded | None:
        """Take room for one sandbox of ``memory_mb`` here and above, or say why not."""
        with _lock:
            taken: list[Budget] = []
            for node in self.chain():
                found = node._take_sandbox(memory_mb)
                if found is not None:
                    for done in taken:
                        done._give_sandbox(memory_mb)
                    return found
                taken.append(node)
        return None

    def release_sandbox(self, memory_mb: int) -> None:
        with _lock:
            for node in self.chain():
                node._give_sandbox(memory_mb)

    def _take_sandbox(self, memory_mb: int) -> Exceeded | None:
        return None

    def _give_sandbox(self, memory_mb: int) -> None:
        return None

    # tripping ---------------------------------------------------------------------

    def tripped(self) -> Exceeded | None:
        return self._tripped

    def trip(self, why: Exceeded) -> None:
        """Mark this budget spent and tell its listeners (from any thread)."""
        with _lock:
            if self._tripped is None:
                self._tripped = why
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener()

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when this budget or one above
        trips; returns the function that stops it."""
        key = next(_steps)
        with _lock:
            nodes = list(self.chain())
            for node in nodes:
                node._listeners[key] = callback

        def stop() -> None:
            with _lock:
                for node in nodes:
                    node._listeners.pop(key, None)

        return stop

    def _over(self, *, strict: bool, only: tuple[str, ...] | None = None) -> Exceeded | None:
        """A limit of this budget that is over (``strict``) or at least reached."""
        now = time.monotonic()
        for name, allowed in self.limits.items():
            if only is not None and name not in only:
                continue
            if name == "max_tool_calls":
                continue  # refused call by call: see take_tool_call
            used = (
                self._seconds_now(now)
                if name == "max_sandbox_seconds"
                else _RUN_LIMITS[name](self._counted)
            )
            if used > allowed or (not strict and used >= allowed):
                return Exceeded(name, allowed, used, self.scope)
        return None


# --- a principal's budget under legion serve --------------------------------------------


def day_of(when: float) -> str:
    """The UTC day of a time stamp, as ``YYYY-MM-DD`` (daily budgets reset at 00:00 UTC)."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


def next_reset(when: float) -> datetime.datetime:
    """The next 00:00 UTC after ``when``."""
    day = datetime.datetime.fromtimestamp(when, datetime.UTC).date()
    midnight = datetime.datetime.combine(day, datetime.time(), datetime.UTC)
    return midnight + datetime.timedelta(days=1)


def _resets_text(when: float) -> str:
    reset = next_reset(when)
    minutes = max(1, math.ceil((reset.timestamp() - when) / 60))
    return (
        f"it resets at {reset.strftime('%Y-%m-%dT%H:%M:%SZ')} "
        f"(in {minutes // 60} h {minutes % 60} min)"
    )


_DAILY = {"max_tokens_per_day": "max_tokens", "max_cost_usd_per_day": "max_cost_usd"}
PRINCIPAL_LIMITS = (
    "max_tokens_per_day",
    "max_cost_usd_per_day",
    "max_sandboxes",
    "max_sandbox_memory_mb",
)
"""The budgets a principal of ``legion serve`` may have (its token-table keys)."""


class PrincipalBudget(Budget):
    """A principal's budgets, across all its runs: tokens and USD per UTC day,
    sandboxes at once and their memory together. ``days`` holds what each day
    spent (loaded from the store; saved back by the server)."""

    def __init__(
        self,
        name: str,
        limits: Mapping[str, float | None] | None = None,
        *,
        days: Mapping[str, Usage] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(None, scope=f"principal {name}")
        self.name = name
        self.clock = clock
        self.days: dict[str, Usage] = dict(days or {})
        self.dirty: set[str] = set()
        """Days changed since :meth:`saved` was last told of them."""
        self.sandboxes = 0
        self.memory_mb = 0
        self.principal_limits: dict[str, float] = {}
        self.configure(limits)

    def configure(self, limits: Mapping[str, float | None] | None) -> None:
        """Take the principal's current limits (a token table may change them)."""
        with _lock:
            self.principal_limits = {k: v for k, v in (limits or {}).items() if v is not None}
            self._tripped = None  # re-judged against the new figures

    def today(self) -> Usage:
        with _lock:
            return self.days.get(day_of(self.clock()), Usage())

    def _add(self, usage: Usage) -> None:
        day = day_of(self.clock())
        self.days[day] = self.days.get(day, Usage()) + usage
        self.dirty.add(day)

    def tripped(self) -> Exceeded | None:
        found = self._tripped
        if found is not None and found.limit in _DAILY and self._over_daily() is None:
            self._tripped = found = None  # a new day
        return found

    def _over(self, *, strict: bool, only: tuple[str, ...] | None = None) -> Exceeded | None:
        if only is not None and not any(_DAILY.get(k) in only for k in self.principal_limits):
            return None
        return self._over_daily(strict=strict)

    def _over_daily(self, *, strict: bool = False) -> Exceeded | None:
        now = self.clock()
        today = self.days.get(day_of(now), Usage())
        for name, run_key in _DAILY.items():
            allowed = self.principal_limits.get(name)
            if allowed is None:
                continue
            used = _RUN_LIMITS[run_key](today)
            if used > allowed or (not strict and used >= allowed):
                return Exceeded(name, allowed, used, self.scope, _resets_text(now))
        return None

    def check_start(self, memory_mb: int | None) -> Exceeded | None:
        """Why a new run of this principal may not start now (a daily budget
        spent, or no room for a sandbox of ``memory_mb``; None: it needs no
        new sandbox), or None."""
        with _lock:
            found = self._over_daily()
            if found is None and memory_mb is not None:
                found = self._room(memory_mb)
            return found

    def _room(self, memory_mb: int) -> Exceeded | None:
        freed = "one is freed when a sandbox of theirs is removed (a run ends)"
        most = self.principal_limits.get("max_sandboxes")
        if most is not None and self.sandboxes + 1 > most:
            return Exceeded("max_sandboxes", most, self.sandboxes + 1, self.scope, freed)
        memory = self.principal_limits.get("max_sandbox_memory_mb")
        if memory is not None and self.memory_mb + memory_mb > memory:
            return Exceeded(
                "max_sandbox_memory_mb", memory, self.memory_mb + memory_mb, self.scope, freed
            )
        return None

    def _take_sandbox(self, memory_mb: int) -> Exceeded | None:
        found = self._room(memory_mb)
        if found is None:
            self.sandboxes += 1
            self.memory_mb += memory_mb
        return found

    def _give_sandbox(self, memory_mb: int) -> None:
        self.sandboxes = max(0, self.sandboxes - 1)
        self.memory_mb = max(0, self.memory_mb - memory_mb)

    def unsaved(self) -> dict[str, Usage]:
        """The days changed since the last save, with their totals."""
        with _lock:
            return {day: self.days[day] for day in self.dirty}

    def saved(self, days: Mapping[str, Usage]) -> None:
        """Those totals are in the store now; days before today are let go."""
        with _lock:
            today = day_of(self.clock())
            for day, usage in days.items():
                if self.days.get(day) == usage:
                    self.dirty.discard(day)
            for day in [d for d in self.days if d < today and d not in self.dirty]:
                del self.days[day]
