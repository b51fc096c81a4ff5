"""Environments: sandbox images with packages, built offline, selected by name.

``legion image build --requirements FILE --name NAME`` (or
:func:`build_environment`) derives an image from the runner image
(``legion-sandbox:<hash>``) with packages installed at build time, from wheels
the host downloads (``pip download`` for the image's Python 3.11 and
platform). The build itself, like every sandbox, has no network. A directory
of wheels instead of a requirements file serves air-gapped hosts. Shipped
recipes are requirements files in ``sandbox_image/recipes/``
(``legion image build --recipe data``).

The tag is ``legion-env-NAME:<hash>``. The hash covers the runner image's tag,
the requirements file (or every wheel of the directory), the preload list and
the environment's build files, so a change of any of them rebuilds and
nothing else does. Labels record what is importable (each distribution's
name, version and top-level modules, found by importing them in the new
image as a sandbox would), the modules warm containers import ahead
(``preload``), and the command that rebuilds it.

Selecting one, by name (``"data"``) or reference (``"legion-env-data:…"``):
``Sandbox(image=...)``, ``config={"image": ...}``, ``LEGION_IMAGE``,
``legion serve --image``. A name resolves to the image of that environment
built on the current runner (a recipe's exact tag; the newest build for
other names); anything else is a Docker image reference, used as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendError, ImageNotFound, UsageError
from . import image as _image
from .backend import ImageInfo, Package

REPOSITORY_PREFIX = "legion-env-"
"""Environment images are tagged ``legion-env-<name>:<hash>``."""
LABEL_KIND = "legion.image"
"""``environment`` on environment images (``sandbox`` on the runner image)."""
LABEL_NAME = "legion.env.name"
LABEL_RUNNER = "legion.env.runner"
"""The runner image it was built on: a name resolves only to builds on the current one."""
LABEL_PACKAGES = "legion.packages"
"""JSON: ``[{"name", "version", "modules"}]``, what imports in the sandbox."""
LABEL_PRELOAD = "legion.preload"
"""JSON: the modules its warm containers import ahead of the first run."""
LABEL_COMMAND = "legion.env.command"
"""The command that builds it again (for the error when it is missing)."""
PRELOAD_DIRECTIVE = "# legion-preload:"
"""A requirements file's line declaring the preload list: ``# legion-preload: numpy pandas``."""

KEEP_BUILDS = 3
"""Builds of one environment kept on the engine, the newest; older ones go
after a build. A few, not one: two checkouts of different versions sharing an
engine would otherwise remove each other's build every time."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_PROBE_MARKER = "LEGION-ENVIRONMENT-PROBE "
# pip picks wheels for the image's glibc (Debian bookworm: 2.36), not the host's.
_GLIBC_MINORS = range(36, 16, -1)
_CACHE_SECONDS = 30.0

Progress = _image.Progress


def _say(message: str) -> None:
    print(f"legion image: {message}", file=sys.stderr, flush=True)


def build_dir() -> Path:
    """``sandbox_image/environment``: the Dockerfile and files every environment build uses."""
    return _image.source_dir() / "environment"


def recipes() -> dict[str, Path]:
    """The shipped recipes: name -> its requirements file."""
    folder = _image.source_dir() / "recipes"
    return {path.stem: path for path in sorted(folder.glob("*.txt"))}


def is_environment_name(image: str) -> bool:
    """A bare name (``data``), as opposed to a reference (``repo:tag``, ``sha256:…``)."""
    return bool(_NAME.fullmatch(image))


def _check_name(name: str) -> None:
    if not is_environment_name(name):
        raise UsageError(
            f"environment name {name!r}: use lower-case letters, digits, '.', '_' or '-' "
            "(at most 63, starting with a letter or digit), such as 'data' or 'ml-2'"
        )


def declared_preload(requirements: str) -> tuple[str, ...]:
    """The modules a requirements file declares with ``# legion-preload: a b``."""
    found: list[str] = []
    for line in requirements.splitlines():
        if line.strip().startswith(PRELOAD_DIRECTIVE):
            found += line.strip()[len(PRELOAD_DIRECTIVE) :].replace(",", " ").split()
    return _check_preload(found)


def _check_preload(modules: Sequence[str]) -> tuple[str, ...]:
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise UsageError(f"preload: {module!r} is not a module name (such as pandas)")
    return tuple(dict.fromkeys(modules))


