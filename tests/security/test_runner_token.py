"""The runner's one-time Hello token is gone before sandbox code runs.

The controller writes it into a boot file that only the starting sandbox can
name, and removes the file at Hello; the runner keeps no reference to it.
These tests look everywhere sandbox code could: every process's environment
block and command line, the environment, the boot file, the endpoint's
directory, and the runner object itself. Under runc and gVisor.
"""

from __future__ import annotations

import ast
import base64
from collections.abc import AsyncIterator

import pytest

import legion

# Runs inside the sandbox: every byte it can read from where a token could be.
SCAN = r"""
import base64, gc, os, sys
found = {}
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                found[f"/proc/{pid}/{part}"] = f.read()
        except OSError as exc:
            found[f"/proc/{pid}/{part}"] = f"unreadable: {exc.errno}".encode()
found["os.environ"] = repr(dict(os.environ)).encode()
found["sys.argv"] = repr(sys.argv).encode()
try:
    with open(sys.argv[-1], "rb") as f:
        found["boot file"] = f.read()
except OSError as exc:
    found["boot file"] = f"gone: {type(exc).__name__}".encode()
try:
    found["endpoint dir"] = repr(os.listdir("/run/legion")).encode()
except OSError as exc:
    found["endpoint dir"] = f"unlistable: {type(exc).__name__}".encode()
from legion_runner.runner import Runner
runner = next(o for o in gc.get_objects() if isinstance(o, Runner))
found["runner._token"] = repr(runner._token).encode()
{k: base64.b64encode(v).decode() for k, v in found.items()}
"""


@pytest.fixture(params=["runc", "runsc"])
async def started(
    request: pytest.FixtureRequest, runtime: legion.SandboxRuntime
) -> AsyncIterator[tuple[legion.Sandbox, str]]:
    if request.param == "runsc":
        request.getfixturevalue("gvisor_ready")
    limits = legion.SandboxLimits(runtime=None if request.param == "runc" else "runsc")
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        assert sandbox._lease is not None
        yield sandbox, sandbox._lease.connection.hello.token


async def test_no_process_file_or_object_in_the_sandbox_holds_the_token(
    started: tuple[legion.Sandbox, str],
) -> None:
    sandbox, token = started
    assert len(token) >= 32
    result = await sandbox.run(SCAN)
    assert result.error is None, result.error
    seen = {k: base64.b64decode(v) for k, v in result.value.items()}
    # It did look: the runner's own environment and command line were read.
    processes = [k for k in seen if k.startswith("/proc/") and not seen[k].startswith(b"unread")]
    assert len(processes) >= 4, seen.keys()  # init and the runner, environ and cmdline each
    assert any(b"legion_runner" in seen[k] for k in processes if k.endswith("cmdline"))
    holders = [where for where, data in seen.items() if token.encode() in data]
    assert holders == [], f"the Hello token is readable in the sandbox at {holders}"
    assert seen["boot file"].startswith(b"gone: FileNotFoundError"), seen["boot file"]
    assert seen["endpoint dir"].startswith(b"unlistable: PermissionError")
    assert seen["runner._token"] == b"''"
    # Nothing of the controller's in the environment either (the socket's
    # address, message sizes): only what Python itself needs.
    environment = ast.literal_eval(seen["os.environ"].decode())
    assert not [k for k in environment if k.startswith("LEGION_")], environment


async def test_boot_files_do_not_outlive_a_start(runtime: legion.SandboxRuntime) -> None:
    # The pool and a cold start both leave only the socket in the endpoint's
    # directory once their runners said Hello.
    async with legion.Sandbox(runtime=runtime, limits=legion.SandboxLimits(pids=100)) as cold:
        await cold.run("1")
        await runtime.warm()  # no pool start (and so no boot file) under way
        assert runtime.endpoint is not None
        left = sorted(p.name for p in runtime.endpoint.directory.iterdir())
    assert left == ["legion.sock"], left
