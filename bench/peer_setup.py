"""What the peer benchmarks need, built offline: their virtualenv and their images.

Runs in the project's venv (the Docker SDK and `legion` are there). The peers'
libraries go into a separate virtualenv, bench/.venv-peers, because their
dependency trees are theirs, not ours; it is (re)installed when
bench/peers-requirements.txt changes.

The images are built from the same base as the sandbox image
(`legion.sandbox.image.choose_base`: python:3.11-slim when present, else the
local debootstrap `legion-base:bookworm`) with the classic builder, and tagged
with a hash of their recipe and of the base image, so an unchanged recipe is
never rebuilt:

- `legion-bench-peer:py-<hash>`: `python` on PATH and `CMD ["python3"]`, as
  llm-sandbox's and AutoGen's images have (both run `python <file>`).
- `legion-bench-peer:py-sigkill-<hash>`: the same with `STOPSIGNAL SIGKILL`, the
  only way to make AutoGen's `stop()` quick (it takes no container options).
- `legion-bench-peer:jupyter-<hash>`: Jupyter Kernel Gateway and ipykernel, for
  smolagents' DockerExecutor, installed from wheels downloaded on the host.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from legion.sandbox.image import choose_base, docker_build

from .common import PEER_NAME_PREFIX

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".venv-peers"
PEERS_REQUIREMENTS = HERE / "peers-requirements.txt"
JUPYTER_REQUIREMENTS = HERE / "peer-image-requirements.txt"
REPOSITORY = "legion-bench-peer"
LABEL = "legion.bench"

Progress = Callable[[str], None]

PY_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
CMD ["python3"]
"""

SIGKILL_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
STOPSIGNAL SIGKILL
"""

# pip runs from its own wheel: the debootstrap base has python3 but no pip.
# --break-system-packages: Debian's python3 is marked externally managed.
JUPYTER_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY wheels/ /tmp/wheels/
RUN set -eu; \\
    pip_wheel=$(ls /tmp/wheels/pip-*.whl); \\
    python3 "$pip_wheel/pip" install --quiet --no-index --no-cache-dir \\
        --disable-pip-version-check --break-system-packages \\
        --find-links /tmp/wheels -r /tmp/wheels/requirements.txt; \\
    rm -rf /tmp/wheels
EXPOSE 8888
CMD ["jupyter", "kernelgateway", "--KernelGatewayApp.ip=0.0.0.0", "--KernelGatewayApp.port=8888"]
"""


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _digest(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


# --- the peers' virtualenv ---------------------------------------------------


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv(progress: Progress = say) -> Path:
    """bench/.venv-peers with bench/peers-requirements.txt installed; its python."""
    stamp = PEERS_VENV / f".installed-{_digest(PEERS_REQUIREMENTS.read_bytes())}"
    python = peers_python()
    if stamp.exists() and python.exists():
        return python
    if not python.exists():
        progress(f"creating {PEERS_VENV.relative_to(HERE.parent)} for the peer libraries...")
        venv.EnvBuilder(with_pip=True, clear=True).create(PEERS_VENV)
    progress(f"installing {PEERS_REQUIREMENTS.name} into it (a minute or so)...")
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(PEERS_REQUIREMENTS),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"installing the peer libraries failed:\n{result.stderr[-3000:]}")
    for old in PEERS_VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    return python


# --- the peers' images -------------------------------------------------------


def _client() -> Any:
    return docker.from_env(timeout=600)


