"""`legion doctor`, run as a user would: each problem named with its fix, and
a non-zero exit when anything fails. The engine is never stopped: a missing
one is an engine address with nothing behind it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = [
    "docker engine",
    "engine version",
    "sandbox image",
    "environments",
    "gVisor (runsc)",
    "limits support",
    "limits in force",
    "seccomp profile",
    "socket directory",
    "sandbox start",
]


def doctor(**env: str) -> tuple[int, dict[str, str], str]:
    """Exit status, {check name: its line(s)} and the whole output."""
    done = subprocess.run(
        [sys.executable, "-m", "legion.cli", "doctor"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=180,
    )
    lines: dict[str, str] = {}
    last = ""
    for line in done.stdout.splitlines():
        name = next((c for c in CHECKS if line[6:].startswith(c)), None)
        if name is not None:
            last = name
            lines[name] = line
        elif line.strip().startswith("fix:") and last:
            lines[last] += "\n" + line.strip()
    return done.returncode, lines, done.stdout + done.stderr


def status(line: str) -> str:
    return line.split(maxsplit=1)[0]


def test_no_engine_fails_with_the_fix() -> None:
    code, lines, output = doctor(DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert code == 1, output
    assert set(lines) == set(CHECKS), output
    engine = lines["docker engine"]
    assert status(engine) == "FAIL"
    assert "no Docker engine answers at unix:///nonexistent/docker.sock" in engine
    assert "fix:" in engine and "make docker" in engine and "scripts/ensure-docker" in engine
    assert "unset DOCKER_HOST" in engine
    # What needs an engine is not run; what does not, still is.
    for name in CHECKS:
        if name not in ("docker engine", "socket directory"):
            assert status(lines[name]) == "skip", lines[name]
    assert status(lines["socket directory"]) == "ok"
    assert "1 problem" in output


def test_a_stale_engine_socket_is_told_apart(tmp_path: Path) -> None:
    # A socket file left by a dead dockerd: it exists, nothing listens.
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    code, lines, output = doctor(DOCKER_HOST=f"unix://{path}")
    assert code == 1, output
    engine = lines["docker engine"]
    assert status(engine) == "FAIL" and "(nothing listens there)" in engine
    assert "make docker" in engine


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv, to take away the right to bypass file permissions",
)
def test_socket_permission_denied_says_how_to_get_access(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        listener.listen()
        path.chmod(0)
        done = subprocess.run(
            # Root without CAP_DAC_OVERRIDE meets the socket's mode like any user.
            [
                *("setpriv", "--inh-caps=-all", "--bounding-set=-all"),
                *(sys.executable, "-m", "legion.cli", "doctor"),
            ],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "DOCKER_HOST": f"unix://{path}"},
            timeout=120,
        )
    finally:
        listener.close()
    assert done.returncode == 1, done.stdout + done.stderr
    (engine,) = [line for line in done.stdout.splitlines() if "docker engine" in line]
    assert engine.startswith("FAIL") and "permission denied" in engine
    assert "usermod -aG docker" in done.stdout and "run as root" in done.stdout


def test_this_machine_passes_every_check(docker_ready: None) -> None:
    code, lines, output = doctor()
    assert code == 0, output
    assert set(lines) == set(CHECKS), output
    for name in CHECKS:
        expected = ("ok", "warn") if name == "gVisor (runsc)" else ("ok",)
        assert status(lines[name]) in expected, lines[name]
    assert "uid 65534" in lines["sandbox start"]
    assert "256 MiB, 128 pids" in lines["sandbox start"]
    # The default limits are shown, in their units.
    assert "memory 256 MiB, 1 CPU, 128 pids, run timeout 60 s" in lines["limits in force"]
    # The long step said what it was doing while it ran.
    assert "starting a sandbox with the default limits" in output
    assert "this machine can run Legion sandboxes" in output


def test_missing_image_fails_and_names_the_build_command(docker_ready: None) -> None:
    code, lines, output = doctor(LEGION_IMAGE="legion-sandbox:not-built-doctor-test")
    assert code == 1, output
    image = lines["sandbox image"]
    assert status(image) == "FAIL" and "legion-sandbox:not-built-doctor-test" in image
    assert "fix:" in image and "legion image build" in image
    assert status(lines["docker engine"]) == "ok"
    assert status(lines["sandbox start"]) == "skip"


def test_doctor_shows_the_packages_of_environments(data_image: str) -> None:
    code, lines, output = doctor(LEGION_IMAGE="data")
    assert code == 0, output
    image = lines["sandbox image"]
    assert status(image) == "ok" and f"data ({data_image}) is built" in image
    assert "pandas " in image and "numpy " in image
    built = lines["environments"]
    assert f"data ({data_image}): packages " in built
    assert "preloads numpy, pandas, matplotlib.pyplot" in built
    # The runner's own image has no packages of its own.
    _, lines, _ = doctor()
    assert "is built; the standard library only" in lines["sandbox image"]


def test_doctor_says_how_to_build_a_missing_environment(docker_ready: None) -> None:
    code, lines, output = doctor(LEGION_IMAGE="no-such-env")
    assert code == 1, output
    assert status(lines["sandbox image"]) == "FAIL"
    assert "fix: `legion image build --requirements FILE --name no-such-env`" in output
