"""What code mode saves (issue 16, acceptance 2): a task that needs 30 MCP
calls, against the real server-memory, done by a scripted model twice.

- Code mode: the model writes one step whose code loops over the 30 calls
  and keeps only what the task asks for. The model is asked once.
- One call per step (how JSON tool calling works): the same tools, each call
  its own step, every result fed back to the model before the next call.

The tokens the model read are counted with litellm's tokenizer for gpt-4o
(offline) over every request's messages; the test prints both figures and
records them as properties (README, "What code mode saves", quotes them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import legion
from legion.testing import ScriptedModel, action
from tests.conftest import missing

pytestmark = pytest.mark.docker

MEMORY = (
    Path(__file__).parents[1]
    / "mcp"
    / "node_modules"
    / "@modelcontextprotocol"
    / "server-memory"
    / "dist"
    / "index.js"
)

PEOPLE = [f"person-{i:02d}" for i in range(30)]
TASK = "Which of the 30 people in the knowledge graph speak Elixir? Answer with their names."
OBSERVATIONS = [
    "joined the platform team in {year} and owns the billing service's on-call rota",
    "wrote the design document for the event pipeline and reviews its changes weekly",
    "mentors two junior engineers and runs the monthly architecture reading group",
    "speaks {language} and maintains the team's internal style guide for it",
    "moved from the data team, keeps the nightly ETL jobs and their dashboards healthy",
]
LANGUAGES = ["Elixir", "Python", "Go", "Rust", "OCaml"]


def _language(i: int) -> str:
    return LANGUAGES[(i * 7) % len(LANGUAGES)]


EXPECTED = [name for i, name in enumerate(PEOPLE) if _language(i) == "Elixir"]


def _entities() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "entityType": "person",
            "observations": [
                o.format(year=2010 + i % 12, language=_language(i)) for o in OBSERVATIONS
            ],
        }
        for i, name in enumerate(PEOPLE)
    ]


def tokens_read(model: ScriptedModel) -> int:
    """Tokens of every message the model was sent, over all its requests."""
    import litellm

    return sum(litellm.token_counter(model="gpt-4o", messages=sent) for sent in model.requests)


@pytest.fixture
async def memory(tmp_path: Path, runtime: legion.SandboxRuntime):  # type: ignore[no-untyped-def]
    node = shutil.which("node")
    if node is None:
        missing("node is not installed (apt-get install nodejs npm)")
    if not MEMORY.is_file():
        pytest.fail("server-memory is not installed: `make mcp-servers`", pytrace=False)
    server = legion.MCP.stdio(
        node, [str(MEMORY)], env={"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")}
    )
    async with legion.Sandbox(tools=[server], runtime=runtime) as sandbox:
        made = await sandbox.run(
            f"Memory.create_entities(entities={_entities()!r})\n"
            "len(Memory.read_graph()['entities'])"
        )
    assert made.error is None and made.value == 30, made.error
    yield server
    await server.close()


def _agent(memory: legion.MCP) -> type[legion.Agent]:
    class Staffing(legion.Agent):
        """Answers questions about the people in the knowledge graph."""

        tools = [memory]
        config = {"max_iterations": 40, "max_retries": 1}

    return Staffing


CODE_MODE = f"""
people = {PEOPLE!r}
found = []
for name in people:
    graph = Memory.open_nodes(names=[name])
    if any("Elixir" in o for e in graph["entities"] for o in e["observations"]):
        found.append(name)
found
"""


def _one_call_per_step(messages: list[dict[str, str]]) -> str:
    """The model's side of one-call-per-step: the next lookup, or, once every
    result is in, the answer it reads off the results it was shown."""
    steps = sum(m["role"] == "assistant" for m in messages)
    if steps < len(PEOPLE):
        return action("eval_and_continue", f"Memory.open_nodes(names=[{PEOPLE[steps]!r}])")
    # Each step's result is the user message after that step's reply.
    results = [m["content"] for m in messages[2:] if m["role"] == "user"]
    assert len(results) == len(PEOPLE), len(results)
    found = [name for name, seen in zip(PEOPLE, results, strict=True) if "speaks Elixir" in seen]
    return action("return", result=found)


async def test_thirty_mcp_calls_in_one_code_step_read_far_fewer_tokens(
    runtime: legion.SandboxRuntime,
    memory: legion.MCP,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = _agent(memory)

    code_model = ScriptedModel([action("eval_and_complete", CODE_MODE)])
    code_run = await legion.run(agent, TASK, model=code_model, runtime=runtime)
    assert code_run.output == EXPECTED
    assert len(code_model.requests) == 1, "code mode asked the model more than once"
    assert code_run.iterations == 0  # the one step completed the run

    step_model = ScriptedModel(_one_call_per_step)
    step_run = await legion.run(agent, TASK, model=step_model, runtime=runtime)
    assert step_run.output == EXPECTED
    assert len(step_model.requests) == len(PEOPLE) + 1
    assert step_run.iterations == len(PEOPLE)

    code_tokens, step_tokens = tokens_read(code_model), tokens_read(step_model)
    figures = {
        "calls": len(PEOPLE),
        "code_mode": {"model_requests": len(code_model.requests), "tokens_read": code_tokens},
        "one_call_per_step": {
            "model_requests": len(step_model.requests),
            "tokens_read": step_tokens,
        },
        "ratio": round(step_tokens / code_tokens, 1),
    }
    record_property("mcp_tokens", json.dumps(figures))
    with capsys.disabled():
        print(f"\nMCP tokens read (gpt-4o tokenizer): {json.dumps(figures)}")
    assert step_tokens > 10 * code_tokens, figures
