"""Environments on the real engine: building (a requirements file, a wheel
directory, rebuilding only on a change), selecting one per Sandbox, agent and
LEGION_IMAGE, the missing-image error, the prompt, preload, and the data
recipe under the default limits. `legion serve --image` is in
tests/server/test_images.py; the escape corpus and the limits suite run in the
data image too (tests/security)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

import legion
from legion.sandbox import environment
from legion.testing import ScriptedModel, action

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def pinned(distribution: str) -> str:
    """The version the data recipe pins for ``distribution``."""
    for line in environment.recipes()["data"].read_text().splitlines():
        if line.startswith(f"{distribution}=="):
            return line.split("==")[1].split()[0]
    raise AssertionError(f"the data recipe does not pin {distribution}")


class Analyst(legion.Agent):
    """Analyses tables."""

    config = {"image": "data", "max_retries": 0}


class Plain(legion.Agent):
    """Has the standard library only."""

    config = {"max_retries": 0}


# --- building ---------------------------------------------------------------------------


def test_the_data_recipe_records_what_imports(
    data_image: str, docker_client: docker.DockerClient
) -> None:
    assert data_image == environment.environment_tag(recipe="data")
    labels = docker_client.images.get(data_image).labels
    packages = {p["name"]: p for p in json.loads(labels[environment.LABEL_PACKAGES])}
    assert packages["pandas"]["version"] == pinned("pandas")
    assert packages["numpy"]["modules"] == ["numpy"]
    assert packages["python-dateutil"]["modules"] == ["dateutil"]
    assert json.loads(labels[environment.LABEL_PRELOAD]) == ["numpy", "pandas", "matplotlib.pyplot"]
    assert labels[environment.LABEL_NAME] == "data"
    assert labels[environment.LABEL_RUNNER] == legion.sandbox.image.image_tag()
    # The install stage does not stay behind as an untagged image.
    history = {layer["Id"] for layer in docker_client.api.history(data_image)}
    dangling = {i.id for i in docker_client.images.list(filters={"dangling": True})}
    assert not dangling & history


def test_an_unchanged_recipe_is_not_rebuilt(data_image: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "legion.cli", "image", "build", "--recipe", "data"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{data_image} is up to date" in done.stderr
    assert "Step " not in done.stderr
    named = subprocess.run(
        [sys.executable, "-m", "legion.cli", "image", "name", "--recipe", "data"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert named.stdout.strip() == data_image


def make_wheel(folder: Path, version: str) -> Path:
    """A pure-Python wheel of ``legion_probe_pkg``, made here: no index needed for it."""
    name = "legion_probe_pkg"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: legion-probe-pkg\nVersion: {version}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: legion-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def wheel_env(docker_client: docker.DockerClient) -> Iterator[str]:
    """The name of an environment built from a wheel directory; its images go after."""
    name = f"legion-test-wheels-{os.getpid()}"
    yield name
    for image in docker_client.api.images(filters={"label": f"{environment.LABEL_NAME}={name}"}):
        docker_client.api.remove_image(image["Id"], force=True)


async def test_a_wheel_directory_builds_and_a_changed_wheel_rebuilds(
    wheel_env: str,
    tmp_path: Path,
    runtime: legion.SandboxRuntime,
    docker_client: docker.DockerClient,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    first_wheel = make_wheel(wheels, "1.0")
    said: list[str] = []
    first = environment.build_environment(
        requirements=wheels, name=wheel_env, preload=["legion_probe_pkg"], progress=said.append
    )
    assert any(line.startswith("building") for line in said), said
    async with legion.Sandbox(runtime=runtime, image=wheel_env) as sandbox:
        result = await sandbox.run("import legion_probe_pkg\nlegion_probe_pkg.VERSION")
        assert result.value == "1.0", result.error
    info = await runtime.describe_image(wheel_env)
    assert info.reference == first and info.preload == ("legion_probe_pkg",)
    assert [(p.name, p.version, p.modules) for p in info.packages] == [
        ("legion-probe-pkg", "1.0", ("legion_probe_pkg",))
    ]

    said.clear()  # nothing changed: nothing is built
    again = environment.build_environment(
        requirements=wheels, name=wheel_env, preload=["legion_probe_pkg"], progress=said.append
    )
    assert again == first and said[-1] == f"{first} is up to date"
    assert not any(line.startswith(("building", "downloading")) for line in said), said

    first_wheel.unlink()
    make_wheel(wheels, "1.1")
    second = environment.build_environment(
        requirements=wheels, name=wheel_env, preload=["legion_probe_pkg"], progress=said.append
    )
    assert second != first
    tags = {e.tag for e in environment.built_environments(docker_client) if e.name == wheel_env}
    assert tags == {first, second}  # a few builds of a name are kept, not only the newest
    # The name now selects the newest build (a fresh runtime: names are remembered).
    async with (
        legion.SandboxRuntime(pool_size=0) as fresh,
        legion.Sandbox(runtime=fresh, image=wheel_env) as sandbox,
    ):
        result = await sandbox.run("import legion_probe_pkg\nlegion_probe_pkg.VERSION")
        assert result.value == "1.1", result.error


async def test_a_build_for_another_runner_is_never_selected(
    wheel_env: str,
    tmp_path: Path,
    runtime: legion.SandboxRuntime,
    docker_client: docker.DockerClient,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "1.0")
    built = environment.build_environment(requirements=wheels, name=wheel_env)
    # The same image, labelled as built on a runner this controller is not.
    command = f"legion image build --requirements {wheels} --name {wheel_env}-old"
    labels = {
        environment.LABEL_NAME: f"{wheel_env}-old",
        environment.LABEL_RUNNER: "legion-sandbox:0000000000000000",
        environment.LABEL_COMMAND: command,
    }
    docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {built}\n".encode()),
        tag=f"{environment.REPOSITORY_PREFIX}{wheel_env}-old:stale",
        labels=labels,
        rm=True,
    )
    try:
        with pytest.raises(legion.ImageNotFound) as stale:
            await legion.Sandbox(runtime=runtime, image=f"{wheel_env}-old").start()
        assert "not built for this version of the runner" in str(stale.value)
        assert f"`{command}`" in str(stale.value)  # the command that built it, again
        listed = {e.name: e for e in environment.built_environments(docker_client)}
        assert listed[wheel_env].current and not listed[f"{wheel_env}-old"].current
    finally:
        docker_client.images.remove(f"{environment.REPOSITORY_PREFIX}{wheel_env}-old:stale")


# --- selecting ----------------------------------------------------------------------------


async def test_a_sandbox_selects_its_image(
    data_image: str, runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    async with legion.Sandbox(runtime=runtime, image="data") as sandbox:
        result = await sandbox.run("import pandas\npandas.__version__")
        assert result.value == pinned("pandas"), result.error
        assert sandbox.container_id is not None
        attrs = docker_client.api.inspect_container(sandbox.container_id)
        assert attrs["Config"]["Image"] == data_image
        (live,) = [s for s in await runtime.sandboxes() if s.container_id == sandbox.container_id]
        assert live.image == "data"
    async with legion.Sandbox(runtime=runtime) as plain:
        missing = await plain.run("import pandas")
        assert missing.error is not None and missing.error.type == "ModuleNotFoundError"


async def test_the_data_image_is_the_same_sandbox(
    data_image: str, runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    """More packages, not a weaker sandbox: every setting but the image is the same."""
    configs = []
    for image in (None, "data"):
        async with legion.Sandbox(runtime=runtime, image=image) as sandbox:
            await sandbox.run("1")
            assert sandbox.container_id is not None
            configs.append(docker_client.api.inspect_container(sandbox.container_id))
    default, data = configs
    assert data["Config"]["Image"] == data_image != default["Config"]["Image"]
    for key in (
        "SecurityOpt",
        "ReadonlyRootfs",
        "NetworkMode",
        "CapDrop",
        "Memory",
        "MemorySwap",
        "PidsLimit",
        "NanoCpus",
        "Tmpfs",
        "Ulimits",
        "Init",
        "Runtime",
    ):
        assert data["HostConfig"][key] == default["HostConfig"][key], key
    assert data["Config"]["User"] == default["Config"]["User"] == "65534:65534"


async def test_an_agent_selects_its_image_and_its_prompt_lists_the_packages(
    data_image: str, runtime: legion.SandboxRuntime
) -> None:
    code = "import pandas as pd\npd.DataFrame({'a': [1, 2, 3]}).a.sum().item()"
    model = ScriptedModel([action("eval_and_complete", code)])
    result = await legion.run(Analyst, "sum it", model=model, runtime=runtime)
    assert result.output == 6
    system = model.requests[0][0]["content"]
    assert f"pandas {pinned('pandas')}" in system
    assert "python-dateutil 2.9.0.post0 (import dateutil)" in system
    assert "standard library only" not in system
    # The same agent class, another image for one call; and a plain agent.
    assert "standard library only" in legion.prompt_for(Plain)
    assert f"pandas {pinned('pandas')}" in legion.prompt_for(Plain, image="data")
    model = ScriptedModel([action("eval_and_complete", code)])
    assert (await legion.run(Plain, "sum", model=model, runtime=runtime, image="data")).output == 6


def test_legion_image_selects_the_image_of_a_program(data_image: str) -> None:
    program = textwrap.dedent(
        """
        import asyncio, legion
        from legion.testing import ScriptedModel, action

        class Plain(legion.Agent):
            '''Has whatever LEGION_IMAGE says.'''

        model = ScriptedModel([action("eval_and_complete", "import numpy\\nnumpy.__version__")])
        result = asyncio.run(legion.run(Plain, "version?", model=model))
        print(result.output)
        print("pandas" in model.requests[0][0]["content"])
        """
    )
    env = {**os.environ, "LEGION_IMAGE": "data", "LEGION_POOL_SIZE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [pinned("numpy"), "True"]


async def test_a_missing_image_says_the_command_that_builds_it(
    data_image: str, runtime: legion.SandboxRuntime
) -> None:
    with pytest.raises(legion.ImageNotFound) as missing:
        await legion.Sandbox(runtime=runtime, image="no-such-env").start()
    assert "legion image build --requirements FILE --name no-such-env" in str(missing.value)
    with pytest.raises(legion.ImageNotFound, match=r"`legion image build --recipe data`"):
        await legion.Sandbox(runtime=runtime, image="legion-env-data:0123456789abcdef").start()
    model = ScriptedModel([action("eval_and_complete", "1")])
    with pytest.raises(legion.ImageNotFound, match="no-such-env"):
        await legion.run(Plain, "x", model=model, runtime=runtime, image="no-such-env")
    assert model.requests == []  # refused before the model was asked
    # A runtime whose own image is missing refuses to start, saying the same.
    with pytest.raises(legion.ImageNotFound, match="--name no-such-env"):
        await legion.SandboxRuntime(image="no-such-env", pool_size=0).start()


# --- preload and the default limits ---------------------------------------------------------


async def test_preload_imports_ahead_and_binds_nothing(data_runtime: legion.SandboxRuntime) -> None:
    assert data_runtime.preload == ("numpy", "pandas", "matplotlib.pyplot")
    await data_runtime.warm()
    probe = "import sys\n(['pandas' in sys.modules, 'matplotlib.pyplot' in sys.modules], " + (
        "sorted(k for k in globals() if 'legion' in k))"
    )
    async with legion.Sandbox(runtime=data_runtime) as sandbox:
        assert (await sandbox.run(probe)).value == [[True, True], []]


@pytest.mark.parametrize(("preload", "loaded"), [((), False), (("no_such_module",), False)])
async def test_no_preload_or_a_failed_one(
    data_image: str, preload: tuple[str, ...], loaded: bool
) -> None:
    async with legion.SandboxRuntime(image="data", pool_size=1, preload=preload) as runtime:
        await runtime.warm()
        async with legion.Sandbox(runtime=runtime) as sandbox:
            probe = "import sys\n('pandas' in sys.modules, [k for k in globals() if 'legion' in k])"
            result = await sandbox.run(probe)
            assert result.value == [loaded, []], result.error


PANDAS_WORK = """
import io, os, resource, warnings
warnings.simplefilter("error")  # matplotlib would warn about a cache directory it cannot write
import numpy as np, pandas as pd
import matplotlib.pyplot as plt

