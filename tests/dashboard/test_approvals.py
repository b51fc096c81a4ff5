"""Approvals on the dashboard, in a real browser: a tool call held for
approval is pushed to the open humans page of the run's principal, shows the
call and its arguments, and runs (once, on the server's host) when approved
there."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import legion
from tests.server import test_approvals as served_approvals
from tests.server.conftest import ServerProcess, Tokens
from tests.server.test_approvals import REFUND, refunds

from .conftest import DASHBOARD_LINE, HERE, Served

# The controller-side approval tests' server (it also serves a dashboard) and ledger.
approvals_server = served_approvals.approvals_server
ledger = served_approvals.ledger

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def approvals_dashboard(approvals_server: ServerProcess, tokens: Tokens) -> Served:
    found = [m.group(1) for line in approvals_server.stdout if (m := DASHBOARD_LINE.search(line))]
    assert found, f"no dashboard line in {approvals_server.stdout}"
    return Served(approvals_server, tokens, found[0])


async def test_a_held_call_is_approved_from_the_humans_page(
    node: str, chromium: Path, approvals_dashboard: Served, ledger: Path
) -> None:
    served = approvals_dashboard
    browser = await asyncio.create_subprocess_exec(
        *(node, "approve.mjs", "--url", served.url, "--token", served.tokens.alice),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert browser.stdout is not None and browser.stderr is not None
    run: asyncio.Task[legion.RunResult] | None = None

    async def start_run() -> legion.RunResult:
        async with legion.Client(served.address, token=served.tokens.alice) as client:
            return await client.run("Cashier", REFUND)

    try:
        ready = await asyncio.wait_for(browser.stdout.readline(), 90)
        if json.loads(ready or b"{}").get("step") != "ready":
            pytest.fail(f"the browser did not get ready: {(await browser.stderr.read()).decode()}")
        assert refunds(ledger) == []
        run = asyncio.create_task(start_run())
        out, err = await asyncio.wait_for(browser.communicate(), 180)
        assert browser.returncode == 0, err.decode()
        result = await asyncio.wait_for(run, 60)
    finally:
        if browser.returncode is None:
            browser.kill()
            await browser.wait()
        if run is not None and not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    last = json.loads(out.decode().strip().splitlines()[-1])
    assert last["step"] == "done"
    shown = last["summary"]
    assert shown["call"] == "Payments.refund" and shown["agent"] == "Cashier"
    assert json.loads(shown["args"]) == {"args": ["o-17"], "kwargs": {"amount": 25}}
    assert shown["approvers"] == "the run's principal"
    assert shown["not_reloaded"] is True and shown["pending_after"] == "0"
    # Approved on the page: it ran once, with the arguments the page showed.
    assert result.output == "refunded 25 on o-17"
    assert refunds(ledger) == [["o-17", 25]]
