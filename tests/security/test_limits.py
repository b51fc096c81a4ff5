"""Every container limit, attacked from inside the sandbox.

Each test runs hostile code through ``Sandbox.run`` on the real Docker engine
and asserts the specific containment: the errno the kernel returns, the error
the controller reports, the container that is gone afterwards. Limits are made
small where that makes a test faster (memory_mb=64, timeout_seconds=2, ...).

Network probes only ever address loopback and the host's Docker bridge
gateway; nothing else is contacted.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import resource
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

import legion

# runtime_per_image: every test here runs in the runner's image and in the data environment's.
from .support import cores_used_spinning, runtime_per_image  # noqa: F401

pytestmark = pytest.mark.docker

MiB = 1024 * 1024

# Code prepended to probes: run one attempt, report how it failed.
PROBE = """
def _attempt(fn):
    try:
        fn()
    except BaseException as exc:
        return [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
    return "succeeded"
"""


# --- helpers -----------------------------------------------------------------


async def run_ok(sandbox: legion.Sandbox, code: str) -> Any:
    """Run code that must succeed; return its value."""
    result = await sandbox.run(code)
    assert result.error is None, (
        f"{result.error}\n{result.error.traceback}\nstdout: {result.stdout[-2000:]}\n"
        f"stderr: {result.stderr[-2000:]}"
    )
    return result.value


def failed_with(outcome: Any, *errnos: int) -> bool:
    """Whether a probe outcome is an error with one of these errnos."""
    return isinstance(outcome, list) and outcome[1] in errnos


def bridge_gateway(client: docker.DockerClient) -> str:
    """The host's address on the default Docker bridge (its gateway)."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    # The engine did not record one: Docker gives the bridge the subnet's first host.
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


def container_exists(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return False
    return True


def host_pids_running(marker: str) -> list[int]:
    """Pids of processes on this host whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def host_pid_visible(pid: int) -> bool:
    """Whether the engine runs on this host (its container processes are in our /proc)."""
    return pid > 0 and Path(f"/proc/{pid}").exists()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


async def assert_fresh_after_loss(
    sandbox: legion.Sandbox, old_container: str, client: docker.DockerClient
) -> None:
    """The container that ran the code is gone; the next run gets a fresh one
    where the variable ``survivor`` (set before) is undefined."""
    assert not container_exists(client, old_container), (
        f"container {old_container[:12]} still exists after it was discarded"
    )
    result = await sandbox.run("survivor")
    assert result.error is not None and result.error.type == "NameError", result
    assert sandbox.container_id is not None
    assert sandbox.container_id != old_container


# --- 1. network --------------------------------------------------------------


async def test_network_has_only_loopback_and_no_way_out(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    gateway = bridge_gateway(docker_client)
    async with legion.Sandbox(runtime=runtime) as sandbox:
        # First make sure there is nothing to send on: only the loopback interface.
        interfaces, proc_net_dev = await run_ok(
            sandbox,
            (
                "import os\n"
                "sorted(os.listdir('/sys/class/net')), "
                "[line.split(':')[0].strip() "
                " for line in open('/proc/net/dev').read().splitlines()[2:]]"
            ),
        )
        assert interfaces == ["lo"]
        assert proc_net_dev == ["lo"]

        # Only then try to get out: loopback and the host's bridge gateway only.
        outcome = await run_ok(
            sandbox,
            PROBE
            + f"""
import socket
GATEWAY = {gateway!r}
def tcp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
    finally:
        s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"legion-security-test", (host, port))
    finally:
        s.close()
{{
    "tcp_loopback": _attempt(lambda: tcp("127.0.0.1", 8080)),
    "tcp_gateway": _attempt(lambda: tcp(GATEWAY, 2375)),
    "udp_gateway": _attempt(lambda: udp(GATEWAY, 53)),
    "dns": _attempt(lambda: socket.getaddrinfo("example.com", 443)),
    "raw_socket": _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                 socket.IPPROTO_ICMP).close()),
}}
""",
        )
    # Nothing listens on the sandbox's own loopback: refused, not reached elsewhere.
    assert outcome["tcp_loopback"][:2] == ["ConnectionRefusedError", errno.ECONNREFUSED], outcome
    # No route to the host at all.
    assert outcome["tcp_gateway"][1] == errno.ENETUNREACH, outcome
    assert outcome["udp_gateway"][1] == errno.ENETUNREACH, outcome
    # No name resolution.
    assert outcome["dns"][0] == "gaierror", outcome
    # No CAP_NET_RAW either.
    assert outcome["raw_socket"][:2] == ["PermissionError", errno.EPERM], outcome


# --- 2. memory ---------------------------------------------------------------


MEMORY_BOMB = """
chunks = []
for _ in range(100):              # up to 1 GB, 10 MB at a time
    chunks.append(bytearray(10 * 1024 * 1024))
