"""The kernel surface the default seccomp profile closes.

Each probe runs under the default profile (``"legion"``) and, as a control,
under the engine's own default profile (``"engine"``), where the same probe
gets through: so each test shows both that the hole exists and that the
default closes it.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

import legion

pytestmark = pytest.mark.docker

PROBES = r"""
import ctypes, mmap, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def raw(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if result >= 0 else errno_name(ctypes.get_errno())

def errno_name(number):
    import errno
    return errno.errorcode.get(number, str(number))

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno_name(exc.errno)

def int80_getpid():
    # mov eax, 20 (getpid, 32-bit); int 0x80; ret
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    box = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    worker.start()
    worker.join(2)
    if not box:
        return "never returned"   # the filter ended the calling thread
    return "ok" if box[0] == os.getpid() else f"returned {box[0]}"

params = ctypes.create_string_buffer(120)
ldt = ctypes.create_string_buffer(16)
{
    "io_uring_setup": raw(425, 4, ctypes.addressof(params)),
    "af_vsock": attempt(lambda: socket.socket(40, socket.SOCK_STREAM).close()),
    "af_packet": attempt(lambda: socket.socket(17, socket.SOCK_RAW).close()),
    "ptrace_attach_init": raw(101, 16, 1, 0, 0),
    "modify_ldt": raw(154, 0, ctypes.addressof(ldt), 16),
    "memfd_secret": raw(447, 0),
    "memfd_create": attempt(lambda: os.close(os.memfd_create("x"))),
    "process_vm_readv": raw(310, os.getpid(), 0, 0, 0, 0, 0),
    "unshare_user_namespace": raw(272, 0x10000000),
    "int80_getpid": int80_getpid(),
}
"""

OPEN_UNDER_ENGINE = [
    "io_uring_setup",
    "af_vsock",
    "ptrace_attach_init",
    "modify_ldt",
    "memfd_secret",
    "memfd_create",
    "int80_getpid",
]


async def _probe(runtime: legion.SandboxRuntime, profile: str) -> dict[str, Any]:
    limits = legion.SandboxLimits(seccomp_profile=profile, timeout_seconds=20)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        result = await sandbox.run(PROBES)
        assert result.error is None, f"{result.error}\n{result.error.traceback}"
        # The sandbox is still usable after every probe.
        assert (await sandbox.run("'alive'")).value == "alive"
        return dict(result.value)


@pytest.fixture(scope="module")
async def outcomes(runtime: legion.SandboxRuntime) -> dict[str, dict[str, Any]]:
    return {profile: await _probe(runtime, profile) for profile in ("legion", "engine")}


@pytest.mark.parametrize("probe", OPEN_UNDER_ENGINE)
def test_default_profile_closes_what_the_engine_default_leaves_open(
    outcomes: dict[str, dict[str, Any]], probe: str
) -> None:
    assert outcomes["engine"][probe] == "ok", "control: the hole exists without our profile"
    assert outcomes["legion"][probe] != "ok"


def test_denials_are_errors_not_crashes(outcomes: dict[str, dict[str, Any]]) -> None:
    closed = outcomes["legion"]
    for probe in (
        "io_uring_setup",
        "ptrace_attach_init",
        "modify_ldt",
        "memfd_secret",
        "af_vsock",
        "memfd_create",
    ):
        assert closed[probe] == errno.errorcode[errno.EPERM], (probe, closed[probe])
    # 32-bit entry points do not exist for sandbox code: the call never completes.
    assert closed["int80_getpid"] == "never returned"


def test_already_closed_by_capabilities_stay_closed(outcomes: dict[str, dict[str, Any]]) -> None:
    for probe in ("process_vm_readv", "unshare_user_namespace", "af_packet"):
        assert outcomes["legion"][probe] == "EPERM", probe
        assert outcomes["engine"][probe] != "ok", probe


async def test_ordinary_standard_library_code_still_works(sandbox: legion.Sandbox) -> None:
    assert sandbox.limits.seccomp_profile == "legion"  # the default
    result = await sandbox.run(
        "import asyncio, hashlib, json, multiprocessing, socket, sqlite3, ssl, subprocess\n"
        "import tempfile, threading, zlib\n"
        "out = subprocess.run(['python3', '-c', 'print(6 * 7)'], capture_output=True,\n"
        "                     text=True).stdout.strip()\n"
        "with multiprocessing.Pool(2) as pool:\n"
        "    squares = pool.map(abs, [-1, -2, -3])\n"
        "a, b = socket.socketpair(); a.send(b'ping'); pong = b.recv(4)\n"
        "db = sqlite3.connect(tempfile.mktemp(dir='/tmp')); db.execute('create table t (x)')\n"
        "lo = socket.socket(); lo.bind(('127.0.0.1', 0)); lo.listen()\n"
        "async def tick():\n"
        "    await asyncio.sleep(0.01)\n"
        "    return 'tock'\n"
        "threads = [threading.Thread(target=hashlib.sha256, args=(b'x',)) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "small = len(zlib.compress(b'a' * 1000)) < 100\n"
        "[out, squares, pong.decode(), asyncio.run(tick()), small,\n"
        " open('/proc/self/status').read().split('Seccomp:')[1].split()[0]]"
    )
    assert result.error is None, f"{result.error}\n{result.error.traceback}"
    assert result.value == ["42", [1, 2, 3], "ping", "tock", True, "2"]  # 2: filter mode


async def test_dev_shm_is_a_small_cap_not_a_writable_area(sandbox: legion.Sandbox) -> None:
    result = await sandbox.run(
        "import errno\n"
        "try:\n"
        "    with open('/dev/shm/fill', 'wb') as f:\n"
        "        f.write(b'x' * (4 * 1024 * 1024))\n"
        "    outcome = 'wrote 4 MiB'\n"
        "except OSError as e:\n"
        "    outcome = errno.errorcode[e.errno]\n"
        "import os\n"
        "st = os.statvfs('/dev/shm')\n"
        "[outcome, st.f_blocks * st.f_frsize]"
    )
    assert result.value == ["ENOSPC", sandbox.limits.shm_mb * 1024 * 1024]
