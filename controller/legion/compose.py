"""Runs of several agents from host code: at once (:func:`parallel`) or one
after another (:func:`pipeline`), the host-side counterparts of sandbox code's
``SubAgents.parallel`` and ``SubAgents.pipeline``::

    posts, trends = await legion.parallel(
        [(Researcher, "Find recent Python posts"), (Analyst, "Summarise Python trends")]
    )
    summary = await legion.pipeline(
        [(Researcher, "Find this week's Python posts"),
         (Writer, lambda posts: f"Summarise these posts: {posts}")]
    )

Each run gets its own sandbox; keyword options (``vault``, ``model``,
``runtime``, config overrides) go to every :func:`legion.run`. Called from a
host tool during a run, the runs get that run as their ``parent_run_id`` and
use its runtime. Cancelling the call cancels every run and removes its
containers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import telemetry
from ._driver import current_runtime
from .agent import Agent, definition_of, run
from .errors import UsageError

__all__ = ["parallel", "pipeline"]

Task = str | Callable[[Any], str | Awaitable[str]]
"""A pipeline step's task: a string, or a function of the previous answer."""


def _checked(where: str, item: Any, *, callable_task: bool) -> tuple[type[Agent], Any]:
    if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
        raise UsageError(f"{where} must be (AgentClass, task), got {item!r}")
    agent, task = item
    if not (isinstance(agent, type) and issubclass(agent, Agent)):
        raise UsageError(f"{where}: {agent!r} is not a legion.Agent subclass")
    definition_of(agent)  # a bad definition fails before any run starts
    if not (isinstance(task, str) or (callable_task and callable(task))):
        kinds = "a string or a function of the previous answer" if callable_task else "a string"
        raise UsageError(f"{where}: the task must be {kinds}, not {type(task).__name__}")
    return agent, task


def _in_the_callers_run(options: dict[str, Any]) -> dict[str, Any]:
    """Options with the run and runtime of the code calling (a host tool), if any."""
    options = dict(options)
    options.setdefault("parent_run_id", telemetry.current_run()[0])
    options.setdefault("runtime", current_runtime.get())
    return options


async def parallel(
    calls: Sequence[tuple[type[Agent], str]],
    *,
    return_errors: bool = False,
    max_parallel: int = 8,
    **options: Any,
) -> list[Any]:
    """Run ``[(AgentClass, task), ...]`` at the same time (at most
    ``max_parallel`` at once); their answers, in the order given.

    When one run fails, the others are cancelled (their containers removed)
    and its exception is raised, with a note naming the call. With
    ``return_errors=True`` every run goes to its end and a failed one's
    exception stands in its answer's place. ``options`` go to every
    :func:`legion.run`.
    """
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise UsageError("parallel: max_parallel must be a whole number, at least 1")
    pairs = [_checked(f"parallel: calls[{i}]", c, callable_task=False) for i, c in enumerate(calls)]
    options = _in_the_callers_run(options)
    slots = asyncio.Semaphore(max_parallel)

    async def answer(agent: type[Agent], task: str) -> Any:
        async with slots:
            return (await run(agent, task, **options)).output

    tasks = [asyncio.create_task(answer(agent, task)) for agent, task in pairs]
    try:
        if return_errors:
            return list(await asyncio.gather(*tasks, return_exceptions=True))
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # cancelled, or one failed: the rest go, and are gone before this returns
        unfinished = [t for t in tasks if not t.done()]
        for t in unfinished:
            t.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)
    for index, t in enumerate(tasks):
        error = None if t.cancelled() else t.exception()
        if isinstance(error, Exception):
            error.add_note(
                f"parallel: call {index} ({pairs[index][0].__name__}) failed; "
                "the other calls were cancelled"
            )
            raise error
    return [t.result() for t in tasks]


async def pipeline(
    steps: Sequence[tuple[type[Agent], Task]], *, start: Any = None, **options: Any
) -> Any:
    """Run ``[(AgentClass, task), ...]`` one after another; the last answer.

    A task is a string, to which the previous answer is appended (from the
    second step on, or the first when ``start`` is given), or a function of the
    previous answer (sync or async) that returns the task. A failing step
    raises and the steps after it do not run. ``options`` go to every
    :func:`legion.run`.
    """
    checked = [_checked(f"pipeline step {i}", s, callable_task=True) for i, s in enumerate(steps)]
    options = _in_the_callers_run(options)
    previous = start
    for index, (agent, given) in enumerate(checked):
        task = given
        if callable(given):
            task = given(previous)
            if inspect.isawaitable(task):
                task = await task
        elif previous is not None:
            task = f"{given}\n\nThe previous step's answer:\n{previous!r}"
        if not isinstance(task, str):
            raise UsageError(
                f"pipeline step {index}: the task must be a string, not {type(task).__name__}"
            )
        previous = (await run(agent, task, **options)).output
    return previous