"allocated 1 GB and survived"
"""


async def test_memory_bomb_is_oom_killed_and_sandbox_recovers(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    limits = legion.SandboxLimits(memory_mb=64, timeout_seconds=30)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await run_ok(sandbox, "survivor = 'set before the bomb'")
        bombed = sandbox.container_id
        assert bombed is not None
        started = time.monotonic()
        with pytest.raises(legion.SandboxOOMKilled) as info:
            await sandbox.run(MEMORY_BOMB)
        assert time.monotonic() - started < 15
        assert info.value.exit_code == 137  # SIGKILL from the kernel's OOM killer
        assert "64 MiB" in str(info.value)
        await assert_fresh_after_loss(sandbox, bombed, docker_client)
        assert await run_ok(sandbox, "sum(range(10))") == 45


# --- 3. processes and threads ------------------------------------------------


FORK_BOMB = """
import os, time
children = []
failure = None
try:
    for _ in range(500):
        pid = os.fork()
        if pid == 0:                     # child: hold a pid, do nothing
            try:
                time.sleep(60)
            finally:
                os._exit(0)
        children.append(pid)
except OSError as exc:
    failure = [type(exc).__name__, exc.errno]
forked = len(children)
for pid in children:
    os.kill(pid, 9)
for pid in children:
    os.waitpid(pid, 0)
[forked, failure]
"""


COUNT_PROCESSES = "import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())"


async def test_fork_bomb_hits_pids_limit(runtime: legion.SandboxRuntime) -> None:
    pids = 32
    limits = legion.SandboxLimits(pids=pids, timeout_seconds=30)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        processes = await run_ok(sandbox, COUNT_PROCESSES)
        started = time.monotonic()
        try:
            result = await sandbox.run(FORK_BOMB)
        except legion.SandboxCrashed as exc:
            pytest.fail(
                f"a fork bomb under pids={pids} crashed the sandbox after "
                f"{time.monotonic() - started:.1f} s instead of raising EAGAIN to the code: {exc}",
                pytrace=False,
            )
        assert result.error is None, result
        forked, failure = result.value
        assert failure == ["BlockingIOError", errno.EAGAIN], result.value
        assert 1 <= forked < pids, result.value
        # The children were killed and reaped (no zombies hold pids); the sandbox still works.
        assert await run_ok(sandbox, COUNT_PROCESSES) == processes
        assert await run_ok(sandbox, "forked") == forked


THREAD_BOMB = """
import threading
stop = threading.Event()
threads, failure = [], None
try:
    for _ in range(500):
        t = threading.Thread(target=stop.wait, daemon=True)
        t.start()
        threads.append(t)
except RuntimeError as exc:
    failure = str(exc)
stop.set()
for t in threads:
    t.join()
[len(threads), failure]
"""


async def test_thread_bomb_hits_pids_limit(runtime: legion.SandboxRuntime) -> None:
    pids = 32
    limits = legion.SandboxLimits(pids=pids, timeout_seconds=30)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        started, failure = await run_ok(sandbox, THREAD_BOMB)
        assert failure == "can't start new thread"
        assert 1 <= started < pids
        # Once the threads are gone, threads can be started again.
        assert await run_ok(sandbox, THREAD_BOMB.replace("range(500)", "range(3)")) == [3, None]


# --- 4. read-only root filesystem --------------------------------------------


async def test_root_filesystem_is_read_only(sandbox: legion.Sandbox) -> None:
    outcome = await run_ok(
        sandbox,
        PROBE
        + """
