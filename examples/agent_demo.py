"""`make demo`: an agent that writes Python against a to-do store on the host.

The store is a SQLite database in this process. The agent's code runs in a
network-less sandbox; its calls to ``Tasks`` come back here, where the user id
is taken from the vault (the sandbox never sees it).

Without LEGION_MODEL, a scripted session is replayed through a fake
OpenAI-compatible server on loopback: the real litellm path, no key needed.
With LEGION_MODEL (and the provider's key, e.g. OPENAI_API_KEY), a real model
solves the same task:

    LEGION_MODEL=openai/gpt-4o-mini OPENAI_API_KEY=... make demo
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sqlite3
import sys

import legion
from legion.testing import FakeOpenAIServer, action

TODAY = datetime.date(2026, 11, 26)
TASK = (
    "Which of my open tasks are overdue? Mark the overdue grocery ones as done, add a task "
    "'renew passport' due in 30 days, and tell me in one sentence what you changed."
)


def make_store() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute(
        "create table tasks (id integer primary key, user text, title text, due text, "
        "done integer default 0)"
    )
    rows = [
        ("ada", "buy groceries", "2026-11-20"),
        ("ada", "call the bank", "2026-11-24"),
        ("ada", "grocery run for the party", "2026-11-25"),
        ("ada", "file taxes", "2027-01-15"),
        ("bob", "buy groceries", "2026-11-01"),
    ]
    db.executemany("insert into tasks (user, title, due) values (?, ?, ?)", rows)
    return db


STORE = make_store()


class Tasks(legion.Tool):
    """The current user's to-do list (a SQLite table on the host)."""

    def today(self) -> str:
        """Today's date, ISO format."""
        return TODAY.isoformat()

    def list_open(self) -> list[dict[str, object]]:
        """Open tasks of the current user: [{"id", "title", "due"}], by due date."""
        user = legion.vault.require("user")
        cursor = STORE.execute(
            "select id, title, due from tasks where user = ? and done = 0 order by due", (user,)
        )
        return [{"id": i, "title": t, "due": d} for i, t, d in cursor]

    def complete(self, task_id: int) -> bool:
        """Mark one of the current user's tasks done; False if it is not theirs."""
        user = legion.vault.require("user")
        cursor = STORE.execute(
            "update tasks set done = 1 where id = ? and user = ?", (task_id, user)
        )
        return cursor.rowcount == 1

    def add(self, title: str, due: str) -> int:
        """Add a task for the current user; ``due`` is an ISO date. Returns its id."""
        datetime.date.fromisoformat(due)
        user = legion.vault.require("user")
        return int(
            STORE.execute(
                "insert into tasks (user, title, due) values (?, ?, ?)", (user, title, due)
            ).lastrowid
            or 0
        )


class Assistant(legion.Agent):
    """Keeps the current user's to-do list in order: finds, completes and adds tasks."""

    tools = [Tasks]
    config = {"max_iterations": 6}


OFFLINE_SCRIPT = [
    action(
        "eval_and_continue",
        "today = Tasks.today()\n"
        "overdue = [t for t in Tasks.list_open() if t['due'] < today]\n"
        "overdue",
    ),
    action(
        "eval_and_complete",
        "import datetime\n"
        "groceries = [t for t in overdue if 'grocer' in t['title']]\n"
        "for t in groceries:\n"
        "    Tasks.complete(t['id'])\n"
        "due = (datetime.date.fromisoformat(today) + datetime.timedelta(days=30)).isoformat()\n"
        "Tasks.add('renew passport', due)\n"
        "others = [t['title'] for t in overdue if t not in groceries]\n"
        "(f\"Marked {len(groceries)} overdue grocery tasks done, added 'renew passport' due \"\n"
        " f\"{due}; still overdue: {', '.join(others) or 'nothing'}.\")",
    ),
]


async def main() -> None:
    events: list[str] = []
    legion.telemetry.subscribe(
        lambda e: events.append(e.name) if e.name.endswith(".stop") else None
    )
    real = os.environ.get("LEGION_MODEL")
    if real:
        print(f"Using the model {real} (LEGION_MODEL).\n")
        result = await legion.run(Assistant, TASK, vault={"user": "ada"})
    else:
        print(
            "No LEGION_MODEL set: replaying a scripted session through a fake OpenAI-compatible "
            "server on loopback (the real litellm path, no key). Set LEGION_MODEL and your "
            "provider's key to use a real model.\n"
        )
        with FakeOpenAIServer(OFFLINE_SCRIPT) as server:
            result = await legion.run(
                Assistant,
                TASK,
                vault={"user": "ada"},
                model="openai/fake-model",
                api_base=server.url,
                api_key="sk-offline-demo",
            )
    print(f"Task: {TASK}\n")
    for message in result.messages[2:]:
        if message["role"] == "assistant":
            print("--- the model wrote:\n" + message["content"])
        else:
            print("--- the sandbox answered:\n" + message["content"])
    print(f"\nAnswer: {result.output}")
    print(
        f"Steps: {result.iterations} continue + 1 final; model requests: {result.usage.requests}; "
        f"tokens: {result.usage.total_tokens}; "
        f"tool calls: {events.count(legion.telemetry.TOOL_CALL_STOP)}"
    )
    left = [
        t for t, d in STORE.execute("select title, done from tasks where user = 'ada'") if not d
    ]
    print(f"ada's open tasks now: {left}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except legion.LegionError as exc:
        sys.exit(f"demo failed: {type(exc).__name__}: {exc}")
