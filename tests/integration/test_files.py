"""Files in and out of a sandbox's work directory (``sandbox.files``), against
the real engine: byte-exact round trips, the quota, and every way out of the
work directory refused."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

import legion
from legion.errors import SandboxFileError
from legion.sandbox.files import work_path

pytestmark = pytest.mark.docker

MiB = 1024 * 1024
QUOTA_MB = 4


def ping() -> str:
    """Answers pong."""
    return "pong"


@pytest.fixture
async def small(runtime: legion.SandboxRuntime) -> AsyncIterator[legion.Sandbox]:
    limits = runtime.limits.replace(files_mb=QUOTA_MB)
    async with legion.Sandbox(runtime=runtime, limits=limits, tools=[ping]) as sandbox:
        yield sandbox


@pytest.mark.parametrize("size", [0, 1, QUOTA_MB * MiB - 1], ids=["0B", "1B", "quota-1B"])
async def test_round_trip_is_byte_exact(small: legion.Sandbox, size: int) -> None:
    data = bytes((i * 7 + 3) % 256 for i in range(size)) if size < 4096 else None
    if data is None:
        data = hashlib.shake_256(b"legion").digest(size)
    await small.files.write(f"in/blob-{size}.bin", data)
    # The code sees the same bytes in its current directory.
    seen = await small.run(
        f"import hashlib\nhashlib.sha256(open('in/blob-{size}.bin', 'rb').read()).hexdigest()"
    )
    assert seen.value == hashlib.sha256(data).hexdigest(), seen.error
    assert await small.files.read(f"/data/in/blob-{size}.bin") == data
    listed = {f.path: f for f in await small.files.list("in")}
    assert listed[f"in/blob-{size}.bin"].size == size


async def test_files_the_code_writes_come_back(small: legion.Sandbox) -> None:
    result = await small.run(
        "import csv\n"
        "with open('out/summary.csv', 'w', newline='') as f:\n"
        "    csv.writer(f).writerows([['region', 'total'], ['north', 3]])\n"
        "import os\nos.makedirs('out/nested', exist_ok=True)\n"
        "open('out/nested/deep.txt', 'w').write('deep')"
    )
    assert result.error is None, result.error
    assert await small.files.read("out/summary.csv") == b"region,total\r\nnorth,3\r\n"
    names = [f.path for f in await small.files.list("out", recursive=True)]
    assert names == ["out/nested", "out/nested/deep.txt", "out/summary.csv"]
    await small.files.remove("out/nested", recursive=True)
    assert [f.path for f in await small.files.list("out")] == ["out/summary.csv"]
    with pytest.raises(SandboxFileError) as gone:
        await small.files.read("out/nested/deep.txt")
    assert gone.value.kind == "not_found"


async def test_over_the_quota_is_a_clear_error_and_the_sandbox_goes_on(
    small: legion.Sandbox,
) -> None:
    # Refused on the host, before anything is sent.
    with pytest.raises(SandboxFileError, match="files_mb=4") as refused:
        await small.files.write("big.bin", b"x" * (QUOTA_MB * MiB + 1))
    assert refused.value.kind == "no_space"
    # Within the quota alone, over it together: the tmpfs says no.
    await small.files.write("a.bin", b"a" * (3 * MiB))
    with pytest.raises(SandboxFileError) as full:
        await small.files.write("b.bin", b"b" * (3 * MiB))
    assert full.value.kind == "no_space" and "files_mb" in str(full.value)
    # Nothing half-written is left, and everything else still works.
    assert [f.path for f in await small.files.list()] == ["a.bin", "out"]
    assert len(await small.files.read("a.bin")) == 3 * MiB
    assert (await small.run("ping()")).value == "pong"
    await small.files.remove("a.bin")
    await small.files.write("b.bin", b"b" * (3 * MiB))


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "out/../../etc/passwd",
        "/etc/passwd",
        "/data/../etc/passwd",
        "/run/legion/legion.sock",
        "/opt/legion/lib/legion_runner/runner.py",
        "/datax/file",
        "a\0b",
        "",
        "/data",
    ],
)
async def test_paths_out_of_the_work_directory_are_refused_before_sending(path: str) -> None:
    # A sandbox that was never started: the refusal cannot have crossed the channel.
    sandbox = legion.Sandbox()
    for attempt in (
        sandbox.files.write(path, b"x"),
        sandbox.files.read(path),
        sandbox.files.remove(path),
    ):
        with pytest.raises(SandboxFileError) as refused:
            await attempt
        assert refused.value.kind == "bad_path"
    assert sandbox.container_id is None
    await sandbox.close()


def test_paths_inside_the_work_directory_are_normalised() -> None:
    assert work_path("sales.csv") == "sales.csv"
    assert work_path("./out//x.csv") == "out/x.csv"
    assert work_path("/data/out/x.csv") == "out/x.csv"
    assert work_path("", allow_root=True) == ""


LINKS = {
    "env": "/proc/self/environ",
    "sock": "/run/legion/legion.sock",
    "socket_dir": "/run/legion",
    "runner": "/opt/legion/lib/legion_runner/runner.py",
    "root": "/",
    "up": "..",
}

RUNNER_DIGEST = """
import hashlib, os
root = '/opt/legion/lib/legion_runner'
hashlib.sha256(b''.join(
    open(os.path.join(d, f), 'rb').read()
    for d, _, names in sorted(os.walk(root)) for f in sorted(names)
)).hexdigest()
"""


async def test_links_made_by_sandbox_code_are_never_followed(
    small: legion.Sandbox, runtime: legion.SandboxRuntime
) -> None:
    before = await small.run(RUNNER_DIGEST)
    assert before.error is None, before.error
    assert runtime.endpoint is not None
    socket_dir = sorted(p.name for p in runtime.endpoint.directory.iterdir())
    made = await small.run(
        "import os\n" + "".join(f"os.symlink({t!r}, {n!r})\n" for n, t in LINKS.items())
    )
    assert made.error is None, made.error
    for name in LINKS:
        for attempt in (
            small.files.read(name),
            small.files.write(name, b"overwritten"),
            small.files.read(f"{name}/x"),
            small.files.write(f"{name}/x", b"planted"),
            small.files.list(name),
        ):
            with pytest.raises(SandboxFileError) as refused:
                await attempt
            assert refused.value.kind in ("symlink", "not_a_dir"), (name, refused.value)
    listed = {f.path: f for f in await small.files.list()}
    assert all(listed[name].is_symlink for name in LINKS)
    # Removing a link removes the link, never its target.
    await small.files.remove("runner")
    after = await small.run(RUNNER_DIGEST)
    assert after.value == before.value
    assert sorted(p.name for p in runtime.endpoint.directory.iterdir()) == socket_dir
    assert (await small.run("ping()")).value == "pong"


async def test_the_work_directory_is_the_current_one_and_no_exec(
    small: legion.Sandbox,
) -> None:
    await small.files.write("run.sh", b"#!/bin/sh\necho hi\n")
    result = await small.run(
        "import os, subprocess\nos.chmod('run.sh', 0o755)\n"
        "try:\n    subprocess.run(['./run.sh'])\n    out = 'ran'\n"
        "except PermissionError:\n    out = 'refused'\n(os.getcwd(), out)"
    )
    assert result.value == ["/data", "refused"], result.error
