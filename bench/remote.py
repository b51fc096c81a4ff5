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

from typing import Any, ClassVar

import legion
from legion.server import ControllerServer, ServerSettings
from legion.testing import FakeOpenAIServer, action

from .common import timed


class Adder(legion.Agent):
    """Adds."""


class Keeper(legion.Agent):
    """Keeps a running total."""

    config: ClassVar[dict[str, Any]] = {"binding_scope": "conversation"}


async def measure(runtime: legion.SandboxRuntime, smoke: bool) -> dict[str, Any]:
    n = 3 if smoke else 50
    out: dict[str, Any] = {}
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
            assert (await legion.run(Adder, "add", runtime=runtime, **config)).output == 1

        out["agent_run_embedded"] = await timed(n, embedded)

        settings = ServerSettings(listen="127.0.0.1:0", run_config=config)
        async with (
            ControllerServer({"Adder": Adder}, settings, runtime=runtime) as server,
            legion.Client(server.address) as client,
        ):

            async def remote() -> None:
                assert (await client.run("Adder", "add")).output == 1

            out["agent_run_remote"] = await timed(n, remote)
        out["agent_run_remote"]["over_embedded_p50_ms"] = (
            out["agent_run_remote"]["p50_ms"] - out["agent_run_embedded"]["p50_ms"]
        )

        async with await legion.start(Keeper, runtime=runtime, **config) as handle:

            async def turn() -> None:
                await handle.call("add")

            out["long_lived_turn"] = await timed(n, turn)

    async with (
        legion.Sandbox(runtime=runtime) as source,
        legion.Sandbox(runtime=runtime) as target,
    ):
        await source.run("import math\nrows = [{'id': i, 'name': f'n{i}'} for i in range(100)]")
        snap = await source.snapshot()

        async def snapshot() -> None:
            await source.snapshot()

        async def restore() -> None:
            await target.restore(snap.blob)

        out["snapshot_small"] = await timed(n, snapshot)
        out["restore_small"] = await timed(n, restore)
        out["snapshot_small_blob_bytes"] = len(snap.blob)
    return out
