"""Environments without an engine: what a build's tag covers, the options it
takes, how the prompt names packages, and `legion serve --image`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import legion
from legion.config import resolve_agent_config
from legion.prompt import environment_line
from legion.sandbox import environment
from legion.sandbox.backend import Package
from legion.server.commands import images

RUNNER = "legion-sandbox:0000000000000000"


def tag_of(path: Path, *, preload: list[str] | None = None, runner: str = RUNNER) -> str:
    return environment.spec_for(requirements=path, name="mine", preload=preload).tag(runner)


def test_the_tag_follows_the_requirements_the_runner_and_the_preload(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six==1.17.0\n")
    first = tag_of(requirements)
    assert re.fullmatch(r"legion-env-mine:[0-9a-f]{16}", first)
    assert tag_of(requirements) == first  # unchanged: the same tag, so no rebuild
    assert tag_of(requirements, runner="legion-sandbox:1111111111111111") != first
    assert tag_of(requirements, preload=["six"]) != first
    requirements.write_text("six==1.16.0\n")
    assert tag_of(requirements) != first


def test_a_wheel_directory_is_hashed_by_its_wheels(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    wheel.write_bytes(b"one")
    first = tag_of(tmp_path)
    (tmp_path / "notes.txt").write_text("not a wheel")
    assert tag_of(tmp_path) == first
    wheel.write_bytes(b"two")
    assert tag_of(tmp_path) != first


def test_requirements_may_declare_the_preload_list(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# legion-preload: numpy, pandas matplotlib.pyplot\nnumpy\n")
    spec = environment.spec_for(requirements=requirements, name="mine")
    assert spec.preload == ("numpy", "pandas", "matplotlib.pyplot")
    chosen = environment.spec_for(requirements=requirements, name="mine", preload=["numpy"])
    assert chosen.preload == ("numpy",)
    assert chosen.command.endswith("--preload numpy")


def test_the_data_recipe_is_pinned_and_preloads_pandas() -> None:
    spec = environment.spec_for(recipe="data")
    assert spec.name == "data" and spec.command == "legion image build --recipe data"
    assert spec.preload == ("numpy", "pandas", "matplotlib.pyplot")
    lines = [line.split("#")[0].strip() for line in spec.source.read_text().splitlines() if line]
    pins = [line for line in lines if line]
    assert {p.split("==")[0] for p in pins} >= {"numpy", "pandas", "matplotlib"}
    assert all("==" in p for p in pins), pins


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"requirements": "x.txt"}, "--requirements FILE --name NAME"),
        ({"name": "mine"}, "--requirements FILE --name NAME"),
        ({"requirements": "/no/such/file.txt", "name": "mine"}, "no file or directory"),
        ({"requirements": "x.txt", "name": "Bad Name"}, "lower-case letters"),
        ({"requirements": "x.txt", "name": "data"}, "is a shipped recipe"),
        ({"recipe": "nope"}, "the recipes are: data"),
        ({"recipe": "data", "requirements": "x.txt"}, "not both"),
        ({"recipe": "data", "preload": ["not a module"]}, "is not a module name"),
    ],
)
def test_build_options_are_checked_with_the_fix(options: dict[str, object], message: str) -> None:
    with pytest.raises(legion.UsageError, match=re.escape(message)):
        environment.spec_for(**options)  # type: ignore[arg-type]


def test_an_empty_wheel_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(legion.UsageError, match="holds no wheels"):
        environment.spec_for(requirements=tmp_path, name="mine")


def test_names_and_references() -> None:
    assert environment.is_environment_name("data")
    assert environment.is_environment_name("ml-2.1")
    assert not environment.is_environment_name("legion-env-data:abc")
    assert not environment.is_environment_name("registry.example/team/image")


def test_the_prompt_names_packages_and_their_import_names() -> None:
    assert environment_line(()) == (
        "Python 3.11 with the standard library only; nothing can be installed."
    )
    line = environment_line(
        (
            Package("pandas", "2.3.3", ("pandas",)),
            Package("python-dateutil", "2.9.0.post0", ("dateutil",)),
        )
    )
    assert "pandas 2.3.3, python-dateutil 2.9.0.post0 (import dateutil)" in line
    assert "standard library only" not in line


def test_agent_config_takes_the_image_from_legion_image() -> None:
    assert resolve_agent_config({}, {}, environ={"LEGION_IMAGE": "data"}).image == "data"
    assert resolve_agent_config({}, {}, environ={"LEGION_IMAGE": ""}).image is None
    own = resolve_agent_config({"image": "ml"}, {}, environ={"LEGION_IMAGE": "data"})
    assert own.image == "ml"  # the agent's own config wins over the environment
    with pytest.raises(legion.UsageError, match="image must be"):
        legion.AgentConfig(image=3)  # type: ignore[arg-type]


def test_serve_image_options() -> None:
    assert images([]) == {"image": None, "agent_images": {}}
    assert images(["data", "Coder=ml", "Echo=legion-sandbox:abc"]) == {
        "image": "data",
        "agent_images": {"Coder": "ml", "Echo": "legion-sandbox:abc"},
    }
    for bad in (["=data"], ["Coder="], ["data", "ml"]):
        with pytest.raises(legion.UsageError, match="--image"):
            images(bad)
