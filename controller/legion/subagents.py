"""Agents as tools: sandbox code hands work to other agents.

    class Editor(legion.Agent):
        \"\"\"Writes articles with the help of a researcher and a fact checker.\"\"\"
        tools = [legion.SubAgents(Researcher, FactChecker)]

Sandbox code then calls::

    notes = SubAgents.call("Researcher", "Find the 2024 figures")
    a, b = SubAgents.parallel([["Researcher", "topic A"], ["Researcher", "topic B"]])
    final = SubAgents.pipeline([["Researcher", "Find the figures"],
                                ["FactChecker", lambda notes: f"Check: {notes}"]])

Only the listed agents may be called. Each sub-agent run gets its own sandbox,
the caller's vault, and ``parent_run_id`` set to the caller's run; cancelling
or timing out the caller's code cancels the sub-agents and removes their
containers.

``parallel`` runs the calls concurrently (at most ``max_parallel`` at a time)
and returns their answers in the order given. When one fails, the others are
cancelled and the call raises, naming the failed agent; pass
``return_errors=True`` to get every answer instead, with
``{"error": {"type": ..., "message": ...}}`` in place of each failed one.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

import pydantic

from . import telemetry
from ._driver import current_runtime
from .agent import Agent, definition_of, run
from .errors import UsageError
from .sandbox.tools import own_timeout

__all__ = ["SubAgents"]

# sandbox-side helper: runs in the sandbox, so a step can be any function there
PIPELINE_SOURCE = '''
def pipeline(steps, start=None):
    """Run agents one after another. Each step is [agent, task]; task is a
    string (the previous answer is appended to it) or a function of the
    previous answer returning the task. Returns the last answer."""
    previous = start
    for index, step in enumerate(steps):
        agent, task = step
        if callable(task):
            task = task(previous)
        elif previous is not None:
            task = f"{task}\\n\\nThe previous step's answer:\\n{previous!r}"
        if not isinstance(task, str):
            raise TypeError(
                f"pipeline step {index}: the task must be a string, not {type(task).__name__}"
            )
        previous = call(agent, task)
    return previous
'''


def _first_paragraph(text: str) -> str:
    return inspect.cleandoc(text).split("\n\n", 1)[0].replace("\n", " ").strip()


def _jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    return value


class SubAgents:
    """The agents that sandbox code may hand work to."""

    _legion_sandbox_source = PIPELINE_SOURCE
    """``pipeline`` runs in the sandbox: its steps may be sandbox functions."""

    def __init__(self, *agents: type[Agent], max_parallel: int = 8) -> None:
        if not agents:
            raise UsageError("SubAgents(...) needs at least one agent class")
        self._agents: dict[str, type[Agent]] = {}
        for agent in agents:
            name = definition_of(agent).name
            if name in self._agents:
                raise UsageError(f"SubAgents: two agents are named {name}")
            self._agents[name] = agent
        if max_parallel < 1:
            raise UsageError("SubAgents: max_parallel must be at least 1")
        self._max_parallel = max_parallel
        lines = [
            f"- {name}: {_first_paragraph(definition_of(a).doc)}"
            for name, a in self._agents.items()
        ]
        self.description = (
            "class SubAgents:\n"
            '    """Hand work to other agents. Each runs on its own and returns its answer.\n\n'
            "    Agents you may call:\n"
            + "\n".join(f"    {line}" for line in lines)
            + '\n    """\n\n'
            "    def call(agent: str, task: str) -> Any:\n"
            '        """Run `agent` on `task`; return its answer."""\n\n'
            "    def parallel(calls: list[list[str]], return_errors: bool = False) -> list:\n"
            '        """Run [[agent, task], ...] at the same time; answers in the same order.\n'
            "        If one fails the others are cancelled and an error is raised, unless\n"
            "        return_errors=True: then a failed one gives\n"
            '        {"error": {"type": ..., "message": ...}}."""\n\n'
            "    def pipeline(steps: list, start=None) -> Any:\n"
            '        """[[agent, task], ...] one after another. A task is a string (the previous\n'
            "        answer is appended to it) or a function of the previous answer that\n"
            '        returns the task. Returns the last answer."""\n'
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._agents)

    def _agent(self, name: str) -> type[Agent]:
        agent = self._agents.get(name)
        if agent is None:
            raise LookupError(
                f"{name!r} is not an agent you may call; you may call: {', '.join(self._agents)}"
            )
        return agent

    async def _run(self, name: str, task: str) -> Any:
        agent = self._agent(name)
        parent, _ = telemetry.current_run()
        result = await run(agent, task, runtime=current_runtime.get(), parent_run_id=parent)
        return _jsonable(result.output)

    @own_timeout
    async def call(self, agent: str, task: str) -> Any:
        """Run ``agent`` on ``task``; return its answer."""
        return await self._run(agent, task)

    @own_timeout
    async def parallel(self, calls: list[list[str]], return_errors: bool = False) -> list[Any]:
        """Run ``[[agent, task], ...]`` concurrently; answers in order."""
        pairs: list[tuple[str, str]] = []
        for index, item in enumerate(calls):
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise ValueError(f"calls[{index}] must be [agent, task], got {item!r}")
            pairs.append((str(item[0]), str(item[1])))
        for name, _ in pairs:
            self._agent(name)  # refuse an unlisted agent before starting any
        slots = asyncio.Semaphore(self._max_parallel)

        async def one(name: str, task: str) -> Any:
            async with slots:
                return await self._run(name, task)

        tasks = [asyncio.create_task(one(name, task)) for name, task in pairs]
        if return_errors:
            done = await asyncio.gather(*tasks, return_exceptions=True)
            return [
                {"error": {"type": type(r).__name__, "message": str(r)}}
                if isinstance(r, Exception)
                else r
                for r in done
            ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = next(
                (
                    i
                    for i, t in enumerate(tasks)
                    if t.done() and not t.cancelled() and t.exception()
                ),
                None,
            )
            if failed is not None or any(not t.done() for t in tasks):
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if failed is not None:
            exc = tasks[failed].exception()
            name = pairs[failed][0]
            raise RuntimeError(
                f"parallel: call {failed} ({name}) failed with {type(exc).__name__}: {exc}; "
                "the other calls were cancelled"
            )
        return [t.result() for t in tasks]