@dataclass(frozen=True)
class EnvironmentSpec:
    """What to build: a name, where the packages come from, what to preload."""

    name: str
    source: Path
    """A requirements file, or a directory of wheels."""
    preload: tuple[str, ...]
    command: str
    """The command line that builds it."""

    @property
    def wheel_dir(self) -> bool:
        return self.source.is_dir()

    def wheels(self) -> list[Path]:
        return sorted(self.source.glob("*.whl")) if self.wheel_dir else []

    def tag(self, runner: str) -> str:
        """``legion-env-<name>:<hash>`` of a build on ``runner``."""
        digest = hashlib.sha256()

        def add(label: str, data: bytes) -> None:
            digest.update(label.encode() + b"\0" + data + b"\0")

        add("runner", runner.encode())
        add("preload", " ".join(self.preload).encode())
        folder = build_dir()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if "__pycache__" not in path.parts:
                add(path.relative_to(folder).as_posix(), path.read_bytes())
        if self.wheel_dir:
            for wheel in self.wheels():
                add(wheel.name, hashlib.sha256(wheel.read_bytes()).digest())
        else:
            add("requirements", self.source.read_bytes())
        return f"{REPOSITORY_PREFIX}{self.name}:{digest.hexdigest()[:16]}"


def _recipe_source(recipe: str, name: str | None, requirements: object) -> tuple[Path, str, str]:
    known = recipes()
    if requirements is not None:
        raise UsageError("give --recipe or --requirements, not both")
    if recipe not in known:
        raise UsageError(f"no recipe {recipe!r}; the recipes are: {', '.join(known)}")
    if name not in (None, recipe):
        raise UsageError(f"the recipe {recipe!r} builds the environment {recipe!r}; drop --name")
    return known[recipe], recipe, f"legion image build --recipe {recipe}"


def _requirements_source(
    requirements: str | Path | None, name: str | None
) -> tuple[Path, str, str]:
    if requirements is None or not name:
        raise UsageError(
            "name the environment and its packages: "
            "legion image build --requirements FILE --name NAME"
        )
    _check_name(name)
    if name in recipes():
        raise UsageError(
            f"{name!r} is a shipped recipe (legion image build --recipe {name}); "
            "give your environment another name"
        )
    source = Path(requirements).expanduser().resolve()
    if not source.exists():
        raise UsageError(f"--requirements: no file or directory at {source}")
    if source.is_dir() and not any(source.glob("*.whl")):
        raise UsageError(f"--requirements: the directory {source} holds no wheels (*.whl)")
    return source, name, f"legion image build --requirements {source} --name {name}"


def spec_for(
    *,
    requirements: str | Path | None = None,
    name: str | None = None,
    recipe: str | None = None,
    preload: Sequence[str] | None = None,
) -> EnvironmentSpec:
    """Check the options of a build; UsageError saying what to change."""
    if recipe is not None:
        source, name, command = _recipe_source(recipe, name, requirements)
    else:
        source, name, command = _requirements_source(requirements, name)
    if preload is not None:
        chosen = _check_preload(preload)
        command += f" --preload {','.join(chosen) or repr('')}"
    else:
        chosen = () if source.is_dir() else declared_preload(source.read_text())
    return EnvironmentSpec(name=name, source=source, preload=chosen, command=command)


# --- building -------------------------------------------------------------------


