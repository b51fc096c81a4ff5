"""The dashboard in a real browser: headless Debian chromium, driven by
playwright-core (browse.mjs), against a real `legion serve --dashboard` whose
runs start through the gRPC API while the pages are open.

Acceptance 1: a run with a sub-agent and a human request appears live, the
request is answered from the page, and the run is seen to finish; the
screenshots of every page are written to docs/screenshots (the README links
them). Acceptance 2: model output, code, sandbox output and a question holding
HTML and script are shown as text, on the live pages and the server-rendered
trace, and nothing of them runs or becomes an element."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import legion

from .conftest import HERE, Served

pytestmark = pytest.mark.docker

ROOT = HERE.parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
PAGES = ("tree", "trace", "sandboxes", "humans", "agents", "chat")

QUESTION = "Publish the brief?"
ANSWER = "yes, publish it"
NOTE = "notes on the brief"
EDITOR_TASK = (
    f"#code note = SubAgents.call('Echo', {NOTE!r})\n"
    f"answer = Human.ask({QUESTION!r}, meta={{'options': ['yes', 'no']}})\n"
    "{'note': note, 'answer': answer}"
)

PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"><b>bold</b>'
HOSTILE_TASK = f"#code print({PAYLOAD!r})\nHuman.ask({PAYLOAD!r})"


async def browse(
    node: str, dashboard: Served, scenario: str, start_run: Any, *options: str
) -> tuple[dict[str, Any], legion.RunResult]:
    """Run browse.mjs; once its pages are live, start the run; its summary and the result."""
    browser = await asyncio.create_subprocess_exec(
        *(node, "browse.mjs", "--url", dashboard.url, "--token", dashboard.tokens.alice),
        *("--scenario", scenario, *options),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert browser.stdout is not None
    run: asyncio.Task[legion.RunResult] | None = None
    try:
        ready = await asyncio.wait_for(browser.stdout.readline(), 90)
        if json.loads(ready or b"{}").get("step") != "ready":
            assert browser.stderr is not None
            pytest.fail(f"the browser did not get ready: {(await browser.stderr.read()).decode()}")
        run = asyncio.create_task(start_run())
        out, err = await asyncio.wait_for(browser.communicate(), 180)
        assert browser.returncode == 0, err.decode()
        result = await asyncio.wait_for(run, 60)
    finally:
        if browser.returncode is None:
            browser.kill()
            await browser.wait()
        if run is not None and not run.done():
            run.cancel()  # the browser failed before answering: do not wait for the timeout
            await asyncio.gather(run, return_exceptions=True)
    last = json.loads(out.decode().strip().splitlines()[-1])
    assert last["step"] == "done"
    return last["summary"], result


async def test_a_run_with_a_sub_agent_and_a_human_shows_live_and_is_answered_from_the_page(
    node: str, chromium: Path, dashboard: Served
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    async def start_run() -> legion.RunResult:
        async with legion.Client(dashboard.address, token=dashboard.tokens.alice) as client:
            return await client.run("Editor", EDITOR_TASK)

    seen, result = await browse(
        node,
        dashboard,
        "live",
        start_run,
        *("--screenshots", str(SCREENSHOTS), "--answer", ANSWER),
    )

    # The answer typed into the page reached the sandbox code, which returned it.
    assert result.output == {"note": NOTE, "answer": ANSWER}
    assert seen["run_id"] == result.run_id

    # Live: the tree showed the run waiting on its question, its sub-agent
    # nested under it, and then the run finished, all without a reload.
    assert seen["parent_while_asking"] == "running"
    assert seen["child_state_seen"] in ("running", "finished")
    assert seen["asked"] == QUESTION
    assert seen["not_reloaded"] is True
    assert seen["pending_after"] == "0"

    # The sandbox of the waiting run, with its limits and what it used.
    sandbox = seen["sandbox"]
    assert sandbox["run"] == result.run_id[:8]
    assert sandbox["memory_limit"] == "256.0 MiB" and sandbox["cpus"] == "1"
    assert sandbox["pids"] == "128"
    assert sandbox["memory"].endswith("MiB") and sandbox["peak"].endswith("MiB")
    assert sandbox["cpu"].endswith(" s")

    # The trace: the model call, the code with its value, each tool call with
    # its arguments and result, the sub-agent and the question.
    entries = seen["entries"]
    kinds = [e["kind"] for e in entries]
    for kind in ("llm", "eval", "tool", "sub", "asked"):
        assert kind in kinds, kinds
    tools = {e["title"]: e for e in entries if e["kind"] == "tool"}
    assert json.loads(tools["SubAgents.call"]["args"]) == ["Echo", NOTE]
    assert json.loads(tools["SubAgents.call"]["result"]) == NOTE
    assert tools["Human.ask"]["args"].startswith(json.dumps([QUESTION]))
    assert json.loads(tools["Human.ask"]["result"]) == ANSWER
    (step,) = [e for e in entries if e["kind"] == "eval"]
    assert json.loads(step["value"]) == {"note": NOTE, "answer": ANSWER}
    assert json.loads(seen["output"]) == {"note": NOTE, "answer": ANSWER}

    # Every agent's system prompt, and a chat turn with a long-lived agent.
    assert set(seen["prompts"]) == {"Coder", "Counter", "Echo", "Editor", "Keeper"}
    assert "SubAgents" in seen["prompts"]["Editor"]
    assert seen["chat_reply"] == "hello from the chat box"

    for name in PAGES:
        shot = SCREENSHOTS / f"{name}.png"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot


async def test_html_from_a_model_or_a_sandbox_is_shown_as_text_and_never_runs(
    node: str, chromium: Path, dashboard: Served
) -> None:
    async def start_run() -> legion.RunResult:
        async with legion.Client(dashboard.address, token=dashboard.tokens.alice) as client:
            return await client.run("Coder", HOSTILE_TASK)

    seen, result = await browse(node, dashboard, "hostile", start_run, "--payload", PAYLOAD)
    assert result.output == PAYLOAD  # answered with the payload too, from the page

    # Pushed live (textContent): the question, and the task in the tree.
    assert seen["live_question"] == PAYLOAD
    assert PAYLOAD in seen["live_task"]
    # Rendered by the server (escaped): the trace shows the literal text.
    assert "<script>window.__pwned=1</script>" in seen["trace_text"]
    fields = seen["trace_fields"]
    assert f"{PAYLOAD}\n" in fields  # stdout
    assert json.dumps(PAYLOAD) in fields  # the value, as JSON
    assert any(
        "<script>window.__pwned=1</script>" in f and "eval_and_complete" in f for f in fields
    )

    # Nothing ran and nothing became an element, on either path.
    for where in (seen["after_live"]["humans"], seen["after_live"]["tree"], seen["after_trace"]):
        assert where == {
            "pwned": False,
            "images": 0,
            "scripts": ["/static/dashboard.js"],
            "bold": 0,
        }
