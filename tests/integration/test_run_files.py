"""Files given to a run, and files a run gives back (scripted model, real
sandbox): named to the model, read by the code, returned from /data/out,
bounded; a conversation keeps its files across turns and reclaims."""

from __future__ import annotations

import csv
import io

import pytest

import legion
from legion._run_files import MAX_OUT_FILES
from legion.testing import ScriptedModel, action

pytestmark = pytest.mark.docker

SALES = "region,amount\n" + "".join(f"{r},{i}\n" for i, r in enumerate(["n", "s", "e"] * 4))

SUMMARISE = """
import csv, collections
totals = collections.Counter()
with open('sales.csv') as f:
    for row in csv.DictReader(f):
        totals[row['region']] += int(row['amount'])
with open('out/summary.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['region', 'total'])
    w.writerows(sorted(totals.items()))
len(totals)
"""


class Analyst(legion.Agent):
    """Analyses data files."""


async def test_files_in_files_out(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [action("eval_and_continue", code=SUMMARISE), action("return", result="summarised")]
    )
    result = await legion.run(
        Analyst, "sum by region", model=model, runtime=runtime, files={"sales.csv": SALES}
    )
    assert result.output == "summarised"
    task = model.requests[0][-1]["content"]
    assert f"sales.csv ({len(SALES):,} bytes)" in task and "/data/out/" in task
    rows = list(csv.reader(io.StringIO(result.files["summary.csv"].decode())))
    expected = {"n": 0 + 3 + 6 + 9, "s": 1 + 4 + 7 + 10, "e": 2 + 5 + 8 + 11}
    assert rows[0] == ["region", "total"]
    assert {r: int(t) for r, t in rows[1:]} == expected
    assert result.files_note == ""


async def test_what_a_run_returns_is_bounded_with_a_notice(
    runtime: legion.SandboxRuntime,
) -> None:
    code = (
        f"for i in range({MAX_OUT_FILES + 3}):\n"
        "    open(f'out/f{i:03}.txt', 'w').write(str(i))\n"
        "import os\nos.symlink('/proc/self/environ', 'out/link')"
    )
    model = ScriptedModel([action("eval_and_continue", code=code), action("return", result="ok")])
    result = await legion.run(Analyst, "write many", model=model, runtime=runtime)
    assert len(result.files) == MAX_OUT_FILES
    assert "link" not in result.files  # a link is never followed
    assert "3 file(s) of /data/out not returned" in result.files_note
    assert result.files["f000.txt"] == b"0"


async def test_bad_input_file_names_are_refused_up_front(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel([action("return", result="never")])
    with pytest.raises(legion.UsageError, match=r"'\.\.' may not appear"):
        await legion.run(Analyst, "x", model=model, runtime=runtime, files={"../x": b"1"})
    assert model.requests == []


class Keeper(legion.Agent):
    """Keeps notes."""

    config = {"binding_scope": "conversation"}


async def test_a_conversation_keeps_its_files_across_a_reclaim(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(
        [
            action("eval_and_continue", code="open('notes.txt', 'w').write('first')"),
            action("return", result="noted"),
            action(
                "eval_and_complete", code="open('notes.txt').read() + ' ' + open('in.txt').read()"
            ),
        ]
    )
    async with await legion.start(Keeper, model=model, runtime=runtime) as handle:
        assert (await handle.call("note")).output == "noted"
        first = handle.container_id
        await handle.reclaim()
        assert handle.container_id is None
        result = await handle.call("read", files={"in.txt": "second"})
        assert result.output == "first second"
        assert handle.container_id not in (None, first)
