"""`legion serve --image`: the runtime's image for every agent, and one agent's
own with AGENT=IMAGE; what ListAgents tells clients of each agent's packages."""

from __future__ import annotations

from pathlib import Path

import pytest

import legion
from legion.sandbox import environment
from legion.sandbox import image as legion_image
from legion.testing import FakeOpenAIServer

from .conftest import server_env, start_server, stop_cleanly

pytestmark = pytest.mark.docker

VERSION = "#code import pandas\npandas.__version__"


def pandas_pin() -> str:
    text = environment.recipes()["data"].read_text()
    return next(line.split("==")[1] for line in text.splitlines() if line.startswith("pandas=="))


async def test_serve_image_for_every_agent_and_per_agent(
    data_image: str, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    runner = legion_image.image_tag()
    server = start_server(
        ["--listen", "127.0.0.1:0", "--image", "data", "--image", f"Echo={runner}"],
        server_env(fake_model),
        tmp_path,
    )
    try:
        async with legion.Client(server.address) as client:
            agents = {a.name: a for a in await client.list_agents()}
            prompts = {name: a.system_prompt for name, a in agents.items()}
            assert f"pandas {pandas_pin()}" in prompts["Coder"]
            assert "standard library only" in prompts["Echo"]
            # The image and its packages are fields of their own (the dashboard shows them).
            assert agents["Coder"].image == "data"
            assert f"pandas {pandas_pin()}" in agents["Coder"].packages
            assert agents["Echo"].image == runner and agents["Echo"].packages == []
            # Coder names no image: it runs in the server's, which has pandas.
            assert (await client.run("Coder", VERSION)).output == pandas_pin()
            # Echo is mapped to the runner's image: no pandas there.
            with pytest.raises(legion.MaxRetriesReached) as failed:
                await client.run("Echo", VERSION)
            said = [str(m["content"]) for m in failed.value.messages]
            assert any("No module named 'pandas'" in text for text in said)
    finally:
        stop_cleanly(server)


async def test_serve_refuses_an_image_it_cannot_find(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    from .conftest import legion_cli

    done = legion_cli(
        "serve",
        "--agents",
        "tests.server.agents:REGISTRY",
        "--listen",
        "127.0.0.1:0",
        "--store",
        "memory",
        "--image",
        "no-such-env",
        env=server_env(fake_model),
    )
    assert done.returncode != 0
    assert "legion image build --requirements FILE --name no-such-env" in done.stderr
    done = legion_cli(
        "serve",
        "--agents",
        "tests.server.agents:REGISTRY",
        "--store",
        "memory",
        "--image",
        "Nobody=data",
        env=server_env(fake_model),
    )
    assert done.returncode == 2
    assert "images name agent(s) ['Nobody']" in done.stderr