import os
def write(path):
    with open(path, "w") as f:
        f.write("x")
home = os.path.expanduser("~")
{
    "/etc/x": _attempt(lambda: write("/etc/x")),
    "/usr/x": _attempt(lambda: write("/usr/x")),
    "/opt/legion/x": _attempt(lambda: write("/opt/legion/x")),
    "/opt/legion/lib/legion_runner/x": _attempt(lambda: write("/opt/legion/lib/legion_runner/x")),
    "/x": _attempt(lambda: write("/x")),
    "/var/tmp/x": _attempt(lambda: write("/var/tmp/x")),
    "mkdir home": _attempt(lambda: os.makedirs(home, exist_ok=True)),
    "mkdir /home/sandbox": _attempt(lambda: os.mkdir("/home/sandbox")),
    "append runner.py": _attempt(lambda: open("/opt/legion/lib/legion_runner/runner.py", "a")),
    "unlink python3": _attempt(lambda: os.unlink("/usr/bin/python3")),
    "/tmp/x": _attempt(lambda: write("/tmp/x")),
}
""",
    )
    writable = outcome.pop("/tmp/x")
    assert writable == "succeeded", "the probe itself is broken: /tmp should be writable"
    runner_source = outcome.pop("append runner.py")
    assert failed_with(runner_source, errno.EROFS, errno.EACCES), runner_source
    not_read_only = {path: o for path, o in outcome.items() if not failed_with(o, errno.EROFS)}
    assert not not_read_only, f"expected EROFS, got: {not_read_only}"


# --- 5. /tmp: size cap and noexec ----------------------------------------------


async def test_tmp_is_size_capped_and_noexec(runtime: legion.SandboxRuntime) -> None:
    # fsize far above the tmpfs size, so the tmpfs cap is what stops the write.
    limits = legion.SandboxLimits(tmpfs_mb=8, fsize_mb=64)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        outcome = await run_ok(
            sandbox,
            """
import os
st = os.statvfs("/tmp")
written, failure = 0, None
try:
    with open("/tmp/filler", "wb") as f:
        for _ in range(20):          # 20 MB into an 8 MB /tmp
            f.write(b"\\0" * 1024 * 1024)
            f.flush()
            written += 1024 * 1024
except OSError as exc:
    failure = [type(exc).__name__, exc.errno]
size = os.path.getsize("/tmp/filler")
os.unlink("/tmp/filler")
{"capacity": st.f_blocks * st.f_frsize, "written": written, "size": size, "failure": failure}
""",
        )
        assert outcome["failure"] == ["OSError", errno.ENOSPC], outcome
        assert outcome["capacity"] == 8 * MiB, outcome
        assert outcome["size"] <= 8 * MiB, outcome

        noexec = await run_ok(
            sandbox,
            PROBE
            + """
import os, shutil, subprocess, sys
with open("/tmp/script.sh", "w") as f:
    f.write("#!/bin/sh\\necho escaped\\n")
os.chmod("/tmp/script.sh", 0o755)
shutil.copy("/usr/bin/true", "/tmp/true")
os.chmod("/tmp/true", 0o755)
{
    "subprocess script": _attempt(lambda: subprocess.run(["/tmp/script.sh"], check=True)),
    "subprocess binary": _attempt(lambda: subprocess.run(["/tmp/true"], check=True)),
    # Would replace the runner if it worked: the run would then never answer.
    "execv binary": _attempt(lambda: os.execv("/tmp/true", ["/tmp/true"])),
    "execv script": _attempt(lambda: os.execv("/tmp/script.sh", ["/tmp/script.sh"])),
}
""",
        )
        for name, attempt in noexec.items():
            assert attempt[:2] == ["PermissionError", errno.EACCES], (name, noexec)


# --- 6. RLIMIT_FSIZE -------------------------------------------------------------


async def test_file_size_limit(runtime: legion.SandboxRuntime) -> None:
    limits = legion.SandboxLimits(fsize_mb=1, tmpfs_mb=16)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await run_ok(sandbox, "survivor = 'set before the write'")
        container = sandbox.container_id
        outcome = await run_ok(
            sandbox,
            """
