"""The dashboard's live model, fed events as the Events stream delivers them:
the tree with sub-agents nested, live figures, a trace that pairs each call
with its outcome, human requests that come and go, and bounds on what it keeps.
No server here: the events are made by hand, as the controller would send them."""

from __future__ import annotations

import itertools

from legion.client import RemoteEvent, SandboxInfo
from legion.dashboard import state as live
from legion.dashboard.state import LiveState, Patch

_clock = itertools.count(1_000_000)


def event(name: str, run: str, parent: str = "", **data: object) -> RemoteEvent:
    return RemoteEvent(name, run, parent or None, float(next(_clock)), data)


def items(patches: list[Patch], list_name: str) -> dict[str, live.Item]:
    return {i.key: i for p in patches if p.list_name == list_name for i in p.items}


def feed(state: LiveState, *events: RemoteEvent) -> list[Patch]:
    return [patch for e in events for patch in state.apply(e)]


def test_a_run_and_its_sub_agent_make_a_tree_with_live_figures() -> None:
    state = LiveState("alice")
    patches = feed(
        state,
        event("run.start", "p", agent="Editor", task="write a brief"),
        event("llm.request.start", "p", model="m", prompt="write a brief"),
        event("llm.request.stop", "p", reply="{...}", usage={"total_tokens": 30}, duration=0.2),
        event("run.start", "c", "p", agent="Echo", task="notes"),
    )
    row = items(patches, "runs")["c"]
    assert row.parent == "p" and row.fields["agent"] == "Echo" and row.status == "running"
    assert items(patches, "runs")["p"].fields["tokens"] == "30"
    (top,) = state.tree()
    assert top[0].run_id == "p" and [child.run_id for child, _ in top[1]] == ["c"]
    # The parent's trace links to the sub-agent, whose state follows it.
    done = feed(state, event("run.stop", "c", "p", iterations=0, usage={}, output="notes"))
    (sub,) = [i for i in state.runs["p"].trace.values() if i.template == "sub"]
    assert sub.links["trace"] == "/runs/c" and sub.status == "finished"
    assert items(done, "trace")[sub.key].fields["state"] == "finished"
    failed = feed(state, event("run.exception", "p", error="ModelError: refused"))
    assert items(failed, "runs")["p"].status == "failed"
    assert items(failed, "summary")["p"].fields["error"] == "ModelError: refused"


def test_unchanged_rows_are_not_sent_again() -> None:
    state = LiveState("alice")
    first = feed(state, event("run.start", "r", agent="Echo", task="hi"))
    assert items(first, "runs")
    again = feed(state, event("iteration.start", "r", index=1, complete=False))
    assert not items(again, "runs") and not items(again, "summary")


def test_the_trace_pairs_each_call_with_its_outcome() -> None:
    state = LiveState("alice")
    feed(
        state,
        event("run.start", "r", agent="Coder", task="t"),
        event("sandbox.eval.start", "r", code="A.f(1)\nA.f(2)"),
        event("tool.call.start", "r", tool="A", function="f", call_id="1", args="[1]", kwargs="{}"),
        event("tool.call.start", "r", tool="A", function="f", call_id="2", args="[2]", kwargs="{}"),
    )
    # The second call finishes first: matched by call id, not by order.
    feed(state, event("tool.call.stop", "r", tool="A", function="f", call_id="2", result="4"))
    feed(state, event("tool.call.stop", "r", tool="A", function="f", call_id="1", error="E: x"))
    tools = [i for i in state.runs["r"].trace.values() if i.template == "tool"]
    assert [(t.fields["args"], t.fields["result"], t.fields["error"]) for t in tools] == [
        ("[1]", "", "E: x"),
        ("[2]", "4", ""),
    ]
    feed(
        state,
        event("sandbox.eval.stop", "r", success=True, stdout="out\n", value="5", duration=1.5),
    )
    (step,) = [i for i in state.runs["r"].trace.values() if i.template == "eval"]
    assert step.fields["stdout"] == "out\n" and step.fields["value"] == "5"
    assert step.fields["took"] == "1.5 s" and step.status == "ok"


def test_a_step_shows_its_output_as_it_comes() -> None:
    state = LiveState("alice")
    feed(
        state,
        event("run.start", "r", agent="Coder", task="t"),
        event("sandbox.eval.start", "r", code="print('a')"),
    )
    (step,) = [i for i in state.runs["r"].trace.values() if i.template == "eval"]
    first = feed(state, event("sandbox.output", "r", stream="stdout", text="loading\n"))
    assert items(first, "trace")[step.key].fields["stdout"] == "loading\n"
    feed(
        state,
        event("sandbox.output", "r", stream="stderr", text="slow\n"),
        event("sandbox.output", "r", stream="stdout", text="done\n"),
    )
    assert (step.fields["stdout"], step.fields["stderr"]) == ("loading\ndone\n", "slow\n")
    assert step.status == "running"
    # Bounded like every text: past the limit, the rest waits for the step's end.
    feed(state, event("sandbox.output", "r", stream="stdout", text="x" * live.TEXT))
    assert len(feed(state, event("sandbox.output", "r", stream="stdout", text="more"))) == 0
    assert "more characters cut" in step.fields["stdout"]
    feed(state, event("sandbox.eval.stop", "r", success=True, stdout="all of it\n", stderr=""))
    assert (step.fields["stdout"], step.fields["stderr"]) == ("all of it\n", "")


