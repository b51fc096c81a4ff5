"""Real data work in a sandbox, end to end (issue 15's acceptance): an agent
with the ``data`` image gets ``sales.csv`` (10,000 rows) through ``files=``,
groups it with pandas, writes ``out/summary.csv`` and plots with matplotlib.
The same run embedded, through ``legion serve`` from ``legion.Client``, and
from the Node.js interop client. Only the model is scripted."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import legion
from legion.sandbox.session import png_size
from legion.testing import FakeOpenAIServer, ScriptedModel, action
from tests.server.conftest import server_env, start_server, stop_cleanly

pytestmark = pytest.mark.docker

REGIONS = ["north", "south", "east", "west", "centre"]
ROWS = [(REGIONS[i % 5], i % 97, (i * 7) % 13) for i in range(10_000)]
SALES = "region,amount,units\n" + "".join(f"{r},{a},{u}\n" for r, a, u in ROWS)
EXPECTED = {
    region: (sum(a for r, a, _ in ROWS if r == region), sum(u for r, _, u in ROWS if r == region))
    for region in REGIONS
}

CODE = """
import pandas as pd
import matplotlib.pyplot as plt
sales = pd.read_csv("sales.csv")
summary = sales.groupby("region")[["amount", "units"]].sum().sort_index()
summary.to_csv("out/summary.csv")
ax = summary["amount"].plot.bar(title="Sales by region")
plt.tight_layout()
plt.show()
int(summary["amount"].sum())
"""


class Analyst(legion.Agent):
    """Analyses sales data with pandas."""

    config = {"image": "data"}


def _summary(data: bytes) -> dict[str, tuple[int, int]]:
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return {r["region"]: (int(r["amount"]), int(r["units"])) for r in rows}


def _check_png(data: bytes) -> None:
    # The standard library's view: the signature, then IHDR's width and height.
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    size = png_size(data)
    assert size is not None and size[0] > 0 and size[1] > 0, size


def _pngs_of(events: list[Any]) -> list[bytes]:
    found = []
    for event in events:
        for artifact in (event.data or {}).get("artifacts") or []:
            if artifact.get("mime_type") == "image/png" and "data_base64" in artifact:
                found.append(base64.b64decode(artifact["data_base64"]))
    return found


async def test_an_agent_does_data_work_in_the_data_image(
    data_runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(
        [action("eval_and_continue", code=CODE), action("return", result="summarised")]
    )
    events: list[Any] = []
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        result = await legion.run(
            Analyst, "sum sales by region", model=model, runtime=data_runtime,
            files={"sales.csv": SALES},
        )  # fmt: skip
    finally:
        unsubscribe()
    assert result.output == "summarised"
    assert _summary(result.files["summary.csv"]) == EXPECTED
    (png,) = _pngs_of([e for e in events if e.name == legion.telemetry.SANDBOX_EVAL_STOP])
    _check_png(png)
    # The model read a line about the figure, never its bytes.
    fed = model.requests[1][-1]["content"]
    assert "[image/png " in fed and "Sales by region" in fed
    assert str(sum(a for a, _ in EXPECTED.values())) in fed


def test_the_prompt_lists_the_packages_of_the_image(data_image: str) -> None:
    prompt = legion.prompt_for(Analyst)
    assert "pandas 2.3.3" in prompt and "standard library only" not in prompt

    class Plain(legion.Agent):
        """Nothing extra."""

    assert "standard library only" in legion.prompt_for(Plain)


@pytest.fixture(scope="module")
def data_server(data_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A `legion serve` of the test registry whose sandboxes use the data image."""
    with FakeOpenAIServer(_served_script) as model:
        where = tmp_path_factory.mktemp("data-served")
        server = start_server(
            ["--listen", "127.0.0.1:0", "--image", "data"], server_env(model), where
        )
        try:
            yield server
        finally:
            stop_cleanly(server)


def _served_script(messages: list[dict[str, Any]]) -> Any:
    latest = str(messages[-1]["content"])
    if latest.startswith("Your code ran"):
        return action("return", result="summarised")
    return action("eval_and_continue", code=CODE)


async def test_the_same_run_through_legion_serve(data_server: Any) -> None:
    events: list[Any] = []
    async with legion.Client(data_server.address) as client:
        result = await client.run(
            "Coder", "sum sales by region", files={"sales.csv": SALES}, on_event=events.append
        )
    assert result.output == "summarised"
    assert _summary(result.files["summary.csv"]) == EXPECTED
    (png,) = _pngs_of([e for e in events if e.name == legion.telemetry.SANDBOX_EVAL_STOP])
    _check_png(png)


def test_the_same_run_from_the_node_client(data_server: Any, tmp_path: Path) -> None:
    node = shutil.which("node")
    interop = Path(__file__).resolve().parents[1] / "interop"
    if node is None or not (interop / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("node and the interop client's packages are needed (`make test`)")
    sales = tmp_path / "sales.csv"
    sales.write_text(SALES)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            *(node, "client.mjs", "--address", data_server.address, "--agent", "Coder"),
            *("--task", "sum sales by region", "--file", f"sales.csv={sales}", "--out", str(out)),
        ],
        check=False,
        cwd=interop,
        env={**os.environ, "LEGION_SERVER_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["run"]["result"]["output"] == "summarised"
    assert summary["run"]["result"]["files"] == ["summary.csv"]
    written = (out / "summary.csv").read_bytes()
    assert _summary(written) == EXPECTED
    # Byte for byte what the Python client gets for the same run.
    with legion.SyncClient(data_server.address) as client:
        from_python = client.run("Coder", "sum sales by region", files={"sales.csv": SALES})
    assert written == from_python.files["summary.csv"]
