"""The release, as the README's "Install without the checkout" has it: build
the wheel and sdist (``python -m build``), install the wheel into a fresh
virtualenv outside the checkout from the machine's package index, and from
there print the version, build the sandbox image, run a sandbox with a tool
call and serve an agent. Every command runs in a directory outside the
checkout with no PYTHONPATH, so only the installed package can answer.

The image is rebuilt with ``--force`` from the packaged ``sandbox_image``: its
build context must be the checkout's byte for byte, so Docker's layer cache
gives back the very image ``make image`` built (same id), in seconds.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

import legion
from legion.sandbox import environment as legion_environment
from legion.sandbox import image as legion_image
from legion.testing import FakeOpenAIServer
from tests.server.conftest import ServerProcess, _pump, script, stop_cleanly

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]

TOOLS = '''
import legion


class Calculator(legion.Tool):
    """Arithmetic, on the host."""

    def add(self, a: int, b: int) -> int:
        return a + b


class Adder(legion.Agent):
    """Adds numbers with the calculator."""

    tools = [Calculator]


REGISTRY = {"Adder": Adder}
'''

SANDBOX = """
import asyncio
import json

import legion
from agents import Calculator


async def main() -> None:
    async with legion.Sandbox(tools=[Calculator]) as sandbox:
        result = await sandbox.run("total = Calculator.add(40, 2)\\nprint(total)\\ntotal")
    print(json.dumps({"value": result.value, "stdout": result.stdout,
                      "error": None if result.error is None else result.error.message,
                      "legion": legion.__file__}))


asyncio.run(main())
"""


@dataclass(frozen=True)
class Release:
    wheel: Path
    sdist: Path
    venv: Path
    work: Path
    """An empty directory outside the checkout, where the commands run."""
    env: dict[str, str]
    install_seconds: float

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args),
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"{' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        return result


def _outside_env(venv: Path, **extra: str) -> dict[str, str]:
    """This process's environment without anything that points into the
    checkout or its virtualenv, with the fresh virtualenv first on PATH."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LEGION_TOKENS", "LEGION_SERVER_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def release(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The wheel and sdist built from the checkout, and the wheel installed
    into a fresh virtualenv in a temporary directory (outside the checkout),
    removed afterwards (it takes about 430 MB)."""
    where = tmp_path_factory.mktemp("release")
    assert not where.resolve().is_relative_to(ROOT)
    dist, venv, work = where / "dist", where / "venv", where / "work"
    work.mkdir()
    # build makes the sdist, then the wheel from the unpacked sdist: a file the
    # sdist lacks is missing from the wheel too, and the install shows it.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, f"python -m build failed:\n{built.stdout[-3000:]}{built.stderr}"
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    env = _outside_env(venv)
    started = time.monotonic()
    try:
        for command in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)],
        ):
            done = subprocess.run(
                command, cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False
            )
            assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}{done.stderr}"
        yield Release(wheel, sdist, venv, work, env, time.monotonic() - started)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_the_distributions_carry_the_image_source_scripts_and_licence(release: Release) -> None:
    with zipfile.ZipFile(release.wheel) as wheel:
        members = {info.filename: info for info in wheel.infolist()}
    packaged = {
        name.removeprefix("legion/_sandbox_image/")
        for name in members
        if name.startswith("legion/_sandbox_image/")
    }
    source = legion_image.source_dir()
    in_checkout = {
        path.relative_to(source).as_posix()
        for path in source.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert packaged == in_checkout, (
        f"the wheel's sandbox_image differs from the checkout's: "
        f"missing {sorted(in_checkout - packaged)}, extra {sorted(packaged - in_checkout)}"
    )
    for name in ("build-base-image", "debian-mirror"):
        mode = members[f"legion/_scripts/{name}"].external_attr >> 16
        assert mode & 0o111, f"{name} is not executable in the wheel"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in members)
    with tarfile.open(release.sdist) as sdist:
        top = f"legion_python-{legion.__version__}/"
        names = {member.name.removeprefix(top) for member in sdist.getmembers()}
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "sandbox_image/Dockerfile"):
        assert needed in names, f"the sdist lacks {needed}"


def test_the_installed_command_prints_its_version(release: Release) -> None:
    printed = release.run(release.bin("legion"), "--version").stdout
    assert printed.strip() == f"legion {legion.__version__}"
    located = release.run(
        release.bin("python"),
        "-c",
        "import importlib.metadata, legion; "
        "print(legion.__file__); print(importlib.metadata.version('legion-python'))",
    ).stdout.split()
    assert Path(located[0]).is_relative_to(release.venv), located
    assert located[1] == legion.__version__


def test_the_installed_package_builds_the_image_from_its_own_copy(release: Release) -> None:
    tag = release.run(release.bin("legion"), "image", "name").stdout.strip()
    assert tag == legion_image.image_tag(), "the packaged runner differs from the checkout's"
    data = release.run(release.bin("legion"), "image", "name", "--recipe", "data").stdout.strip()
    assert data == legion_environment.environment_tag(recipe="data")
    client = docker.from_env(timeout=60)
    try:
        before = client.images.get(tag).id
        started = time.monotonic()
        built = release.run(release.bin("legion"), "image", "build", "--force", timeout=600)
        seconds = time.monotonic() - started
        after = client.images.get(tag).id
    finally:
        client.close()
    assert f"built {tag}" in built.stderr
    assert after == before, (
        "the installed package's build did not reuse the layers of the checkout's: "
        f"{before} became {after}, so its build context differs\n{built.stderr[-3000:]}"
    )
    print(
        f"pip install of the wheel: {release.install_seconds:.0f} s; "
        f"legion image build --force from it: {seconds:.1f} s"
    )


def test_the_installed_package_runs_a_sandbox_with_a_tool_call(release: Release) -> None:
    (release.work / "agents.py").write_text(TOOLS)
    (release.work / "sandbox_demo.py").write_text(SANDBOX)
    printed = release.run(release.bin("python"), "sandbox_demo.py", timeout=180).stdout
    result = json.loads(printed.splitlines()[-1])
    assert result["error"] is None
    assert (result["value"], result["stdout"]) == (42, "42\n")
    assert Path(result["legion"]).is_relative_to(release.venv), result


@pytest.fixture
def fake_model() -> Iterator[FakeOpenAIServer]:
    """The server tests' model: a task ``#code <python>`` runs that code."""
    with FakeOpenAIServer(script) as server:
        yield server