def test_human_requests_wait_until_answered_or_their_run_ends() -> None:
    state = LiveState("alice")
    asked = feed(
        state,
        event("run.start", "r", agent="Coder", task="t"),
        event("human.request", "r", ref="q1", agent="Coder", question="Ship?", meta={"o": 1}),
        event("human.request", "r", ref="q2", agent="Coder", question="Really?"),
    )
    assert set(items(asked, "humans")) == {"q1", "q2"}
    assert items(asked, "nav")["humans"].fields["count"] == "2"
    answered = feed(state, event("human.response", "r", ref="q1"))
    assert any(p.list_name == "humans" and p.remove == ["q1"] for p in answered)
    ended = feed(state, event("run.stop", "r", iterations=0, usage={}))
    assert any(p.list_name == "humans" and p.remove == ["q2"] for p in ended)
    assert not state.humans and items(ended, "nav")["humans"].fields["count"] == "0"


def test_a_run_already_going_when_the_session_began_is_shown() -> None:
    state = LiveState("alice")
    patches = feed(state, event("human.request", "old", ref="q", question="Still there?"))
    assert items(patches, "runs")["old"].status == "running"
    assert state.humans["q"].question == "Still there?"


def test_what_is_kept_is_bounded() -> None:
    state = LiveState("alice")
    for n in range(live.MAX_RUNS + 20):
        feed(
            state,
            event("run.start", f"r{n}", agent="Echo", task="x" * 10_000),
            event("run.stop", f"r{n}", iterations=0, usage={}),
        )
    assert len(state.runs) == live.MAX_RUNS and "r0" not in state.runs
    assert len(state.runs["r50"].task) < live.TEXT + 100  # cut, with a marker
    run = state.runs["r50"]
    for _ in range(live.MAX_TRACE + 5):
        feed(state, event("llm.request.start", "r50", prompt="p"))
    assert len(run.trace) == live.MAX_TRACE and run.dropped == 5


def test_sandbox_readings_give_cpu_now_and_a_peak() -> None:
    state = LiveState("alice")
    first = SandboxInfo("c1", "r", "Coder", 3.0, 10 * 2**20, 256 * 2**20, 1.0, 128, 1.0, 0)
    state.set_sandboxes([first], now=100.0)
    second = SandboxInfo("c1", "r", "Coder", 5.0, 8 * 2**20, 256 * 2**20, 1.0, 128, 1.5, 0)
    (patch, _) = state.set_sandboxes([second], now=102.0)
    (row,) = patch.items
    assert row.fields["cpu_now"] == "25%"  # 0.5 s of CPU in 2 s
    assert row.fields["peak"] == "10.0 MiB"  # no peak from the engine: the most seen
    assert row.fields["memory_limit"] == "256.0 MiB" and row.fields["pids"] == "128"


def test_a_step_shows_its_figures_inline_and_only_pngs() -> None:
    import base64

    from legion.dashboard import templates

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
    state = LiveState("alice")
    patches = feed(
        state,
        event("run.start", "r", agent="Plotter", task="plot"),
        event("sandbox.eval.start", "r", code="plt.show()"),
        event(
            "sandbox.eval.stop",
            "r",
            success=True,
            artifacts=[
                {"mime_type": "image/png", "data_base64": png, "description": "figure 1"},
                {"mime_type": "image/png", "data_base64": "PHNjcmlwdD4="},  # not a PNG
                {"mime_type": "image/svg+xml", "data_base64": png},
                {"mime_type": "image/png", "data_base64": png + '"><script>'},
            ],
        ),
    )
    (step,) = [i for i in items(patches, "trace").values() if i.template == "eval"]
    assert step.images == {"figures": ["data:image/png;base64," + png]}
    assert step.to_json()["images"] == step.images
    html = str(
        templates.render_item(step.template, step.key, fields=step.fields, images=step.images)
    )
    assert f'<img src="data:image/png;base64,{png}"' in html and "<script>" not in html


def test_the_agents_page_shows_each_agents_image_and_packages() -> None:
    from legion.client import AgentInfo
    from legion.dashboard import pages

    page = str(
        pages.agents(
            [
                AgentInfo("Analyst", "Data.", [], None, "prompt", "data", ["pandas 2.3.3"]),
                AgentInfo("Echo", "Says.", [], None, "prompt"),
            ]
        )
    )
    assert "Image: <code>data</code> · packages: <code>pandas 2.3.3</code>" in page
    assert "packages: <code>the standard library only</code>" in page
