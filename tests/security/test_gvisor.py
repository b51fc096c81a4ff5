"""The sandbox under gVisor (``SandboxLimits(runtime="runsc")``): the core
round trip, and each limit attacked from inside, asserting what holds under
this runtime (docs/SECURITY.md lists where it differs from runc).

Needs runsc registered with the engine (scripts/ensure-gvisor, run by `make
test`). Without it these tests skip, unless LEGION_REQUIRE_DOCKER=1 (CI),
which makes that a failure.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import docker
import pytest

import legion

from .support import cores_used_spinning
from .test_kernel_surface import PROBES

pytestmark = pytest.mark.docker

GVISOR = legion.SandboxLimits(runtime="runsc", timeout_seconds=30)


@pytest.fixture(scope="module")
def gvisor(gvisor_ready: None) -> None:
    """Shorthand for the shared gvisor_ready fixture."""


def ping(text: str) -> str:
    return f"pong {text} for {legion.vault.require('user')}"


@pytest.fixture(scope="module")
async def gsandbox(gvisor: None, runtime: legion.SandboxRuntime) -> AsyncIterator[legion.Sandbox]:
    """One gVisor sandbox for the probes that leave it usable."""
    async with legion.Sandbox(
        runtime=runtime, limits=GVISOR, tools=[ping], vault={"user": "ada"}
    ) as sandbox:
        yield sandbox


async def test_round_trip_tools_and_bindings(gsandbox: legion.Sandbox) -> None:
    result = await gsandbox.run("x = ping('hi')\nprint('out')\nx")
    assert result.value == "pong hi for ada" and result.stdout == "out\n"
    assert (await gsandbox.run("x.upper()")).value == "PONG HI FOR ADA"
    failed = await gsandbox.run("1 / 0")
    assert failed.error is not None and failed.error.type == "ZeroDivisionError"


async def test_no_network_but_loopback(
    gsandbox: legion.Sandbox, docker_client: docker.DockerClient
) -> None:
    interfaces = await gsandbox.run("import os\nsorted(os.listdir('/sys/class/net'))")
    assert interfaces.value == ["lo"]
    subnet = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    gateway = subnet.get("Gateway") or subnet["Subnet"].rsplit(".", 2)[0] + ".0.1"
    result = await gsandbox.run(
        "import socket\n"
        "def attempt(fn):\n"
        "    try:\n"
        "        fn()\n"
        "        return 'ok'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "def tcp(host):\n"
        "    with socket.create_connection((host, 2375), timeout=3):\n"
        "        pass\n"
        f"[attempt(lambda: tcp('127.0.0.1')), attempt(lambda: tcp({gateway!r})),\n"
        " attempt(lambda: socket.getaddrinfo('example.com', 443))]"
    )
    loopback, bridge, dns = result.value
    assert loopback == "ConnectionRefusedError"
    assert bridge != "ok" and dns == "gaierror"


async def test_filesystem_and_identity(gsandbox: legion.Sandbox) -> None:
    result = await gsandbox.run(
        "import os, errno\n"
        "def write(path, size=1):\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            f.write(b'x' * size)\n"
        "        return 'ok'\n"
        "    except OSError as e:\n"
        "        return errno.errorcode[e.errno]\n"
        "status = open('/proc/self/status').read()\n"
        "caps = [l.split()[1] for l in status.splitlines() if l.startswith('CapEff')]\n"
        "[write('/etc/x'), write('/run/legion/x'), write('/tmp/big', 80 * 1024 * 1024),\n"
        " os.getuid(), caps, write('/var/tmp/x'),\n"
        " [l.split()[3].split(',')[0] for l in open('/proc/mounts') if l.split()[1] == '/']]"
    )
    root, socket_dir, tmp_cap, uid, caps, world_writable, root_mount = result.value
    # gVisor checks permissions before the mount flag, so /etc says EACCES to a
    # non-root user; a world-writable directory shows the mount is read-only.
    assert root in ("EROFS", "EACCES") and socket_dir in ("EROFS", "EACCES")
    assert world_writable == "EROFS" and root_mount == ["ro"]
    assert tmp_cap in ("ENOSPC", "EFBIG")  # /tmp 64 MiB, fsize 64 MiB: one of them stops it
    assert uid == 65534 and caps == ["0000000000000000"]


async def test_kernel_calls_go_to_gvisor_not_the_host(gsandbox: legion.Sandbox) -> None:
    # Under runsc every syscall is answered by gVisor's own kernel in user
    # space: io_uring and memfd_create work there, without reaching the host's.
    result = await gsandbox.run(PROBES)
    probes = result.value
    assert probes["af_vsock"] == errno.errorcode[errno.EAFNOSUPPORT]
    assert probes["ptrace_attach_init"] == "EPERM"
    assert probes["modify_ldt"] == "EPERM"
    assert probes["int80_getpid"] != "ok"
    status = await gsandbox.run("open('/proc/self/status').read()")
    assert "Seccomp:\t0" in status.value  # no host filter inside: gVisor is the boundary


async def test_memory_bomb_is_oom_killed(gvisor: None, runtime: legion.SandboxRuntime) -> None:
    limits = GVISOR.replace(memory_mb=128)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        with pytest.raises(legion.SandboxOOMKilled):
            await sandbox.run(
                "chunks = []\nfor _ in range(100):\n    chunks.append(bytearray(10 * 1024 * 1024))"
            )
        assert (await sandbox.run("'fresh'")).value == "fresh"


async def test_fork_bomb_ends_the_sandbox_not_the_host(
    gvisor: None, runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    # Under runsc a fork bomb exhausts the sentry's host threads (the pids
    # limit) and the whole sandbox stops; under runc the code gets EAGAIN.
    async with legion.Sandbox(runtime=runtime, limits=GVISOR) as sandbox:
        await sandbox.run("kept = 1")
        container = sandbox.container_id
        with pytest.raises(legion.SandboxCrashed):
            await sandbox.run(
                "import os, time\nfor _ in range(400):\n"
                "    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)"
            )
        with pytest.raises(docker.errors.NotFound):
            docker_client.api.inspect_container(container)
        after = await sandbox.run("kept")
        assert after.error is not None and after.error.type == "NameError"


async def test_cpu_quota_holds(
    gvisor: None, runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    limits = GVISOR.replace(cpus=0.5)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        cores = await cores_used_spinning(sandbox, docker_client)
    # Two spinning processes would use 2 cores; the quota holds them near 0.5.
    assert cores < 0.75, f"{cores:.2f} cores used under a 0.5 quota"


async def test_timeout_kills_a_spin(gvisor: None, runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, limits=GVISOR.replace(timeout_seconds=2)) as sb:
        result = await sb.run("while True:\n    pass")
        assert result.timed_out
        assert (await sb.run("'fresh'")).value == "fresh"
