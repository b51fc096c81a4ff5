"""What the controller service and long-lived agents cost.

- one agent run (one model reply, answered without code, so no container is
  involved) embedded, and the same run through `legion serve`'s gRPC API on
  loopback (in this process), with the same fake OpenAI-compatible model: the
  difference is the API's own cost per run;
- one turn of a long-lived agent with ``conversation`` scope that runs code
  (its container kept between turns, so no start-up in it);
- a snapshot of a small namespace and its restore into another sandbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import legion
from legion.server import ControllerServer, ServerSettings
from legion.testing import FakeOpenAIServer, action

from .common import Measures, check, timed


class Adder(legion.Agent):
    """Adds."""


class Keeper(legion.Agent):
    """Keeps a running total."""

    config: ClassVar[dict[str, Any]] = {"binding_scope": "conversation"}


async def measure(runtime: legion.SandboxRuntime, smoke: bool, log: Measures) -> dict[str, Any]:
    """The measures; one that fails is in ``log.failures`` instead."""
    n = 3 if smoke else 50
    out: dict[str, Any] = {}
    await log.run("agent runs", lambda: _agent_runs(runtime, n, out, log))
    await log.run("snapshots", lambda: _snapshots(runtime, n, out, log))
    return out


async def _agent_runs(
    runtime: legion.SandboxRuntime, n: int, out: dict[str, Any], log: Measures
) -> None:
    code = action("eval_and_complete", "total = globals().get('total', 0) + 1\ntotal")
    answer = action("return", result=1)

    def reply(messages: list[dict[str, str]]) -> str:
        return code if "Keeper" in messages[0]["content"] else answer

    with FakeOpenAIServer(reply) as model:
        config: dict[str, Any] = {
            "model": "openai/fake-model",
            "api_base": model.url,
            "api_key": "sk-bench",
        }

        async def embedded() -> None:
            result = await legion.run(Adder, "add", runtime=runtime, **config)
            check(result.output, 1, "output of an embedded agent run")

        await _timed_into(out, log, "agent_run_embedded", n, embedded)

        async def through_the_api() -> None:
            settings = ServerSettings(listen="127.0.0.1:0", run_config=config)
            async with (
                ControllerServer({"Adder": Adder}, settings, runtime=runtime) as server,
                legion.Client(server.address) as client,
            ):

                async def remote() -> None:
                    result = await client.run("Adder", "add")
                    check(result.output, 1, "output of an agent run through the API")

                await _timed_into(out, log, "agent_run_remote", n, remote)

        await log.run("controller server", through_the_api)
        if "agent_run_remote" in out and "agent_run_embedded" in out:
            out["agent_run_remote"]["over_embedded_p50_ms"] = (
                out["agent_run_remote"]["p50_ms"] - out["agent_run_embedded"]["p50_ms"]
            )

        async def long_lived() -> None:
            async with await legion.start(Keeper, runtime=runtime, **config) as handle:

                async def turn() -> None:
                    await handle.call("add")

                await _timed_into(out, log, "long_lived_turn", n, turn)

        await log.run("long-lived agent", long_lived)


async def _snapshots(
    runtime: legion.SandboxRuntime, n: int, out: dict[str, Any], log: Measures
) -> None:
    async with (
        legion.Sandbox(runtime=runtime) as source,
        legion.Sandbox(runtime=runtime) as target,
    ):
        code = "import math\nrows = [{'id': i, 'name': f'n{i}'} for i in range(100)]"
        made = await source.run(code)
        check(made.error, None, "error of the code that fills the namespace")
        snap = await source.snapshot()

        async def snapshot() -> None:
            await source.snapshot()

        async def restore() -> None:
            restored = await target.restore(snap.blob)
            check(dict(restored.failed), {}, "names a restore could not load")

        await _timed_into(out, log, "snapshot_small", n, snapshot)
        await _timed_into(out, log, "restore_small", n, restore)
        out["snapshot_small_blob_bytes"] = len(snap.blob)


async def _timed_into(
    out: dict[str, Any], log: Measures, name: str, n: int, fn: Callable[[], Awaitable[object]]
) -> None:
    if (value := await log.run(name, lambda: timed(n, fn))) is not None:
        out[name] = value
