"""Long-lived agents: turns in order, history, binding scopes across turns and
container reclaims, pools, stores. Scripted model, real sandboxes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

import legion
from legion.store import MemoryStore, SQLiteStore
from legion.testing import ScriptedModel, action

from ..reliability.support import container_exists, wait_until

pytestmark = pytest.mark.docker


class Notebook(legion.Agent):
    """Keeps notes between questions."""

    config = {"max_iterations": 3, "max_retries": 1}


class Keeper(legion.Agent):
    """Keeps variables between questions."""

    config = {"binding_scope": "conversation", "max_iterations": 3, "max_retries": 1}


def user_messages(model: ScriptedModel, request: int) -> list[str]:
    return [m["content"] for m in model.requests[request] if m["role"] == "user"]


async def test_calls_keep_the_history(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel([action("return", result="noted"), action("return", result="blue")])
    async with await legion.start(Notebook, model=model, runtime=runtime) as handle:
        first = await handle.call("My favourite colour is blue.")
        second = await handle.call("What is my favourite colour?")
    assert (first.output, second.output) == ("noted", "blue")
    assert first.run_id != second.run_id
    # the second turn's request carries the first turn, then the new question
    assert user_messages(model, 1) == [
        "My favourite colour is blue.",
        "What is my favourite colour?",
    ]
    assert [m["role"] for m in handle.history] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert handle.turns == 2


async def test_cast_then_call_run_in_order(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(lambda messages: action("return", result=messages[-1]["content"]))
    async with await legion.start(Notebook, model=model, runtime=runtime) as handle:
        first = handle.cast("one")
        second = handle.cast("two")
        third = await handle.call("three")
        assert handle.busy == 0
        assert (await handle.result_of(first)).output == "one"
        assert (await handle.result_of(second)).output == "two"
    assert third.output == "three"
    assert [user_messages(model, i)[-1] for i in range(3)] == ["one", "two", "three"]
    # each turn saw every earlier one
    assert user_messages(model, 2) == ["one", "two", "three"]


async def test_turn_scope_forgets_variables_between_calls(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [
            action("eval_and_complete", "secret = 41\nsecret + 1"),
            action("eval_and_complete", "secret"),
            action("return", result="gone"),
        ]
    )
    async with await legion.start(Notebook, model=model, runtime=runtime) as handle:
        assert (await handle.call("remember 41")).output == 42
        assert (await handle.call("what was it?")).output == "gone"
    assert "NameError" in user_messages(model, 2)[-1]


async def test_conversation_scope_keeps_variables_across_calls_and_a_reclaim(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(
        [
            action(
                "eval_and_complete", "import math as m\ntotal = 41\nsquare = lambda x: x * x\ntotal"
            ),
            action("eval_and_complete", "total += 1\ntotal"),
            action("eval_and_complete", "[total, m.floor(2.5)]"),
        ]
    )
    async with await legion.start(Keeper, model=model, runtime=runtime) as handle:
        assert (await handle.call("start at 41")).output == 41
        kept = handle.container_id
        assert kept is not None
        assert (await handle.call("add one")).output == 42
        assert handle.container_id == kept  # same container between turns

        await handle.reclaim()  # what the idle timeout does
        assert handle.container_id is None
        assert not await container_exists(docker.from_env(), kept)

        assert (await handle.call("and now?")).output == [42, 2]
        assert handle.container_id not in (None, kept)  # restored into a fresh one
    # the model was told what could not be kept across the reclaim
    last_task = user_messages(model, 2)[-1]
    assert last_task.startswith("and now?")
    assert "square" in last_task and "could not be kept" in last_task


async def test_idle_timeout_reclaims_the_container(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [action("eval_and_complete", "n = 7\nn"), action("eval_and_complete", "n * 6")]
    )
    async with await legion.start(Keeper, model=model, runtime=runtime, idle_timeout=0.2) as h:
        assert (await h.call("seven")).output == 7
        await wait_until(lambda: h.container_id is None, 30, "the idle container's reclaim")
        assert (await h.call("times six")).output == 42


async def test_a_failed_turn_does_not_end_the_agent(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [
            "not an action",
            "still not an action",  # max_retries=1: the second failure ends the turn
            action("return", result="fine"),
        ]
    )
    async with await legion.start(Notebook, model=model, runtime=runtime) as handle:
        with pytest.raises(legion.MaxRetriesReached):
            await handle.call("break")
        assert handle.history == []  # a failed turn leaves the history as it was (empty)
        assert (await handle.call("work")).output == "fine"
    assert user_messages(model, 2) == ["work"]


async def test_stop_with_cancel_fails_queued_turns_and_leaves_no_container(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel([action("eval_and_continue", "import time\ntime.sleep(30)")] * 3)
    handle = await legion.start(Keeper, model=model, runtime=runtime)
    running = handle.cast("sleep")
    queued = handle.cast("queued")
    await wait_until(lambda: handle.container_id is not None, 30, "a container")
    kept = handle.container_id
    await handle.stop(cancel=True)
    for turn in (running, queued):
        with pytest.raises(legion.ConversationError, match="cancelled"):
            await handle.result_of(turn)
    with pytest.raises(legion.ConversationError, match="stopped"):
        handle.cast("too late")
    assert handle.container_id is None
    assert kept is not None and not await container_exists(docker.from_env(), kept)


async def test_cancelling_a_call_cancels_its_turn(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [action("eval_and_continue", "import time\ntime.sleep(30)"), action("return", result=1)]
    )
    async with await legion.start(Keeper, model=model, runtime=runtime) as handle:
        call = asyncio.create_task(handle.call("sleep"))
        await wait_until(lambda: handle.container_id is not None, 30, "a container")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await handle.call("next")).output == 1


async def test_resume_from_a_store_keeps_history_and_bindings(
    runtime: legion.SandboxRuntime, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "conversations.db")
    model = ScriptedModel(
        [action("eval_and_complete", "total = 40\ntotal"), action("eval_and_complete", "total + 2")]
    )
    with legion.testing.use_models({"Keeper": model}):
        first = await legion.start(Keeper, runtime=runtime, store=store)
        assert (await first.call("forty")).output == 40
        await first.stop()
        store.close()

        # a new store object on the same file: as after a restart
        reopened = SQLiteStore(tmp_path / "conversations.db")
        again = await legion.start(
            Keeper, runtime=runtime, store=reopened, conversation_id=first.id
        )
        assert again.turns == 1
        assert (await again.call("plus two")).output == 42
        await again.stop()
    assert user_messages(model, 1) == ["forty", "plus two"]
    stored = await reopened.load(first.id)
    assert stored is not None and stored.turns == 2 and stored.snapshot


async def test_a_conversation_belongs_to_its_agent(runtime: legion.SandboxRuntime) -> None:
    store = MemoryStore()
    handle = await legion.start(Notebook, runtime=runtime, store=store, model=ScriptedModel([]))
    await handle.stop()
    with pytest.raises(legion.ConversationError, match="belongs to agent Notebook"):
        await legion.start(Keeper, runtime=runtime, store=store, conversation_id=handle.id)


async def test_a_pool_sends_each_turn_to_the_least_busy(runtime: legion.SandboxRuntime) -> None:
    seen: list[int] = []

    def reply(messages: list[dict[str, str]]) -> str:
        return action("eval_and_complete", "import time\ntime.sleep(0.3)\n1")

    model = ScriptedModel(reply)
    crew = await legion.pool(Notebook, 2, model=model, runtime=runtime)
    turns = [crew.cast(f"job {i}") for i in range(4)]
    assert [m.busy for m in crew.members] == [2, 2]
    results = [await crew.result_of(t) for t in turns]
    seen.extend(r.output for r in results)
    await crew.stop()
    assert seen == [1, 1, 1, 1]
    assert [m.turns for m in crew.members] == [2, 2]


def test_bad_input_is_refused_clearly() -> None:
    async def main() -> None:
        handle = await legion.start(Notebook, model=ScriptedModel([]))
        with pytest.raises(legion.UsageError, match="non-empty string"):
            handle.cast("  ")
        with pytest.raises(legion.UsageError, match="no turn"):
            await handle.result_of("nope")
        await handle.stop()
        with pytest.raises(legion.UsageError, match="size of at least 1"):
            await legion.pool(Notebook, 0)

    asyncio.run(main())
