"""Files through the controller API: a run's input files and the files it
leaves in /data/out, from legion.Client and `legion run --file/--out`."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

import legion

from .conftest import Served, legion_cli, server_env

SALES = "region,amount\n" + "".join(f"{r},{i}\n" for i, r in enumerate(["n", "s"] * 50))
SUMMARISE = (
    "#code import csv, collections\n"
    "t = collections.Counter()\n"
    "for row in csv.DictReader(open('sales.csv')):\n"
    "    t[row['region']] += int(row['amount'])\n"
    "w = csv.writer(open('out/summary.csv', 'w', newline=''))\n"
    "w.writerows(sorted(t.items()))\n"
    "del w\n"
    "sum(t.values())"
)
EXPECTED = {"n": sum(range(0, 100, 2)), "s": sum(range(1, 100, 2))}


def _totals(data: bytes) -> dict[str, int]:
    return {r: int(t) for r, t in csv.reader(io.StringIO(data.decode()))}


async def test_a_remote_run_takes_files_and_returns_what_it_left(alice: legion.Client) -> None:
    result = await alice.run("Coder", SUMMARISE, files={"sales.csv": SALES.encode()})
    assert result.output == sum(EXPECTED.values())
    assert _totals(result.files["summary.csv"]) == EXPECTED
    assert result.files_note == ""


async def test_a_file_name_outside_the_work_directory_is_invalid_argument(
    alice: legion.Client,
) -> None:
    for name in ("../escape.csv", "/etc/passwd", "a\0b"):
        with pytest.raises(legion.UsageError, match="files:"):
            await alice.run("Coder", SUMMARISE, files={name: b"x"})
    # The server keeps serving.
    assert (await alice.run("Echo", "still here")).output == "still here"


async def test_a_long_lived_turn_takes_files(alice: legion.Client) -> None:
    cid = await alice.start("Keeper")
    try:
        result = await alice.call(cid, "#code open('in.txt').read()", files={"in.txt": b"hello"})
        assert result.output == "hello"
        later = await alice.call(cid, "#code open('in.txt').read() * 2")
        assert later.output == "hellohello"  # the conversation kept it
    finally:
        await alice.stop(cid)


def test_legion_run_file_and_out(served: Served, fake_model: object, tmp_path: Path) -> None:
    sales = tmp_path / "sales.csv"
    sales.write_text(SALES)
    out = tmp_path / "results"
    done = legion_cli(
        "run",
        "Coder",
        SUMMARISE,
        "--remote",
        served.address,
        "--token",
        served.tokens.alice,
        "--file",
        str(sales),
        "--out",
        str(out),
        env=server_env(fake_model),  # type: ignore[arg-type]
    )
    assert done.returncode == 0, done.stderr
    assert _totals((out / "summary.csv").read_bytes()) == EXPECTED
    assert f"wrote {out / 'summary.csv'}" in done.stderr
    missing = legion_cli(
        "run",
        "Coder",
        "#code 1",
        "--remote",
        served.address,
        "--token",
        served.tokens.alice,
        "--file",
        str(tmp_path / "nope.csv"),
        env=server_env(fake_model),  # type: ignore[arg-type]
    )
    assert missing.returncode == 1 and "cannot read" in missing.stderr