rows = 10_000
df = pd.DataFrame({
    "region": np.array(["north", "south", "east", "west"])[np.arange(rows) % 4],
    "month": np.arange(rows) // 4 % 12 + 1,
    "amount": np.arange(rows, dtype=float),
})
summary = df.groupby(["region", "month"]).amount.agg(["sum", "mean", "count"]).reset_index()
fig, ax = plt.subplots(figsize=(8, 5))
for region, part in summary.groupby("region"):
    ax.plot(part["month"], part["sum"], label=region)
ax.legend()
png = io.BytesIO()
fig.savefig(png, format="png", dpi=100)
{
    "groups": len(summary),
    "total": float(summary["sum"].sum()),
    "png": png.getvalue()[:8] == b"\\x89PNG\\r\\n\\x1a\\n",
    "written": sorted(os.listdir("/tmp")),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
}
"""


async def test_realistic_pandas_work_fits_the_default_limits_and_writes_nothing(
    data_image: str, runtime: legion.SandboxRuntime
) -> None:
    # A cold container of the data image: nothing imported ahead, default limits.
    assert runtime.limits.memory_mb == legion.SandboxLimits().memory_mb
    async with legion.Sandbox(runtime=runtime, image="data") as sandbox:
        result = await sandbox.run(PANDAS_WORK)
        assert result.error is None, result.error.traceback if result.error else ""
        value = result.value
        assert value["groups"] == 48 and value["total"] == sum(range(10_000))
        assert value["png"] is True
        assert value["written"] == []  # the font list was built with the image
        assert result.stderr == ""
        assert value["peak_rss_mib"] < legion.SandboxLimits().memory_mb / 2
        (live,) = [s for s in await runtime.sandboxes() if s.container_id == sandbox.container_id]
        if live.peak_memory_bytes is not None:  # cgroup v1 says; v2 does not
            assert live.peak_memory_bytes < legion.SandboxLimits().memory_mb * MiB / 2