def _exists(client: Any, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _download_wheels(requirements: Path, dest: Path) -> None:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    platforms = [f"manylinux_2_28_{arch}", f"manylinux_2_17_{arch}", f"manylinux2014_{arch}"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for abi in ("cp311", "abi3", "none"):
        cmd += ["--abi", abi]
    for name in [*platforms, "any"]:
        cmd += ["--platform", name]
    cmd += ["-d", str(dest), "-r", str(requirements), "pip"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip download for the Jupyter image failed:\n{result.stderr[-3000:]}")


def _build(
    client: Any, tag: str, dockerfile: str, base: str, *, progress: Progress, wheels: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="legion-bench-image-") as tmp:
        ctx = Path(tmp)
        (ctx / "Dockerfile").write_text(dockerfile)
        if wheels is not None:
            shutil.copytree(wheels, ctx / "wheels")
        docker_build(
            client,
            ctx,
            tag=tag,
            base=base,
            labels={LABEL: "peer-image"},
            progress=lambda line: progress(f"  {tag}: {line}"),
        )


def _drop_stale(client: Any, kind: str, keep: str, progress: Progress) -> None:
    """Remove this kind's images built from an older recipe (unless in use)."""
    for image in client.images.list(name=REPOSITORY):
        for tag in image.tags:
            old_kind, _, _ = tag.partition(":")[2].rpartition("-")
            if old_kind == kind and tag != keep:
                try:
                    client.images.remove(tag)
                    progress(f"removed the outdated {tag}")
                except docker.errors.APIError:
                    pass


def _ensure(
    client: Any,
    kind: str,
    dockerfile: str,
    base: str,
    *,
    progress: Progress,
    requirements: Path | None = None,
) -> str:
    base_id = client.images.get(base).id
    extra = requirements.read_bytes() if requirements is not None else b""
    tag = f"{REPOSITORY}:{kind}-{_digest(dockerfile, base, base_id, extra)}"
    if _exists(client, tag):
        return tag
    progress(f"building {tag} from {base}...")
    if requirements is None:
        _build(client, tag, dockerfile, base, progress=progress, wheels=None)
    else:
        with tempfile.TemporaryDirectory(prefix="legion-bench-wheels-") as tmp:
            wheels = Path(tmp)
            progress("  downloading its wheels on the host (the build runs offline)...")
            shutil.copy(requirements, wheels / "requirements.txt")
            _download_wheels(requirements, wheels)
            _build(client, tag, dockerfile, base, progress=progress, wheels=wheels)
    progress(f"built {tag}")
    _drop_stale(client, kind, tag, progress)
    return tag


JUPYTER_VERSIONS = """\
import importlib.metadata as m, platform
names = ["jupyter_kernel_gateway", "jupyter_client", "ipykernel", "tornado", "pyzmq"]
print(" ".join(["python", platform.python_version()] + [f"{n} {m.version(n)}" for n in names]))
"""


def _jupyter_versions(client: Any, tag: str) -> dict[str, str]:
    """What the smolagents image runs (a network-less container, removed at once)."""
    name = f"{PEER_NAME_PREFIX}versions-{uuid.uuid4().hex[:8]}"
    out = client.containers.run(
        tag, ["python3", "-c", JUPYTER_VERSIONS], name=name, network_mode="none", remove=True
    )
    words = out.decode().split()
    return dict(zip(words[::2], words[1::2], strict=True))


def ensure_images(progress: Progress = say) -> dict[str, Any]:
    """Build whichever peer images are missing.

    Returns their tags under "py", "py_sigkill" and "jupyter", the base under
    "base", what the Jupyter image holds under "versions", and why an image
    could not be built under "errors" (by kind; that peer is then reported as
    unavailable, the others still run).
    """
    client = _client()
    images: dict[str, Any] = {"errors": {}, "versions": {}}
    try:
        base = images["base"] = choose_base(client, progress)
    except Exception as exc:
        images["errors"] = dict.fromkeys(("py", "jupyter"), f"no base image: {exc}")
        return images
    try:
        images["py"] = _ensure(client, "py", PY_DOCKERFILE, base, progress=progress)
        images["py_sigkill"] = _ensure(
            client, "py-sigkill", SIGKILL_DOCKERFILE, images["py"], progress=progress
        )
    except Exception as exc:
        progress(f"could not build the python peer image: {exc}")
        images["errors"]["py"] = str(exc)
    try:
        images["jupyter"] = _ensure(
            client,
            "jupyter",
            JUPYTER_DOCKERFILE,
            base,
            progress=progress,
            requirements=JUPYTER_REQUIREMENTS,
        )
        images["versions"] = _jupyter_versions(client, images["jupyter"])
    except Exception as exc:
        progress(f"could not build the Jupyter peer image: {exc}")
        images["errors"]["jupyter"] = str(exc)
    return images
