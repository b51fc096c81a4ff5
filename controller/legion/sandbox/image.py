"""The sandbox image: named by the content of the runner, built offline.

The tag is ``legion-sandbox:<hash>``, where the hash covers the Dockerfile, the
pinned requirements and the runner's source. An unchanged runner is never
rebuilt; a changed one always is, because its tag is new.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BackendError, DockerUnavailable, UsageError

REPOSITORY = "legion-sandbox"
SLIM_BASE = "python:3.11-slim"
LOCAL_BASE = "legion-base:bookworm"

Progress = Callable[[str], None]


def _say(message: str) -> None:
    print(f"legion image: {message}", file=sys.stderr, flush=True)


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise UsageError(
        f"this installation of legion is missing {candidates[-1].name}; "
        "reinstall it, or run from a source checkout"
    )


def source_dir() -> Path:
    """sandbox_image/ of a checkout, or the copy packaged in the wheel."""
    here = Path(__file__).resolve()
    return _first_existing(here.parents[3] / "sandbox_image", here.parents[1] / "_sandbox_image")


def _script(name: str) -> Path:
    here = Path(__file__).resolve()
    return _first_existing(here.parents[3] / "scripts" / name, here.parents[1] / "_scripts" / name)


def _image_files(src: Path) -> list[Path]:
    files = [src / "Dockerfile", src / "requirements.txt"]
    runner = (src / "legion_runner").rglob("*.py")
    files += sorted(p for p in runner if "__pycache__" not in p.parts)
    return files


def content_hash(src: Path | None = None) -> str:
    src = src or source_dir()
    digest = hashlib.sha256()
    for path in _image_files(src):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_tag() -> str:
    """The tag of the image that matches this runner's source."""
    return f"{REPOSITORY}:{content_hash()}"


def _client() -> Any:
    import docker  # noqa: PLC0415 - only the image commands need it this early

    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:
        raise DockerUnavailable(
            f"no Docker engine answers ({exc}). Start one (`make docker` "
            "or scripts/ensure-docker), then retry."
        ) from exc
    return client


def _exists(client: Any, name: str) -> bool:
    import docker.errors  # noqa: PLC0415

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def choose_base(client: Any, progress: Progress = _say) -> str:
    """python:3.11-slim when present or pullable, else a local debootstrap base."""
    wanted = os.environ.get("LEGION_BASE_IMAGE")
    if wanted:
        if not _exists(client, wanted):
            progress(f"pulling {wanted} (LEGION_BASE_IMAGE)...")
            client.images.pull(wanted)
        return wanted
    for name in (SLIM_BASE, LOCAL_BASE):
        if _exists(client, name):
            progress(f"base image: {name} (present)")
            return name
    progress(f"trying to pull {SLIM_BASE}...")
    try:
        client.images.pull(SLIM_BASE)
        progress(f"base image: {SLIM_BASE} (pulled)")
        return SLIM_BASE
    except Exception as exc:
        reason = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:160]
        progress(
            f"no registry answered ({reason}); building a local "
            f"Debian base {LOCAL_BASE} with debootstrap instead"
        )
    result = subprocess.run([str(_script("build-base-image")), LOCAL_BASE], check=False)
    if result.returncode != 0:
        raise BackendError(f"building the local base image {LOCAL_BASE} failed (see above)")
    return LOCAL_BASE


def _download_wheels(requirements: Path, dest: Path, progress: Progress) -> None:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    progress("downloading the runner's wheels on the host (the build runs offline)...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "--platform",
        f"manylinux_2_28_{arch}",
        "--platform",
        f"manylinux_2_17_{arch}",
        "--platform",
        f"manylinux2014_{arch}",
        "--platform",
        "any",
        "-d",
        str(dest),
        "-r",
        str(requirements),
        "pip",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackendError(f"pip download of the runner's wheels failed:\n{result.stderr[-2000:]}")


def docker_build(
    client: Any,
    context: Path,
    *,
    tag: str,
    base: str,
    labels: dict[str, str],
    progress: Progress = _say,
) -> list[str]:
    """``docker build`` of ``context`` (BASE_IMAGE=``base``) with the classic
    builder, reporting each step; a failure raises BackendError with the tail of
    the build's output. Returns the ids of the images its steps made (a
    multi-stage build leaves its earlier stages behind, untagged)."""
    tail: list[str] = []
    made: list[str] = []
    for chunk in client.api.build(
        path=str(context),
        tag=tag,
        buildargs={"BASE_IMAGE": base},
        rm=True,
        forcerm=True,
        decode=True,
        labels=labels,
    ):
        if "error" in chunk:
            output = "\n".join(tail[-25:])
            raise BackendError(f"docker build of {tag} failed: {chunk['error'].strip()}\n{output}")
        line = str(chunk.get("stream", "")).strip()
        if line.startswith("Step "):
            progress(line)
        elif line.startswith("---> ") and " " not in line[5:]:
            made.append(line[5:])
        elif line:
            tail.append(line)
    return made


def build(*, force: bool = False, progress: Progress = _say) -> str:
    """Build the sandbox image unless an image for this runner exists. Returns its tag."""
    client = _client()
    tag = image_tag()
    if not force and _exists(client, tag):
        progress(f"{tag} is up to date")
        return tag
    src = source_dir()
    base = choose_base(client, progress)
    with tempfile.TemporaryDirectory(prefix="legion-image-") as tmp:
        ctx = Path(tmp) / "context"
        shutil.copytree(src, ctx, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheels = ctx / "wheels"
        wheels.mkdir()
        shutil.copy(src / "requirements.txt", wheels / "requirements.txt")
        _download_wheels(src / "requirements.txt", wheels, progress)
        progress(f"building {tag} from {base}...")
        docker_build(
            client, ctx, tag=tag, base=base, labels={"legion.image": "sandbox"}, progress=progress
        )
    client.images.get(tag).tag(REPOSITORY, "latest")
    progress(f"built {tag}")
    return tag
