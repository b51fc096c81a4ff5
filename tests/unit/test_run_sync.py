"""legion.run_sync: without an event loop, and inside a running one (as in
Jupyter or a web handler), where it runs on a worker thread's loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

import legion
from legion.testing import ScriptedModel, action


class Echo(legion.Agent):
    """Answers what its model says."""


def answering(value: object) -> ScriptedModel:
    return ScriptedModel([action("return", result=value)])


def test_without_a_loop_it_returns_the_answer() -> None:
    assert legion.run_sync(Echo, "hi", model=answering("hello")).output == "hello"


async def test_inside_a_running_loop_it_returns_the_answer() -> None:
    threads: list[str] = []

    def where(messages: list[dict[str, str]]) -> str:
        threads.append(threading.current_thread().name)
        return action("return", result={"seen": messages[1]["content"]})

    caller = asyncio.get_running_loop()
    result = legion.run_sync(Echo, "from a loop", model=ScriptedModel(where))
    assert result.output == {"seen": "from a loop"}
    assert threads == ["legion-run-sync"]  # its own loop, on a worker thread
    assert asyncio.get_running_loop() is caller


async def test_inside_a_running_loop_it_sees_the_callers_vault_and_raises_its_errors() -> None:
    # the model runs on the worker thread: it reads the vault bound here
    reads_vault = ScriptedModel(lambda messages: action("return", result=legion.vault.get("user")))
    with legion.vault.bind(user="ada"):
        result = legion.run_sync(Echo, "hi", model=reads_vault)
    assert result.output == "ada"
    babbling = ScriptedModel(["not an action"] * 5)
    with pytest.raises(legion.MaxRetriesReached):
        legion.run_sync(Echo, "hi", model=babbling, max_retries=1)


def test_run_sync_says_so_in_its_docstring() -> None:
    doc = legion.run_sync.__doc__ or ""
    assert "already running" in doc and "worker thread" in doc
