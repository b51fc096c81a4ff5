"""The escape corpus: hostile snippets, grouped by what they attack, each run
through the public API under runc and under gVisor, with the containment it
must show.

Each entry is ``(category, name, code, expected)``. ``code`` ends with an
expression; ``expected`` is the value it must have, or a dict of
``{"runc": ..., "runsc": ...}`` where the runtimes answer differently (see
docs/SECURITY.md). Entries that end the sandbox (memory, fork bombs, timeouts)
are in test_limits.py and test_gvisor.py; these leave it usable, so each
runtime shares one sandbox per category and the last check of every category
is that the sandbox still answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest

import legion

# Every test here runs in the runner's image and in the data environment's.
from .support import runtime_per_image  # noqa: F401

pytestmark = pytest.mark.docker

PRELUDE = r"""
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def name(number):
    return errno.errorcode.get(number, str(number))

def attempt(fn):
    try:
        fn()
        return "ok"
    except socket.gaierror:
        return "gaierror"
    except OSError as e:
        return name(e.errno) if e.errno else type(e).__name__

def raw(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else name(ctypes.get_errno())

def write(path, data=b"x"):
    with open(path, "wb") as f:
        f.write(data)
"""

DENIED_FS = {"runc": "EROFS", "runsc": "EACCES"}  # gVisor checks permissions first

# A probe that leaves state in the process (an io_uring ring under gVisor)
# runs in a child, so later entries see a clean runner.
IN_A_CHILD = (
    "import subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', " + repr(PRELUDE) + " + 'print({})'],\n"
    "               capture_output=True, text=True).stdout.strip()"
)  # gVisor checks permissions first

CORPUS: list[tuple[str, str, str, Any]] = [
    # --- network: nothing but loopback, and nothing listening there -----------
    ("network", "only_loopback_interface", "sorted(os.listdir('/sys/class/net'))", ["lo"]),
    (
        "network",
        "tcp_loopback_refused",
        "attempt(lambda: socket.create_connection(('127.0.0.1', 80), timeout=2))",
        "ECONNREFUSED",
    ),
    (
        "network",
        "tcp_ipv6_loopback_refused",
        "attempt(lambda: socket.create_connection(('::1', 80), timeout=2))",
        "ECONNREFUSED",
    ),
    (
        "network",
        "tcp_bridge_gateway_unreachable",
        "attempt(lambda: socket.create_connection((GATEWAY, 2375), timeout=2))",
        {"runc": "ENETUNREACH", "runsc": "EHOSTUNREACH"},
    ),
    (
        "network",
        "udp_bridge_gateway_unreachable",
        "attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "        .sendto(b'x', (GATEWAY, 53)))",
        {"runc": "ENETUNREACH", "runsc": "EHOSTUNREACH"},
    ),
    ("network", "dns_fails", "attempt(lambda: socket.getaddrinfo('example.com', 443))", "gaierror"),
    (
        "network",
        "raw_socket_denied",
        "attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))",
        "EPERM",
    ),
    (
        "network",
        "packet_socket_denied",
        "attempt(lambda: socket.socket(17, socket.SOCK_RAW))",
        "EPERM",
    ),
    ("network", "no_engine_socket", "os.path.exists('/var/run/docker.sock')", False),
    # --- filesystem: read-only root, capped and no-exec /tmp -----------------
    ("filesystem", "write_etc", "attempt(lambda: write('/etc/passwd-x'))", DENIED_FS),
    ("filesystem", "write_usr_bin", "attempt(lambda: write('/usr/bin/evil'))", DENIED_FS),
    (
        "filesystem",
        "overwrite_runner",
        "attempt(lambda: write('/opt/legion/lib/legion_runner/runner.py'))",
        {"runc": "EROFS", "runsc": "EACCES"},
    ),
    ("filesystem", "write_world_writable_var_tmp", "attempt(lambda: write('/var/tmp/x'))", "EROFS"),
    ("filesystem", "mkdir_root", "attempt(lambda: os.mkdir('/evil'))", "EROFS"),
    ("filesystem", "tmp_is_writable", "attempt(lambda: write('/tmp/ok'))", "ok"),
    (
        "filesystem",
        "tmp_is_noexec",
        "write('/tmp/run.sh', b'#!/bin/sh\\necho hi\\n'); os.chmod('/tmp/run.sh', 0o755)\n"
        "attempt(lambda: os.execv('/tmp/run.sh', ['run.sh']))",
        "EACCES",
    ),
    ("filesystem", "shadow_unreadable", "attempt(lambda: open('/etc/shadow').read())", "EACCES"),
    (
        "filesystem",
        "proc_sys_readonly",
        "attempt(lambda: write('/proc/sys/kernel/hostname', b'pwned'))",
        {"runc": "EROFS", "runsc": "EACCES"},
    ),
    (
        "filesystem",
        "sysfs_readonly",
        "attempt(lambda: write('/sys/kernel/mm/transparent_hugepage/enabled', b'never'))",
        {"runc": "EROFS", "runsc": "ENOENT"},
    ),
    (
        "filesystem",
        "dev_shm_capped",
        "attempt(lambda: write('/dev/shm/big', b'x' * (4 << 20)))",
        "ENOSPC",
    ),
    # --- processes ------------------------------------------------------------
    ("processes", "not_pid_one", "os.getpid() != 1", True),
    # Under gVisor niceness is its own scheduler's business: no host effect.
    ("processes", "lower_nice", "attempt(lambda: os.nice(-5))", {"runc": "EPERM", "runsc": "ok"}),
    (
        "processes",
        "setpriority_realtime_denied",
        "attempt(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10)))",
        {"runc": "EPERM", "runsc": "EINVAL"},
    ),
    (
        "processes",
        "fork_once_works",
        "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nos.waitpid(pid, 0)[1] >> 8",
        7,
    ),
    (
        "processes",
        "sees_only_its_own_processes",
        "len([p for p in os.listdir('/proc') if p.isdigit()]) < 10",
        True,
    ),
    # --- privilege and namespaces ---------------------------------------------
    ("privilege", "uid_not_root", "[os.getuid(), os.geteuid()]", [65534, 65534]),
    ("privilege", "setuid_root_denied", "attempt(lambda: os.setuid(0))", "EPERM"),
    ("privilege", "setgroups_denied", "attempt(lambda: os.setgroups([0]))", "EPERM"),
    (
        "privilege",
        "no_capabilities",
        "[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))]",
        ["0000000000000000", "0000000000000000"],
    ),
    (
        "privilege",
        "no_new_privileges",
        "[l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')]",
        {"runc": ["1"], "runsc": []},  # gVisor's /proc does not show the flag
    ),
    (
        "privilege",
        "unshare_user_namespace",
        "raw(272, 0x10000000)",
        {"runc": "EPERM", "runsc": "EINVAL"},
    ),
    # Under runsc, gVisor's own kernel grants a mount namespace; mounting in it
    # is still refused (mount_tmpfs, which runs later in the same process).
    (
        "privilege",
        "unshare_mount_namespace",
        "raw(272, 0x00020000)",
        {"runc": "EPERM", "runsc": "ok"},
    ),
    (
        "privilege",
        "mount_tmpfs",
        "raw(165, id(b'none'), id(b'/tmp'), id(b'tmpfs'), 0, 0)",
        "EPERM",
    ),
    ("privilege", "chroot_denied", "attempt(lambda: os.chroot('/tmp'))", "EPERM"),
    ("privilege", "bpf_denied", "raw(321, 0, 0, 0)", {"runc": "EPERM", "runsc": "EPERM"}),
    (
        "privilege",
        "perf_event_open_denied",
        "raw(298, 0, 0, -1, -1, 0)",
        {"runc": "EPERM", "runsc": "ENODEV"},
    ),
    ("privilege", "keyctl_denied", "raw(250, 0, 0, 0, 0)", {"runc": "EPERM", "runsc": "EACCES"}),
    ("privilege", "userfaultfd_denied", "raw(323, 0)", {"runc": "EPERM", "runsc": "ENOSYS"}),
    # --- kernel surface (the engine's default profile leaves these open) -------
    (
        "kernel",
        "io_uring_setup",
        IN_A_CHILD.format("raw(425, 4, ctypes.addressof(ctypes.create_string_buffer(120)))"),
        {"runc": "EPERM", "runsc": "ok"},
    ),  # under runsc: gVisor's own, not the host's
    (
        "kernel",
        "af_vsock",
        "attempt(lambda: socket.socket(40, socket.SOCK_STREAM))",
        {"runc": "EPERM", "runsc": "EAFNOSUPPORT"},
    ),
    ("kernel", "ptrace_init", "raw(101, 16, 1, 0, 0)", "EPERM"),
    (
        "kernel",
        "process_vm_readv",
        "raw(310, os.getpid(), 0, 0, 0, 0, 0)",
        {"runc": "EPERM", "runsc": "ENOSYS"},
    ),
    (
        "kernel",
        "modify_ldt",
        "raw(154, 0, ctypes.addressof(ctypes.create_string_buffer(16)), 16)",
        "EPERM",
    ),
    ("kernel", "memfd_secret", "raw(447, 0)", {"runc": "EPERM", "runsc": "ENOSYS"}),
    (
        "kernel",
        "memfd_create_for_exec",
        "attempt(lambda: os.memfd_create('x'))",
        {"runc": "EPERM", "runsc": "ok"},
    ),
    (
        "kernel",
        "name_to_handle_at",
        "raw(303, -100, 0, 0, 0, 0)",
        {"runc": "EPERM", "runsc": "ENOTSUP"},
    ),
    ("kernel", "kexec_load_denied", "raw(246, 0, 0, 0, 0)", "EPERM"),
    ("kernel", "init_module_denied", "raw(175, 0, 0, 0)", "EPERM"),
    # --- the tool socket --------------------------------------------------------
    (
        "socket",
        "socket_not_removable",
        "attempt(lambda: os.unlink('/run/legion/legion.sock'))",
        DENIED_FS,
    ),
    (
        "socket",
        "socket_dir_not_writable",
        "attempt(lambda: write('/run/legion/fake.sock'))",
        DENIED_FS,
    ),
    (
        "socket",
        "socket_not_renamable",
        "attempt(lambda: os.rename('/run/legion/legion.sock', '/run/legion/x'))",
        "EROFS",
    ),
    (
        "socket",
        "garbage_bytes_are_dropped",
        "s = socket.socket(socket.AF_UNIX)\ns.connect('/run/legion/legion.sock')\n"
        "s.sendall(os.urandom(4096))\ns.settimeout(5)\n"
        "try:\n    got = s.recv(65536)\nexcept OSError:\n    got = b''\ns.close()\n"
        "ping('after garbage')",
        "pong after garbage",
    ),
    (
        "socket",
        "thousand_connects_then_still_served",
        "for _ in range(1000):\n    c = socket.socket(socket.AF_UNIX)\n"
        "    c.connect('/run/legion/legion.sock')\n    c.close()\nping('after connects')",
        "pong after connects",
    ),
    (
        "socket",
        "unlisted_tool_refused",
        "import gc\nfrom legion_runner.runner import Runner\n"
        "r = next(o for o in gc.get_objects() if isinstance(o, Runner))\n"
        "try:\n    r.call_tool('os', 'system', ('id',), {})\n    out = 'called'\n"
        "except ToolNotAllowed as e:\n    out = 'refused'\nout",
        "refused",
    ),
    # --- information leaks --------------------------------------------------------
    ("leaks", "hostname_is_the_sandbox", "socket.gethostname()", "sandbox"),
    (
        "leaks",
        "environment_holds_nothing_secret",
        # The images' own settings (matplotlib's: the runner's backend, and
        # the data environment's read-only config), none of them secret.
        "sorted(k for k in os.environ if k not in ('PATH', 'HOSTNAME', 'HOME', 'LANG', "
        "'PYTHONPATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONUNBUFFERED', "
        "'GRPC_ENABLE_FORK_SUPPORT', 'MPLBACKEND', 'MPLCONFIGDIR', 'MATPLOTLIBRC'))",
        [],
    ),
    ("leaks", "runner_token_gone_from_environment", "'LEGION_TOKEN' in os.environ", False),
    (
        "leaks",
        "only_the_socket_is_mounted_from_the_host",
        "[l.split()[1] for l in open('/proc/self/mounts') "
        "if l.split()[1].startswith(('/run/legion', '/home', '/root', '/work', '/var/lib'))]",
        ["/run/legion"],
    ),
    # --- output floods ----------------------------------------------------------------
    (
        "floods",
        "one_huge_print",
        "import sys\nsys.stdout.write('y' * 50_000_000)\n'printed'",
        "printed",
    ),
    ("floods", "many_small_prints", "for i in range(200_000):\n    print(i)\n'printed'", "printed"),
    (
        "floods",
        "stderr_flood",
        "import sys\nfor _ in range(2000):\n    sys.stderr.write('e' * 1000)\n'printed'",
        "printed",
    ),
    # --- hostile values -------------------------------------------------------------
    (
        "values",
        "repr_raises",
        "class Bad:\n    def __repr__(self):\n        raise RuntimeError('no')\n"
        "[type(Bad()).__name__]",
        ["Bad"],
    ),
    (
        "values",
        "deep_recursion",
        "import sys\ndef down(n):\n    return down(n + 1)\n"
        "try:\n    down(0)\nexcept RecursionError:\n    out = 'RecursionError'\nout",
        "RecursionError",
    ),
    (
        "values",
        "huge_nested_value_is_refused_cleanly",
        "v = [[i] * 100 for i in range(100_000)]\nlen(v)",
        100_000,
    ),
]

PERSISTENCE = [
    ("tmp_file", "open('/tmp/left-behind', 'w').write('x')", "os.path.exists('/tmp/left-behind')"),
    ("variable", "left_behind = 1", "'left_behind' in globals()"),
    ("environment", "os.environ['LEFT_BEHIND'] = '1'", "'LEFT_BEHIND' in os.environ"),
    (
        "dev_shm",
        "open('/dev/shm/left-behind', 'w').write('x')",
        "os.path.exists('/dev/shm/left-behind')",
    ),
]


def ping(text: str) -> str:
    return f"pong {text}"


@pytest.fixture(scope="module", params=["runc", "runsc"])
def runtime_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "runsc":
        request.getfixturevalue("gvisor_ready")
    return name


def _limits(runtime_name: str) -> legion.SandboxLimits:
    return legion.SandboxLimits(
        runtime=None if runtime_name == "runc" else runtime_name,
        output_limit_bytes=64 * 1024,
        timeout_seconds=30,
    )


@pytest.fixture(scope="module")
async def corpus_sandbox(
    runtime_name: str, runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> AsyncIterator[legion.Sandbox]:
    subnet = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    gateway = subnet.get("Gateway") or subnet["Subnet"].rsplit(".", 2)[0] + ".0.1"
    async with legion.Sandbox(
        runtime=runtime, tools=[ping], limits=_limits(runtime_name)
    ) as sandbox:
        sandbox.prelude = PRELUDE + f"\nGATEWAY = {gateway!r}\n"  # type: ignore[attr-defined]
        yield sandbox


def test_corpus_is_large_and_grouped() -> None:
    names = [entry[1] for entry in CORPUS]
    assert len(names) + len(PERSISTENCE) >= 60
    assert len(set(names)) == len(names)
    assert {entry[0] for entry in CORPUS} == {
        "network",
        "filesystem",
        "processes",
        "privilege",
        "kernel",
        "socket",
        "leaks",
        "floods",
        "values",
    }


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{c}-{n}" for c, n, _, _ in CORPUS])
async def test_escape_is_contained(
    corpus_sandbox: legion.Sandbox, runtime_name: str, entry: tuple[str, str, str, Any]
) -> None:
    category, name, code, expected = entry
    if isinstance(expected, dict):
        expected = expected[runtime_name]
    # Each entry brings its own prelude: one that ends the sandbox cannot
    # make the entries after it fail for the wrong reason.
    result = await corpus_sandbox.run(corpus_sandbox.prelude + code)  # type: ignore[attr-defined]
    assert result.error is None, f"{category}/{name}: {result.error}\n{result.error.traceback}"
    assert not result.timed_out
    assert result.value == expected, f"{category}/{name} under {runtime_name}"
    if category == "floods":
        assert result.stdout_truncated or result.stderr_truncated
        assert len(result.stdout) + len(result.stderr) <= 2 * (64 * 1024 + 200)


@pytest.mark.parametrize(("name", "plant", "probe"), PERSISTENCE, ids=[p[0] for p in PERSISTENCE])
async def test_nothing_persists_into_the_next_sandbox(
    runtime_name: str, runtime: legion.SandboxRuntime, name: str, plant: str, probe: str
) -> None:
    async with legion.Sandbox(runtime=runtime, limits=_limits(runtime_name)) as first:
        planted = await first.run(f"import os\n{plant}\n{probe}")
        assert planted.value is True, planted.error
    async with legion.Sandbox(runtime=runtime, limits=_limits(runtime_name)) as second:
        assert (await second.run(f"import os\n{probe}")).value is False


async def test_killing_init(runtime_name: str, runtime: legion.SandboxRuntime) -> None:
    # runc: the kernel protects a namespace's init from SIGKILL sent inside it.
    # runsc: gVisor lets it through and the sandbox ends; only itself is hurt,
    # and the next run gets a fresh one.
    async with legion.Sandbox(runtime=runtime, limits=_limits(runtime_name)) as sandbox:
        await sandbox.run("kept = 1")
        try:
            await sandbox.run(
                "import os, signal, time\nos.kill(1, signal.SIGKILL)\ntime.sleep(2)\n'alive'"
            )
        except legion.SandboxCrashed:
            assert runtime_name == "runsc"
        after = await sandbox.run("kept")
        if runtime_name == "runc":
            assert after.value == 1
        else:
            assert after.error is not None and after.error.type == "NameError"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        # The result is encoded inside the run's time, so a repr that never
        # returns is the code's own timeout.
        (
            "repr_never_returns",
            "class Stuck:\n    def __repr__(self):\n        while True:\n            pass\nStuck()",
        ),
        # A finaliser that spins after the run that made it: the next run is
        # blocked behind it, times out, and gets a fresh sandbox.
        (
            "del_spins",
            "class Spinner:\n    def __del__(self):\n        while True:\n            pass\n"
            "Spinner()\nNone",
        ),
    ],
)
async def test_hostile_values_end_in_a_timeout_and_a_fresh_sandbox(
    runtime_name: str, runtime: legion.SandboxRuntime, name: str, code: str
) -> None:
    limits = _limits(runtime_name).replace(timeout_seconds=2)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        await sandbox.run("kept = 1")
        first = await sandbox.run(code)
        result = first if first.timed_out else await sandbox.run("'next'")
        assert result.timed_out, (name, first, result)
        after = await sandbox.run("kept")
        assert after.error is not None and after.error.type == "NameError"  # fresh sandbox