def _pip_download(args: list[str], dest: Path, what: str) -> None:
    machine = os.uname().machine.lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    platforms: list[str] = []
    for minor in _GLIBC_MINORS:
        platforms += ["--platform", f"manylinux_2_{minor}_{arch}"]
    platforms += ["--platform", f"manylinux2014_{arch}", "--platform", "any"]
    cmd = [
        *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"),
        *("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"),
        *("--abi", "cp311", "--abi", "abi3", "--abi", "none"),
        *platforms,
        *("-d", str(dest)),
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # pip's own words, less its notes about index folders it skipped.
        skipped = "is ignored: it is neither"
        lines = [line for line in done.stderr.splitlines() if skipped not in line]
        raise BackendError(
            f"pip download of {what} failed (only wheels for Python 3.11 on Linux can be "
            "installed: the build has no compiler and no network):\n" + "\n".join(lines)[-2000:]
        )


def _fill_wheels(spec: EnvironmentSpec, wheels: Path, progress: Progress) -> None:
    """The build context's wheels/ and requirements.txt, with a pip wheel for the build."""
    runner_requirements = _image.source_dir() / "requirements.txt"
    if spec.wheel_dir:
        progress(f"using the wheels in {spec.source} ({len(spec.wheels())} files)")
        for wheel in spec.wheels():
            shutil.copy(wheel, wheels / wheel.name)
        wanted = [f"/tmp/wheels/{w.name}" for w in spec.wheels() if not w.name.startswith("pip-")]
        (wheels / "requirements.txt").write_text("\n".join(wanted) + "\n")
        if not any(wheels.glob("pip-*.whl")):
            _pip_download(["pip"], wheels, "pip (the build installs with it)")
        return
    progress(f"downloading the wheels of {spec.source.name} on the host (the build is offline)...")
    shutil.copy(spec.source, wheels / "requirements.txt")
    # The runner's pins as constraints: one version of grpcio and protobuf in the image.
    _pip_download(
        ["-r", str(spec.source), "-c", str(runner_requirements), "pip"],
        wheels,
        spec.source.name,
    )


def _probe(client: Any, image: str, progress: Progress) -> dict[str, Any]:
    """Import every distribution's modules in ``image`` as a sandbox would."""
    code = (build_dir() / "probe.py").read_text()
    try:
        output = client.containers.run(
            image,
            ["python3", "-c", code],
            remove=True,
            network_disabled=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,noexec,size=64m,mode=1777"},
            user="65534:65534",
            working_dir="/tmp",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            stdout=True,
            stderr=True,
        )
    except Exception as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise BackendError(f"importing the packages in the new image failed: {detail!r}") from exc
    text = output.decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(_PROBE_MARKER):
            report: dict[str, Any] = json.loads(line[len(_PROBE_MARKER) :])
            return report
    raise BackendError(f"the package probe printed no report:\n{text[-2000:]}")


def _labels(spec: EnvironmentSpec, runner: str, report: dict[str, Any]) -> dict[str, str]:
    packages = [
        {"name": p["name"], "version": p["version"], "modules": p["modules"]}
        for p in report["packages"]
        if p["modules"]
    ]
    return {
        LABEL_KIND: "environment",
        LABEL_NAME: spec.name,
        LABEL_RUNNER: runner,
        LABEL_PACKAGES: json.dumps(packages, separators=(",", ":")),
        LABEL_PRELOAD: json.dumps(list(spec.preload)),
        LABEL_COMMAND: spec.command,
    }


def _report_problems(report: dict[str, Any], preload: Sequence[str], progress: Progress) -> None:
    for package in report["packages"]:
        for failure in package["failed"]:
            progress(f"warning: {package['name']}: {failure} (left out of the package list)")
    written = report["written"]
    if written:
        progress(
            f"warning: importing the packages wrote {len(written)} file(s) to /tmp "
            f"({', '.join(written[:3])}...): every sandbox of this image repeats that"
        )
    importable = {m for p in report["packages"] for m in p["modules"]}
    for module in preload:
        if module.split(".")[0] not in importable:
            progress(f"warning: preload names {module}, which no installed package provides")


def build_environment(
    *,
    requirements: str | Path | None = None,
    name: str | None = None,
    recipe: str | None = None,
    preload: Sequence[str] | None = None,
    force: bool = False,
    progress: Progress = _say,
) -> str:
    """Build an environment image unless one with this content exists; its tag.

    ``requirements``: a pip requirements file, or a directory of wheels;
    ``name``: what sandboxes select it by. Or ``recipe``: a shipped one
    (``"data"``). ``preload``: modules warm containers import ahead (default:
    the requirements file's ``# legion-preload:`` line). Builds the runner
    image first when it is missing.

    >>> build_environment(recipe="data")   # doctest: +SKIP
    'legion-env-data:3f1c…'
    """
    spec = spec_for(requirements=requirements, name=name, recipe=recipe, preload=preload)
    runner = _image.build(progress=progress)
    tag = spec.tag(runner)
    client = _image._client()
    if not force and _image._exists(client, tag):
        progress(f"{tag} is up to date")
        return tag
    # Builds on one machine take turns (test sessions side by side build the
    # same tag): one lock file for all, so none is left behind per tag.
    lock = Path(tempfile.gettempdir()) / "legion-env-build.lock"
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(lock.open("a"))
        except OSError:  # another user's lock file: build without taking turns
            pass
        else:
            fcntl.flock(held, fcntl.LOCK_EX)
            if not force and _image._exists(client, tag):
                progress(f"{tag} is up to date (another process built it)")
                return tag
        _build(client, spec, runner, tag, progress)
    return tag


def _build(client: Any, spec: EnvironmentSpec, runner: str, tag: str, progress: Progress) -> None:
    begun = time.monotonic()
    staged = f"{tag}-unlabelled"
    with tempfile.TemporaryDirectory(prefix="legion-env-") as tmp:
        ctx = Path(tmp) / "context"
        shutil.copytree(build_dir(), ctx, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheels = ctx / "wheels"
        wheels.mkdir()
        _fill_wheels(spec, wheels, progress)
        progress(f"building {tag} from {runner}...")
        made = _image.docker_build(
            client, ctx, tag=staged, base=runner, labels={}, progress=progress
        )
        progress("importing every package in the new image, as a sandbox would...")
        report = _probe(client, staged, progress)
        _report_problems(report, spec.preload, progress)
        final = Path(tmp) / "labels"
        final.mkdir()
        (final / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n")
        labels = _labels(spec, runner, report)
        _image.docker_build(client, final, tag=tag, base=staged, labels=labels, progress=progress)
    client.images.remove(staged)  # the tag only: the image is the new one's parent
    _tidy(client, made, spec.name)
    _forget(spec.name)
    count = len(json.loads(labels[LABEL_PACKAGES]))
    progress(f"built {tag} ({count} packages) in {time.monotonic() - begun:.0f} s")


def _tidy(client: Any, made: list[str], name: str) -> None:
    """Remove what the build left (its install stage, untagged) and the
    builds of ``name`` older than the newest :data:`KEEP_BUILDS`. An image a
    container still uses stays."""
    import docker.errors  # noqa: PLC0415

    dangling = {str(i["Id"]) for i in client.api.images(filters={"dangling": True})}
    left = [i for i in dangling if any(i.removeprefix("sha256:").startswith(m) for m in made)]
    superseded = [str(i["Id"]) for i in _builds(client, name)[KEEP_BUILDS:]]
    for image_id in left + superseded:
        # One still in use, or tagged by someone else too, stays.
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_image(image_id, force=False)


def environment_tag(
    *,
    requirements: str | Path | None = None,
    name: str | None = None,
    recipe: str | None = None,
    preload: Sequence[str] | None = None,
) -> str:
    """The tag :func:`build_environment` gives these options on the current runner."""
    spec = spec_for(requirements=requirements, name=name, recipe=recipe, preload=preload)
    return spec.tag(_image.image_tag())


# --- resolving a name -------------------------------------------------------------


def _inspect(client: Any, reference: str) -> dict[str, Any] | None:
    import docker.errors  # noqa: PLC0415 - docker-py only where an engine is asked

    try:
        attrs: dict[str, Any] = client.api.inspect_image(reference)
    except docker.errors.NotFound:
        return None
    return attrs


def _labels_of(attrs: dict[str, Any]) -> dict[str, str]:
    return dict((attrs.get("Config") or {}).get("Labels") or {})


def _builds(client: Any, name: str) -> list[dict[str, Any]]:
    """Every image of environment ``name``, of any runner, newest first."""
    found = client.api.images(filters={"label": f"{LABEL_NAME}={name}"})
    return sorted(found, key=lambda i: i.get("Created", 0), reverse=True)


def _missing(client: Any, name: str, runner: str) -> ImageNotFound:
    if name in recipes():
        command = f"legion image build --recipe {name}"
    else:
        older = [_labels_of_summary(i).get(LABEL_COMMAND, "") for i in _builds(client, name)]
        command = next(
            (c for c in older if c), f"legion image build --requirements FILE --name {name}"
        )
    return ImageNotFound(
        f"the environment {name!r} is not built for this version of the runner ({runner}). "
        f"Build it: `{command}`"
    )


def _labels_of_summary(summary: dict[str, Any]) -> dict[str, str]:
    return dict(summary.get("Labels") or {})


def _missing_reference(reference: str) -> ImageNotFound:
    tagged = ":" in reference.rsplit("/", maxsplit=1)[-1]
    repository = reference.rsplit(":", 1)[0] if tagged else reference
    if repository == _image.REPOSITORY:
        return ImageNotFound(
            f"the sandbox image {reference} is not built. Run `make image` in a checkout, "
            "or `legion image build`."
        )
    if repository.startswith(REPOSITORY_PREFIX):
        env = repository[len(REPOSITORY_PREFIX) :]
        hint = (
            f"legion image build --recipe {env}"
            if env in recipes()
            else f"legion image build --requirements FILE --name {env}"
        )
        return ImageNotFound(
            f"the image {reference} is not on this engine. Build the environment: `{hint}`, "
            f"and select it by name (image={env!r}) so it follows the runner"
        )
    return ImageNotFound(
        f"the image {reference} is not on this engine. Build an environment from the runner "
        "image: `legion image build --requirements FILE --name NAME` (an image not built "
        "from it has no runner)"
    )


def _current_build(client: Any, name: str, runner: str) -> str | None:
    """The image environment ``name`` resolves to on ``runner``: a recipe's
    exact tag when built, else the newest build of that name on this runner."""
    if name in recipes():
        exact = environment_tag(recipe=name)
        if _inspect(client, exact) is not None:
            return exact
    for summary in _builds(client, name):
        if _labels_of_summary(summary).get(LABEL_RUNNER) == runner:
            tags = [t for t in summary.get("RepoTags") or [] if t.startswith(REPOSITORY_PREFIX)]
            return tags[0] if tags else str(summary["Id"])
    return None


def resolve(client: Any, image: str) -> ImageInfo:
    """``image`` (a name or a reference) as the engine has it; ImageNotFound,
    with the command that builds it, when it has not."""
    runner = _image.image_tag()
    reference = image
    if is_environment_name(image):
        built = _current_build(client, image, runner)
        if built is None and (image in recipes() or _builds(client, image)):
            raise _missing(client, image, runner)
        reference = built or image  # else not an environment: a plain image, such as python
    attrs = _inspect(client, reference)
    if attrs is None:
        if is_environment_name(image):
            raise ImageNotFound(
                f"no environment or image named {image!r}. Build one: "
                f"`legion image build --requirements FILE --name {image}` "
                f"(or a recipe: {', '.join(f'--recipe {r}' for r in recipes())})"
            )
        raise _missing_reference(image)
    return info_from_labels(image, reference, _labels_of(attrs))


def info_from_labels(name: str, reference: str, labels: dict[str, str]) -> ImageInfo:
    """An ImageInfo from an image's labels (malformed ones count as none)."""
    packages: list[Package] = []
    try:
        for entry in json.loads(labels.get(LABEL_PACKAGES, "[]")):
            packages.append(
                Package(str(entry["name"]), str(entry["version"]), tuple(entry["modules"]))
            )
        preload = tuple(str(m) for m in json.loads(labels.get(LABEL_PRELOAD, "[]")))
    except (ValueError, KeyError, TypeError):
        packages, preload = [], ()
    return ImageInfo(name=name, reference=reference, packages=tuple(packages), preload=preload)


# --- what the prompt and doctor ask ------------------------------------------------

_cache: dict[str, tuple[float, ImageInfo]] = {}
_cache_lock = threading.Lock()


def _forget(name: str) -> None:
    with _cache_lock:
        _cache.pop(name, None)


def describe(image: str | None) -> ImageInfo:
    """:func:`resolve` for code without an event loop (the system prompt), with
    a short cache. None, and the runner's own tag, answer the runner image
    (standard library only) without asking the engine."""
    runner = _image.image_tag()
    if not image or image == runner:
        return ImageInfo(name=image or runner, reference=runner)
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(image)
    if cached is not None and now - cached[0] < _CACHE_SECONDS:
        return cached[1]
    client = _image._client()
    try:
        info = resolve(client, image)
    finally:
        client.close()
    with _cache_lock:
        _cache[image] = (now, info)
    return info


@dataclass(frozen=True)
class BuiltEnvironment:
    """An environment image on the engine (``legion doctor``)."""

    name: str
    tag: str
    current: bool
    """Built on the current runner (older ones are never selected by name)."""
    packages: tuple[Package, ...]
    preload: tuple[str, ...]


def built_environments(client: Any) -> list[BuiltEnvironment]:
    """Every environment image on the engine, newest first."""
    runner = _image.image_tag()
    found = client.api.images(filters={"label": f"{LABEL_KIND}=environment"})
    built = []
    for summary in sorted(found, key=lambda i: i.get("Created", 0), reverse=True):
        labels = _labels_of_summary(summary)
        tags = [t for t in summary.get("RepoTags") or [] if t.startswith(REPOSITORY_PREFIX)]
        tag = tags[0] if tags else str(summary["Id"])[:19]
        info = info_from_labels(labels.get(LABEL_NAME, "?"), tag, labels)
        built.append(
            BuiltEnvironment(
                name=info.name,
                tag=tag,
                current=labels.get(LABEL_RUNNER) == runner,
                packages=info.packages,
                preload=info.preload,
            )
        )
    return built
