"""The sandbox round trip against the real Docker engine: values, output,
errors, bindings, host tools and the vault."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import docker
import pydantic
import pytest

import legion

from ..conftest import CONTAINER_RUNTIME

pytestmark = pytest.mark.docker


class Calculator:
    """Arithmetic done on the host."""

    def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    def scale(self, values: list[float], *, factor: float = 2.0) -> list[float]:
        return [v * factor for v in values]

    def divide(self, a: float, b: float) -> float:
        return a / b


class InsufficientFunds(Exception):
    pass


class Bank:
    def withdraw(self, amount: int) -> int:
        raise InsufficientFunds(f"cannot withdraw {amount}: balance is 10")


class Point(pydantic.BaseModel):
    x: int
    y: int


@dataclass
class Opaque:
    label: str


class Shapes:
    def point(self) -> Point:
        return Point(x=1, y=2)

    def opaque(self) -> object:
        return Opaque("host-only").__class__  # a class: JSON cannot carry it

    async def later(self, value: int) -> int:
        await asyncio.sleep(0.01)
        return value + 1


async def test_the_shared_runtime_uses_the_container_runtime_asked_for(
    sandbox: legion.Sandbox, docker_client: docker.DockerClient
) -> None:
    """`make test` runs this file again with LEGION_TEST_RUNTIME=runsc: make
    sure that pass really is under gVisor (and the first one under runc)."""
    await sandbox.run("1")
    assert sandbox.container_id is not None
    info = docker_client.api.inspect_container(sandbox.container_id)
    assert info["HostConfig"]["Runtime"] == (CONTAINER_RUNTIME or "runc")


async def test_value_stdout_and_duration(sandbox: legion.Sandbox) -> None:
    result = await sandbox.run("print('hello'); import sys; print('warn', file=sys.stderr)\n6 * 7")
    assert result.ok
    assert result.value == 42
    assert result.has_value
    assert result.stdout == "hello\n"
    assert result.stderr == "warn\n"
    assert result.duration > 0


async def test_trailing_expression_only(sandbox: legion.Sandbox) -> None:
    statement = await sandbox.run("x = 5")
    assert statement.ok and not statement.has_value and statement.value is None
    expression = await sandbox.run("[x, {'k': (1, 2)}, None]")
    assert expression.value == [5, {"k": [1, 2]}, None]
    none_value = await sandbox.run("None")
    assert none_value.has_value and none_value.value is None


async def test_error_carries_type_message_and_sandbox_traceback(sandbox: legion.Sandbox) -> None:
    result = await sandbox.run("def f(n):\n    return 10 / n\nprint('before')\nf(0)")
    assert not result.ok
    assert result.error is not None
    assert result.error.type == "ZeroDivisionError"
    assert result.error.message == "division by zero"
    assert "line 2, in f" in result.error.traceback
    assert "return 10 / n" in result.error.traceback
    assert "legion_runner" not in result.error.traceback  # runner frames are hidden
    assert result.stdout == "before\n"


async def test_syntax_error_and_system_exit_do_not_end_the_sandbox(sandbox: legion.Sandbox) -> None:
    syntax = await sandbox.run("def broken(:\n  pass")
    assert syntax.error is not None and syntax.error.type == "SyntaxError"
    leaving = await sandbox.run("import sys\nsys.exit(3)")
    assert leaving.error is not None and leaving.error.type == "SystemExit"
    assert (await sandbox.run("'still here'")).value == "still here"


async def test_non_json_value_comes_back_as_marked_repr(sandbox: legion.Sandbox) -> None:
    result = await sandbox.run(
        "class Thing:\n    def __repr__(self):\n        return 'Thing<1>'\nThing()"
    )
    assert result.value is None
    assert result.value_repr == "Thing<1>"


async def test_bindings_persist_within_a_sandbox_and_not_across(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as first:
        await first.run("counter = 1\ndef bump():\n    global counter\n    counter += 1")
        await first.run("bump()")
        assert (await first.run("counter")).value == 2
        reset = await first.run("counter", reset=True)
        assert reset.error is not None and reset.error.type == "NameError"
    async with legion.Sandbox(runtime=runtime) as second:
        result = await second.run("counter")
        assert result.error is not None and result.error.type == "NameError"


async def test_tool_with_positional_and_keyword_arguments(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(tools=[Calculator], runtime=runtime) as sandbox:
        result = await sandbox.run(
            "a = Calculator.add(2, b=3)\n"
            "b = Calculator.scale([1, 2.5], factor=4)\n"
            "c = Calculator.add(*[1, 1])\n"
            "[a, b, c]"
        )
        assert result.value == [5, [4.0, 10.0], 2]
        doc = await sandbox.run("Calculator.add.__doc__")
        assert "(a: int, b: int) -> int" in doc.value and "Add two integers." in doc.value


async def test_tool_exception_is_typed_and_catchable(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(tools=[Calculator, Bank], runtime=runtime) as sandbox:
        result = await sandbox.run(
            "caught = []\n"
            "try:\n"
            "    Calculator.divide(1, 0)\n"
            "except ZeroDivisionError as e:\n"
            "    caught.append(('builtin', type(e).__name__, str(e), isinstance(e, ToolError)))\n"
            "try:\n"
            "    Bank.withdraw(50)\n"
            "except ToolError as e:\n"
            "    caught.append(('custom', type(e).__name__, str(e), e.tool, e.function))\n"
            "caught"
        )
        assert result.ok, result.error
        assert result.value == [
            ["builtin", "ZeroDivisionError", "float division by zero", True],
            [
                "custom",
                "InsufficientFunds",
                "cannot withdraw 50: balance is 10",
                "Bank",
                "withdraw",
            ],
        ]
        uncaught = await sandbox.run("Bank.withdraw(1)")
        assert uncaught.error is not None and uncaught.error.type == "InsufficientFunds"
        # Nothing of the host leaks: no host path, no host traceback.
        assert __file__ not in uncaught.error.traceback
        assert "site-packages" not in uncaught.error.traceback


async def test_wrong_argument_types_are_rejected(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(tools=[Calculator], runtime=runtime) as sandbox:
        result = await sandbox.run(
            "errors = []\n"
            "for call in (lambda: Calculator.add('one', 2), lambda: Calculator.add(1),\n"
            "             lambda: Calculator.add(1, 2, c=3), lambda: Calculator.add({}, [])):\n"
            "    try:\n"
            "        call()\n"
            "    except ToolArgumentError as e:\n"
            "        errors.append(str(e))\n"
            "errors"
        )
        assert result.ok, result.error
        assert len(result.value) == 4
        assert "a: Input should be a valid integer" in result.value[0]
        assert "missing" in result.value[1].lower()
        assert "unexpected" in result.value[2].lower()
        unsendable = await sandbox.run(
            "try:\n    Calculator.add(object(), 1)\nexcept TypeError as e:\n    msg = str(e)\nmsg"
        )
        assert "must be JSON values" in unsendable.value


async def test_unknown_tools_and_functions_are_rejected(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(tools=[Calculator], runtime=runtime) as sandbox:
        missing = await sandbox.run("Calculator.multiply(2, 3)")
        assert missing.error is not None and missing.error.type == "AttributeError"
        # Sandbox code can bypass its stubs and forge calls on the channel; the
        # controller's allowlist is what decides.
        forged = await sandbox.run(
            "import gc\n"
            "from legion_runner.runner import Runner\n"
            "runner = next(o for o in gc.get_objects() if isinstance(o, Runner))\n"
            "results = []\n"
            "for tool, fn in (('Secrets', 'read'), ('Calculator', 'multiply'),\n"
            "                 ('Calculator', '__init__'), ('Calculator', '')):\n"
            "    try:\n"
            "        runner.call_tool(tool, fn, (), {})\n"
            "    except ToolNotAllowed as e:\n"
            "        results.append(str(e))\n"
            "results"
        )
        assert forged.ok, forged.error
        assert len(forged.value) == 4
        assert all("is not a tool this sandbox may call" in m for m in forged.value)
        assert "allowed: Calculator.add, Calculator.divide, Calculator.scale" in forged.value[0]


async def test_eight_concurrent_tool_calls_from_threads(runtime: legion.SandboxRuntime) -> None:
    # The host tool only returns when all eight calls are in flight together.
    barrier = threading.Barrier(8, timeout=20)

    def rendezvous(i: int) -> int:
        barrier.wait()
        return i * i

    async with legion.Sandbox(tools=[rendezvous], runtime=runtime) as sandbox:
        result = await sandbox.run(
            "import threading\n"
            "out = [None] * 8\n"
            "def work(i):\n"
            "    out[i] = rendezvous(i)\n"
            "threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
            "for t in threads: t.start()\n"
            "for t in threads: t.join()\n"
            "out"
        )
        assert result.ok, result.error
        assert result.value == [i * i for i in range(8)]


async def test_async_tools_and_json_mapping_of_results(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(tools=[Shapes], runtime=runtime) as sandbox:
        result = await sandbox.run(
            "p = Shapes.point()\no = Shapes.opaque()\n[p, Shapes.later(41), type(o).__name__, o]"
        )
        assert result.ok, result.error
        point, later, kind, opaque = result.value
        assert point == {"x": 1, "y": 2}
        assert later == 42
        assert kind == "HostRepr"  # marked: a repr, not the value
        assert "Opaque" in opaque


async def test_vault_reaches_tools_and_never_the_container(runtime: legion.SandboxRuntime) -> None:
    secret = "sk-test-5f1d8c0b-never-in-the-sandbox"

    def whoami() -> str:
        token = legion.vault.require("api_key")
        assert token == secret  # the tool can use the secret...
        return str(legion.vault.get("user_id"))  # ...and returns only what it chooses

    async with legion.Sandbox(
        tools=[whoami], runtime=runtime, vault={"api_key": secret, "user_id": 7}
    ) as sandbox:
        assert (await sandbox.run("whoami()")).value == "7"
        probe = await sandbox.run(
            "import os, stat\n"
            "needle = " + repr(secret[:12]) + ".encode()\n"
            "hits = []\n"
            "for pid in os.listdir('/proc'):\n"
            "    if pid.isdigit():\n"
            "        for name in ('environ', 'cmdline'):\n"
            "            try:\n"
            "                if needle in open(f'/proc/{pid}/{name}', 'rb').read():\n"
            "                    hits.append(f'/proc/{pid}/{name}')\n"
            "            except OSError:\n"
            "                pass\n"
            "if needle in repr(dict(os.environ)).encode(): hits.append('os.environ')\n"
            "for root, dirs, files in os.walk('/'):\n"
            "    skip = ('/proc', '/sys', '/dev')\n"
            "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]\n"
            "    for f in files:\n"
            "        path = os.path.join(root, f)\n"
            "        try:\n"
            "            st = os.lstat(path)\n"
            "            if stat.S_ISREG(st.st_mode) and st.st_size < 2_000_000 \\\n"
            "                    and needle in open(path, 'rb').read():\n"
            "                hits.append(path)\n"
            "        except OSError:\n"
            "            pass\n"
            "hits"
        )
        assert probe.ok, probe.error
        assert probe.value == []
    # Unbound keys are a clear error for the tool, shown to the code by type.
    async with legion.Sandbox(tools=[whoami], runtime=runtime) as bare:
        result = await bare.run("whoami()")
        assert result.error is not None and result.error.type == "VaultKeyError"
        assert "api_key" in result.error.message


async def test_vault_bound_by_the_caller_context(runtime: legion.SandboxRuntime) -> None:
    def tenant() -> str:
        return str(legion.vault.require("tenant"))

    async with legion.Sandbox(tools=[tenant], runtime=runtime) as sandbox:
        with legion.vault.bind(tenant="acme"):
            assert (await sandbox.run("tenant()")).value == "acme"
        with legion.vault.bind(tenant="globex"):
            assert (await sandbox.run("tenant()")).value == "globex"


async def test_closed_sandbox_refuses_work(runtime: legion.SandboxRuntime) -> None:
    sandbox = legion.Sandbox(runtime=runtime)
    await sandbox.start()
    container = sandbox.container_id
    assert container in runtime.live_containers
    await sandbox.close()
    assert container not in runtime.live_containers
    with pytest.raises(legion.SandboxClosed):
        await sandbox.run("1")


async def test_default_runtime_is_used_without_one(docker_ready: None) -> None:
    async with legion.Sandbox() as sandbox:
        assert (await sandbox.run("sum(range(10))")).value == 45
    default = await legion.sandbox.default_runtime()
    assert sandbox._runtime is default
    await default.aclose()
    assert default.live_containers == frozenset()


async def test_cold_start_without_a_pool(docker_ready: None) -> None:
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        async with legion.Sandbox(runtime=runtime) as sandbox:
            assert (await sandbox.run("'cold'")).value == "cold"
        assert runtime.live_containers == frozenset()


async def test_warm_pool_hands_out_started_containers(docker_ready: None) -> None:
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        await runtime.warm()  # the pool fills in the background
        ready = runtime._ready[0].container_id
        async with legion.Sandbox(runtime=runtime) as sandbox:
            assert sandbox.container_id == ready
            assert (await sandbox.run("1 + 1")).value == 2


async def test_missing_image_says_how_to_build_it(docker_ready: None) -> None:
    runtime = legion.SandboxRuntime(image="legion-sandbox:no-such-build", pool_size=0)
    with pytest.raises(legion.ImageNotFound, match=r"make image.*legion image build"):
        await runtime.start()
    await runtime.aclose()


async def test_channel_refuses_replayed_unknown_and_malformed_hellos(
    runtime: legion.SandboxRuntime,
) -> None:
    # Sandbox code dials the controller's socket itself: its own (used) token,
    # a made-up one, and a stream that does not start with Hello.
    async with legion.Sandbox(runtime=runtime) as sandbox:
        result = await sandbox.run(
            "import gc, grpc\n"
            "from legion_runner.runner import Runner\n"
            "from legion_runner._proto import sandbox_pb2 as pb, sandbox_pb2_grpc as pbg\n"
            "runner = next(o for o in gc.get_objects() if isinstance(o, Runner))\n"
            "def attempt(first):\n"
            "    channel = grpc.insecure_channel('unix:///run/legion/legion.sock')\n"
            "    try:\n"
            "        for _ in pbg.SandboxChannelStub(channel).Connect(iter([first])):\n"
            "            return 'got a message'\n"
            "        return 'stream ended'\n"
            "    except grpc.RpcError as e:\n"
            "        return e.code().name\n"
            "    finally:\n"
            "        channel.close()\n"
            "[attempt(pb.RunnerMessage(hello=pb.Hello(token=runner._token))),\n"
            " attempt(pb.RunnerMessage(hello=pb.Hello(token='made-up'))),\n"
            " attempt(pb.RunnerMessage(output=pb.Output(exec_id='x')))]"
        )
        assert result.ok, result.error
        assert result.value == ["PERMISSION_DENIED", "PERMISSION_DENIED", "INVALID_ARGUMENT"]
        assert (await sandbox.run("'still served'")).value == "still served"


async def test_runner_crash_is_a_distinct_error_and_the_next_run_is_fresh(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as sandbox:
        await sandbox.run("kept = 1")
        with pytest.raises(legion.SandboxCrashed) as crash:
            await sandbox.run("import os\nprint('going down', flush=True)\nos._exit(7)")
        assert not isinstance(crash.value, legion.SandboxOOMKilled)
        assert crash.value.exit_code == 7
        assert "variables from earlier runs are gone" in str(crash.value)
        after = await sandbox.run("kept")
        assert after.error is not None and after.error.type == "NameError"


async def test_timeout_keeps_what_the_code_printed_before(runtime: legion.SandboxRuntime) -> None:
    limits = legion.SandboxLimits(timeout_seconds=1.5)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        result = await sandbox.run("print('step 1 done')\nwhile True:\n    pass")
        assert result.timed_out
        assert result.stdout.startswith("step 1 done\n")


async def test_engine_errors_become_backend_errors(docker_ready: None) -> None:
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        limits = legion.SandboxLimits(runtime="no-such-runtime")
        with pytest.raises(legion.BackendError, match="Docker said"):
            await legion.Sandbox(runtime=runtime, limits=limits).start()
        assert runtime.live_containers == frozenset()  # nothing half-created is left