import os, signal
failure = None
try:
    with open("/tmp/big", "wb") as f:
        f.write(b"\\0" * 2 * 1024 * 1024)   # 2 MB into one file, limit 1 MiB
except OSError as exc:
    failure = [type(exc).__name__, exc.errno]
ignored = int(open("/proc/self/status").read().split("SigIgn:")[1].split()[0], 16)
{"failure": failure, "size": os.path.getsize("/tmp/big"),
 "sigxfsz_ignored": bool(ignored & (1 << (signal.SIGXFSZ - 1)))}
""",
        )
        # The runner ignores SIGXFSZ (as CPython does), so the code sees EFBIG
        # instead of the whole sandbox being killed.
        assert outcome["sigxfsz_ignored"] is True, outcome
        assert outcome["failure"] == ["OSError", errno.EFBIG], outcome
        assert outcome["size"] == 1 * MiB, outcome
        # Same container, same namespace.
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor") == "set before the write"


# --- 7. user and capabilities -------------------------------------------------


async def test_not_root_and_no_capabilities(sandbox: legion.Sandbox) -> None:
    info = await run_ok(
        sandbox,
        PROBE
        + """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
{
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    "groups": os.getgroups(),
    "status": {k: status[k].strip() for k in
               ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")},
    "setuid": _attempt(lambda: os.setuid(0)),
    "chown": _attempt(lambda: os.chown("/tmp", 0, 0)),
}
""",
    )
    assert 0 not in info["ids"], info
    assert 0 not in info["groups"], info
    status = info["status"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status)
    assert status["NoNewPrivs"] == "1", status
    assert info["setuid"][:2] == ["PermissionError", errno.EPERM], info
    assert info["chown"][:2] == ["PermissionError", errno.EPERM], info


# --- 8. the tool socket's directory ---------------------------------------------


def ping() -> str:
    """Answers pong."""
    return "pong"


async def test_socket_dir_is_read_only_and_tools_still_work(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, tools=[ping]) as sandbox:
        assert await run_ok(sandbox, "ping()") == "pong"
        outcome = await run_ok(
            sandbox,
            PROBE
            + """
import os, socket
SOCK = "/run/legion/legion.sock"
def bind_new():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind("/run/legion/evil.sock")
    finally:
        s.close()
{
    "create file": _attempt(lambda: open("/run/legion/x", "w").close()),
    "mkdir": _attempt(lambda: os.mkdir("/run/legion/d")),
    "unlink socket": _attempt(lambda: os.unlink(SOCK)),
    "rename socket": _attempt(lambda: os.rename(SOCK, "/run/legion/moved.sock")),
    "symlink": _attempt(lambda: os.symlink("/tmp/evil.sock", "/run/legion/link.sock")),
    "chmod socket": _attempt(lambda: os.chmod(SOCK, 0o777)),
    "bind new socket": _attempt(bind_new),
}
""",
        )
        wrong = {k: o for k, o in outcome.items() if not failed_with(o, errno.EROFS, errno.EACCES)}
        assert not wrong, f"expected EROFS or EACCES, got: {wrong}"
        # It cannot list the directory either (0711): another sandbox's boot
        # file, while that one starts, has a name it cannot learn.
        listing = await sandbox.run("import os\nos.listdir('/run/legion')")
        assert listing.error is not None and listing.error.type == "PermissionError", listing
        assert await run_ok(sandbox, "import os\nos.path.exists('/run/legion/legion.sock')")
        # The channel is intact: the same sandbox still reaches its tool.
        assert await run_ok(sandbox, "[ping() for _ in range(3)]") == ["pong"] * 3


# --- 9. timeouts ----------------------------------------------------------------


TIMEOUT = 2.0
GRACE = 1.0
# Start a container, time out, kill it, remove it: generous on a loaded 2-core machine.
SLACK = 4.0


async def test_timeout_stops_cpu_spin(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    limits = legion.SandboxLimits(timeout_seconds=TIMEOUT, kill_grace_seconds=GRACE)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await run_ok(sandbox, "survivor = 1")
        spun = sandbox.container_id
        assert spun is not None
        started = time.monotonic()
        result = await sandbox.run("while True:\n    pass")
        elapsed = time.monotonic() - started
        assert result.timed_out is True
        assert result.error is not None and result.error.type == "TimeoutError", result
        assert TIMEOUT <= elapsed < TIMEOUT + GRACE + SLACK, elapsed
        await assert_fresh_after_loss(sandbox, spun, docker_client)


async def test_timeout_kills_code_and_children_that_ignore_sigterm(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    marker = f"legion-timeout-{uuid.uuid4().hex}"
    code = f"""
import ctypes, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
    " # {marker}"])
