"""The model misbehaving, through the real litellm path: a FakeOpenAIServer on
loopback answers 429, 500, too late, garbage or nothing at all.

Retryable faults are retried and the run succeeds; when the retries run out
the run raises :class:`legion.ModelError` carrying its id and the
conversation so far; an empty message is fed back to the model as an invalid
action, and :class:`legion.MaxRetriesReached` ends a run where that keeps
happening. No sandbox container outlives its run, and the controller's
footprint does not grow with the number of faults.
"""

from __future__ import annotations

import re
from typing import Any

import docker
import pytest

import legion
from legion.testing import FakeOpenAIServer, Reply, action

from .support import FAULTS, WARMUP, fault_series, tracked_runtime

pytestmark = pytest.mark.docker

RUNS = WARMUP + FAULTS
MODEL_TIMEOUT = 0.25
MODEL_RETRIES = 1

FAULTY: dict[str, Reply] = {
    "429": Reply(status=429, error_message="slow down", retry_after=0.01),
    "500": Reply(status=500, error_message="the model fell over"),
    "timeout": Reply(delay=MODEL_TIMEOUT + 0.5, content=action("return", result="too late")),
    "garbage": Reply(raw_body=b"garbage"),
}
ERROR_NAMES = {
    "429": "RateLimitError",
    "500": "InternalServerError",
    "timeout": "Timeout",
    "garbage": "InternalServerError",  # litellm's name for a body it cannot parse
}
ANSWER = action("return", result=42)
"""A final answer without code: these runs need no container, which keeps them fast."""


class Solver(legion.Agent):
    """Works things out with Python."""

    config = {"max_iterations": 5, "max_retries": 2}


async def run_through(server: FakeOpenAIServer, runtime: legion.SandboxRuntime) -> Any:
    return await legion.run(
        Solver,
        "What is six times seven?",
        runtime=runtime,
        model="openai/fake-model",
        api_base=server.url,
        api_key="sk-test",
        model_retries=MODEL_RETRIES,
        model_retry_backoff=0.01,
        model_timeout=MODEL_TIMEOUT,
    )


def is_run_id(value: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{32}", value) is not None


@pytest.mark.parametrize("fault", sorted(FAULTY))
async def test_retryable_fault_is_retried_then_the_run_succeeds(
    docker_client: docker.DockerClient, fault: str
) -> None:
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer([FAULTY[fault], ANSWER] * RUNS) as server,
    ):

        async def one_fault(i: int) -> None:
            result = await run_through(server, tracked.runtime)
            assert result.output == 42
            assert len(server.requests) == 2 * (i + 1)  # the fault, then its retry
            assert server.requests[-1]["messages"] == server.requests[-2]["messages"]
            assert result.usage.requests == 1

        await fault_series(f"model {fault} then success", tracked.runtime, one_fault, live=0)
        assert server.remaining == 0


@pytest.mark.parametrize("fault", sorted(FAULTY))
async def test_retries_run_out_with_a_model_error(
    docker_client: docker.DockerClient, fault: str
) -> None:
    per_run = [FAULTY[fault]] * (MODEL_RETRIES + 1)
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer(per_run * RUNS) as server,
    ):
        run_ids: set[str] = set()

        async def one_fault(i: int) -> None:
            with pytest.raises(legion.ModelError) as failed:
                await run_through(server, tracked.runtime)
            error = failed.value
            assert len(server.requests) == len(per_run) * (i + 1)
            assert f"failed after {MODEL_RETRIES + 1} attempts" in str(error)
            assert ERROR_NAMES[fault] in str(error)
            assert is_run_id(error.run_id) and error.run_id not in run_ids
            run_ids.add(error.run_id)
            assert [m["role"] for m in error.messages] == ["system", "user"]
            assert error.messages[1]["content"] == "What is six times seven?"

        await fault_series(
            f"model {fault} until retries run out", tracked.runtime, one_fault, live=0
        )


async def test_model_error_mid_run_carries_the_history_and_closes_the_sandbox(
    docker_client: docker.DockerClient,
) -> None:
    first = action("eval_and_continue", "x = 41\nx")
    script = [first, *FAULTY.values(), FAULTY["500"]]  # every kind, then retries run out
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer(script) as server,
    ):
        with pytest.raises(legion.ModelError) as failed:
            await legion.run(
                Solver,
                "What is six times seven?",
                runtime=tracked.runtime,
                model="openai/fake-model",
                api_base=server.url,
                api_key="sk-test",
                model_retries=len(FAULTY),
                model_retry_backoff=0.01,
                model_timeout=MODEL_TIMEOUT,
            )
        assert server.remaining == 0
        error = failed.value
        assert f"failed after {len(FAULTY) + 1} attempts" in str(error)
        assert is_run_id(error.run_id)
        assert [m["role"] for m in error.messages] == ["system", "user", "assistant", "user"]
        assert error.messages[2]["content"] == first
        assert "Value of the last expression:\n41" in error.messages[3]["content"]
        assert error.iterations == 1
        assert error.usage is not None and error.usage.requests == 1
        # The run's sandbox was closed when the run stopped, not at the runtime's close.
        assert tracked.runtime.live_containers == frozenset()


async def test_non_retryable_refusal_is_not_retried(docker_client: docker.DockerClient) -> None:
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer([Reply(status=400, error_message="no such parameter")]) as server,
    ):
        with pytest.raises(legion.ModelError, match="refused the request") as failed:
            await run_through(server, tracked.runtime)
        assert len(server.requests) == 1
        assert is_run_id(failed.value.run_id)
        assert [m["role"] for m in failed.value.messages] == ["system", "user"]


async def test_empty_message_is_fed_back_as_an_invalid_action(
    docker_client: docker.DockerClient,
) -> None:
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer([Reply(content=""), ANSWER] * RUNS) as server,
    ):

        async def one_fault(i: int) -> None:
            result = await run_through(server, tracked.runtime)
            assert result.output == 42
            assert len(server.requests) == 2 * (i + 1)
            retry = server.requests[-1]["messages"]
            assert retry[-2] == {"role": "assistant", "content": ""}
            assert retry[-1]["role"] == "user"
            assert "not a valid action" in retry[-1]["content"]
            assert result.usage.requests == 2

        await fault_series("model empty message then success", tracked.runtime, one_fault, live=0)


async def test_empty_messages_until_max_retries(docker_client: docker.DockerClient) -> None:
    max_retries = Solver.config["max_retries"]
    per_run = [Reply(content="")] * (max_retries + 1)
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        FakeOpenAIServer(per_run * RUNS) as server,
    ):

        async def one_fault(i: int) -> None:
            with pytest.raises(legion.MaxRetriesReached) as stopped:
                await run_through(server, tracked.runtime)
            assert len(server.requests) == len(per_run) * (i + 1)
            assert f"{max_retries + 1} failed steps in a row" in str(stopped.value)
            assert is_run_id(stopped.value.run_id)
            roles = [m["role"] for m in stopped.value.messages]
            assert roles == ["system", "user"] + ["assistant", "user"] * max_retries + ["assistant"]

        await fault_series("model empty messages", tracked.runtime, one_fault, live=0)