def test_the_installed_package_serves_an_agent(
    release: Release, fake_model: FakeOpenAIServer
) -> None:
    (release.work / "agents.py").write_text(TOOLS)
    env = _outside_env(
        release.venv,
        LEGION_MODEL="openai/fake-model",
        LEGION_API_BASE=fake_model.url,
        LEGION_API_KEY="sk-test",
        LEGION_POOL_SIZE="0",
    )
    stderr = release.work / f"serve-{secrets.token_hex(4)}.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [
                *(release.bin("legion"), "serve", "--agents", "agents:REGISTRY"),
                *("--listen", "127.0.0.1:0", "--store", "memory", "--grace-seconds", "2"),
            ],
            cwd=release.work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    server = ServerProcess(process, "", stderr)
    try:
        while not server.address:
            line = lines.get(timeout=90)
            assert line is not None, f"legion serve exited: {stderr.read_text()[-3000:]}"
            if line.startswith("legion serve: listening on "):
                server.address = line.split()[-1]
        answered = release.run(
            release.bin("legion"),
            "run",
            "Adder",
            "#code Calculator.add(40, 2)",
            "--remote",
            server.address,
            "--quiet",
            timeout=180,
        )
        assert json.loads(answered.stdout) == 42
    finally:
        stop_cleanly(server)


def test_the_readme_install_section_is_what_this_test_does() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install without the checkout\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.S)
    steps = ["-m build", "-m venv", "pip install", "legion --version", "legion image build"]
    steps.append("legion serve --agents")
    found = [block.find(step) for step in steps]
    assert -1 not in found and found == sorted(found), (steps, block)
    assert "test_wheel.py" in section