# signal.signal() only works in the main thread; sandbox code runs on a worker,
# so ignore SIGTERM process-wide through libc, and block it in this thread too.
ctypes.CDLL(None).signal(signal.SIGTERM, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
ignored = int(open("/proc/self/status").read().split("SigIgn:")[1].split()[0], 16)
print("child", child.pid, "SIGTERM ignored:", bool(ignored & (1 << (signal.SIGTERM - 1))),
      flush=True)
time.sleep(1000)
"""
    limits = legion.SandboxLimits(timeout_seconds=TIMEOUT, kill_grace_seconds=GRACE)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await run_ok(sandbox, "survivor = 1")
        container = sandbox.container_id
        assert container is not None
        init_pid = docker_client.api.inspect_container(container)["State"]["Pid"]
        engine_is_local = host_pid_visible(init_pid)

        started = time.monotonic()
        run = asyncio.create_task(sandbox.run(code))
        seen: list[int] = []
        while engine_is_local and not seen and not run.done():
            await asyncio.sleep(0.05)
            seen = host_pids_running(marker)
        result = await run
        elapsed = time.monotonic() - started

        if engine_is_local:
            assert seen, "the SIGTERM-ignoring child never showed up on the host"
        assert "SIGTERM ignored: True" in result.stdout, result
        assert result.timed_out is True
        assert result.error is not None and result.error.type == "TimeoutError", result
        assert TIMEOUT <= elapsed < TIMEOUT + GRACE + SLACK, elapsed
        # The container is gone, and with it the child that ignored SIGTERM.
        for _ in range(40):  # processes of a removed container may take a moment to vanish
            if not host_pids_running(marker):
                break
            await asyncio.sleep(0.05)
        assert not host_pids_running(marker), "the sandbox's child outlived the timeout"
        await assert_fresh_after_loss(sandbox, container, docker_client)


@pytest.mark.parametrize(
    "code",
    [
        # The runner's cancel arrives as an exception; this code swallows anything.
        "while True:\n    try:\n        while True:\n            pass\n"
        "    except BaseException:\n        pass",
        # Same, in a loop where the swallowing is sure to happen (and is printed).
        "import time\nwhile True:\n    try:\n        time.sleep(0.01)\n"
        "    except BaseException as exc:\n        print('swallowed', type(exc).__name__)",
    ],
    ids=["spin", "sleep"],
)
async def test_timeout_kills_code_that_swallows_the_cancel(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient, code: str
) -> None:
    limits = legion.SandboxLimits(timeout_seconds=TIMEOUT, kill_grace_seconds=GRACE)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await run_ok(sandbox, "survivor = 1")
        container = sandbox.container_id
        assert container is not None
        started = time.monotonic()
        result = await sandbox.run(code)
        elapsed = time.monotonic() - started
        assert result.timed_out is True
        assert result.error is not None and result.error.type == "TimeoutError", result
        assert TIMEOUT <= elapsed < TIMEOUT + GRACE + SLACK, elapsed
        await assert_fresh_after_loss(sandbox, container, docker_client)


# --- 10. output flood ---------------------------------------------------------------


MARKER = re.compile(r"\n\[\.\.\. output truncated: (\d+) more characters not kept \.\.\.\]\n$")


def assert_truncated(text: str, truncated: bool, limit: int, total: int) -> None:
    assert truncated is True
    match = MARKER.search(text)
    assert match, f"no truncation marker at the end of: {text[-200:]!r}"
    kept = len(text) - len(match.group(0))
    assert kept == limit, (kept, limit)
    assert int(match.group(1)) == total - kept, (match.group(1), total, kept)


async def test_output_flood_is_truncated_and_controller_memory_bounded(
    sandbox: legion.Sandbox,
) -> None:
    limit = sandbox.limits.output_limit_bytes
    await run_ok(sandbox, "1")  # the connection and its buffers exist before measuring
    rss_before = rss_kib()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    result = await sandbox.run("print('x' * 100_000_000)")
    assert result.error is None, result.error
    assert_truncated(result.stdout, result.stdout_truncated, limit, 100_000_001)
    assert not result.stderr_truncated

    lines = 300_000
    total = sum(len(f"line {i}\n") for i in range(lines))
    assert total > 3 * limit
    result = await sandbox.run(f"for i in range({lines}):\n    print('line', i)")
    assert result.error is None, result.error
    assert_truncated(result.stdout, result.stdout_truncated, limit, total)
    assert result.stdout.startswith("line 0\nline 1\n")

    result = await sandbox.run(
        f"import sys\nfor i in range({lines}):\n    print('line', i, file=sys.stderr)"
    )
    assert result.error is None, result.error
    assert_truncated(result.stderr, result.stderr_truncated, limit, total)
    assert result.stdout == ""

    del result
    rss_growth_mib = (rss_kib() - rss_before) / 1024
    maxrss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024
    assert rss_growth_mib < 50, f"controller RSS grew by {rss_growth_mib:.1f} MiB"
    assert maxrss_growth_mib < 50, f"controller peak RSS grew by {maxrss_growth_mib:.1f} MiB"
    assert await run_ok(sandbox, "'still here'") == "still here"


# --- 11. over-size messages ------------------------------------------------------------


BIG = 5_000_000  # characters; the default max message is 4 MiB


def measure(text: str) -> int:
    """A tool: how long the text is."""
    return len(text)


def flood() -> str:
    """A tool whose result is larger than one message may carry."""
    return "y" * BIG


def explode() -> str:
    """A tool that fails with an error message larger than one message may carry."""
    raise ValueError("z" * BIG)


TOOLS = [ping, measure, flood, explode]


async def test_oversize_trailing_value_is_a_clean_error(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime) as sandbox:
        await run_ok(sandbox, "survivor = 'kept'")
        container = sandbox.container_id
        result = await sandbox.run(f"'x' * {BIG}")
        assert result.error is not None and result.error.type == "MessageTooLarge", result
        assert not result.timed_out
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor") == "kept"


async def test_oversize_trailing_value_is_not_reported_as_a_value(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime) as sandbox:
        result = await sandbox.run(f"'x' * {BIG}")
        assert result.error is not None and result.error.type == "MessageTooLarge", result
        # The value never crossed: the result must not claim there is one (it
        # would read as a trailing expression that evaluated to None).
        assert (result.has_value, result.value, result.value_repr) == (False, None, None)


async def test_oversize_tool_argument_raises_catchable_error(
    runtime: legion.SandboxRuntime,
) -> None:
    async with legion.Sandbox(runtime=runtime, tools=TOOLS) as sandbox:
        await run_ok(sandbox, "survivor = 'kept'")
        container = sandbox.container_id
        caught = await run_ok(
            sandbox,
            f"""
try:
    measure('a' * {BIG})
    caught = None
except MessageTooLarge as exc:
    caught = [type(exc).__name__, isinstance(exc, ValueError), str(exc)]
caught
""",
        )
        assert caught is not None, "a 5 MB tool argument did not raise MessageTooLarge"
        assert caught[:2] == ["MessageTooLarge", True], caught
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor, ping(), measure('abc')") == ["kept", "pong", 3]


async def test_oversize_tool_result_raises_catchable_error(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, tools=TOOLS) as sandbox:
        await run_ok(sandbox, "survivor = 'kept'")
        container = sandbox.container_id
        caught = await run_ok(
            sandbox,
            """
try:
    flood()
    caught = None
except MessageTooLarge as exc:
    caught = [type(exc).__name__, str(exc)]
caught
""",
        )
        assert caught is not None, "a 5 MB tool result did not raise MessageTooLarge"
        assert caught[0] == "MessageTooLarge", caught
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor, ping()") == ["kept", "pong"]


# Other payloads that can exceed one message. None may crash the sandbox: the
# code's variables must survive, and the caller gets an ordinary error.
OVERSIZE_CASES = {
    "exception message": (f"raise ValueError('x' * {BIG})", "ValueError"),
    "chained exceptions": (
        "try:\n    raise KeyError('k' * 3_000_000)\n"
        "except KeyError:\n    raise ValueError('v' * 3_000_000)",
        "ValueError",
    ),
    "tool error message": (
        "try:\n    explode()\nexcept ValueError as exc:\n    caught = type(exc).__name__\ncaught",
        None,
    ),
}


@pytest.mark.parametrize("case", list(OVERSIZE_CASES))
async def test_oversize_payloads_never_crash_the_sandbox(
    runtime: legion.SandboxRuntime, case: str
) -> None:
    code, error_type = OVERSIZE_CASES[case]
    async with legion.Sandbox(runtime=runtime, tools=TOOLS) as sandbox:
        await run_ok(sandbox, "survivor = 'kept'")
        container = sandbox.container_id
        try:
            result = await sandbox.run(code)
        except legion.SandboxCrashed as exc:
            pytest.fail(f"{case} over the message size crashed the sandbox: {exc}", pytrace=False)
        if error_type is None:
            assert result.error is None, result.error
            assert result.value == "ValueError"
        else:
            assert result.error is not None and result.error.type == error_type, result
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor, ping()") == ["kept", "pong"]


async def test_oversize_code_is_refused_without_crashing(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime, tools=TOOLS) as sandbox:
        await run_ok(sandbox, "survivor = 'kept'")
        container = sandbox.container_id
        code = f"text = '{'a' * BIG}'\nlen(text)"
        result = await sandbox.run(code)  # refused on the host, before sending
        assert result.error is not None and result.error.type == "MessageTooLarge", result
        assert "Send it in parts" in result.error.message
        assert sandbox.container_id == container
        assert await run_ok(sandbox, "survivor, ping()") == ["kept", "pong"]


async def test_larger_max_message_than_runtime_is_refused_up_front(
    runtime: legion.SandboxRuntime,
) -> None:
    # The runtime's channel carries messages up to its own limit: a sandbox
    # asking for more is told where to set it, instead of crashing later.
    limits = legion.SandboxLimits(max_message_bytes=8 * MiB)
    assert limits.max_message_bytes > runtime.limits.max_message_bytes
    with pytest.raises(legion.UsageError, match=r"SandboxRuntime\(limits="):
        await legion.Sandbox(runtime=runtime, limits=limits).start()


async def test_runtime_with_larger_messages_carries_them(docker_ready: None) -> None:
    limits = legion.SandboxLimits(max_message_bytes=8 * MiB)
    async with (
        legion.SandboxRuntime(limits=limits, pool_size=0) as big_runtime,
        legion.Sandbox(runtime=big_runtime) as sandbox,
    ):
        result = await sandbox.run(f"'x' * {BIG}")
        assert result.error is None, result.error
        assert result.value == "x" * BIG


# --- CPU quota -----------------------------------------------------------------


async def test_cpu_quota_holds(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    limits = legion.SandboxLimits(cpus=0.5, timeout_seconds=30)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        cores = await cores_used_spinning(sandbox, docker_client)
    # Two spinning processes would use 2 cores; the quota holds them near 0.5.
    assert cores < 0.75, f"{cores:.2f} cores used under a 0.5 quota"
