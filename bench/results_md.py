"""The bench's figures as Markdown: ``bench/RESULTS.md`` and the README's
"Performance" section, both made from one results JSON.

A full ``make bench`` run writes its JSON to ``bench/results/`` twice: once
under its timestamp (not committed) and once as ``latest-<machine>.json``
(committed: the latest run per machine kind), then renders that file into
RESULTS.md and the README section between the ``bench:performance`` markers.
``tests/unit/test_bench_results.py`` renders the committed JSON again and
checks that both files say exactly that.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
README = ROOT / "README.md"
MACHINE_ENV = "LEGION_BENCH_MACHINE"
BEGIN = "<!-- bench:performance:begin (make bench writes this section) -->"
END = "<!-- bench:performance:end -->"
PEER_GOAL = 100.0
"""Our warm exec at least this many times faster than each peer's fastest mode."""

Getter = Callable[[dict[str, Any]], float | None]


def machine_kind(cpus: int | None = None) -> str:
    """The name the latest run is kept under: ``LEGION_BENCH_MACHINE``, else
    the OS, architecture and CPU count (``linux-x86_64-2cpu``)."""
    named = os.environ.get(MACHINE_ENV)
    if named:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", named):
            raise ValueError(f"{MACHINE_ENV} may hold letters, digits, '.', '_' and '-' only")
        return named
    cpus = cpus or os.cpu_count() or 0
    return f"{platform.system().lower()}-{platform.machine()}-{cpus}cpu"


def latest_path(kind: str) -> Path:
    return RESULTS_DIR / f"latest-{kind}.json"


def _dig(*keys: str) -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        value: Any = results
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


def _default_channel(*keys: str) -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        designs = results["measures"].get("channel_designs", {})
        kind = results.get("channel_default") or next(iter(designs), None)
        return _dig("measures", "channel_designs", str(kind), *keys)(results)

    return get


def _peer_factor(group: str) -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        return _dig("goal", group, "times_our_warm_exec")(results)

    return get


# (what, how to read it, goal, unit, True when lower is better)
GOALS: list[tuple[str, Getter, float, str, bool]] = [
    ("warm exec `1 + 1`", _dig("measures", "warm_exec_expression", "p50_ms"), 0.55, "ms", True),
    ("warm exec `print(1 + 1)`", _dig("measures", "warm_exec", "p50_ms"), 0.6, "ms", True),
    (
        "tool call (exec with a call less exec)",
        _dig("measures", "exec_with_tool_call", "call_only_p50_ms"),
        0.45,
        "ms",
        True,
    ),
    (
        "controller CPU per tool call (10,000 calls, process CPU time)",
        _default_channel("tool_calls_sequential", "cpu_ms_per_call"),
        0.3,
        "ms",
        True,
    ),
    (
        "10,000 sequential tool calls from one step",
        _dig("measures", "tool_calls_10k_sequential", "p50_ms"),
        5000.0,
        "ms",
        True,
    ),
    (
        "`.map` over 100 calls of a 10 ms host tool (16 at once)",
        _dig("measures", "tool_map_100x10ms", "p50_ms"),
        150.0,
        "ms",
        True,
    ),
    (
        "cold start to first result",
        _dig("measures", "cold_start_to_first_result", "p50_ms"),
        150.0,
        "ms",
        True,
    ),
    (
        "single-use sandboxes per second",
        _dig("measures", "rates", "single-use sandboxes per second"),
        12.0,
        "/s",
        False,
    ),
    (
        "exec with 64 sandboxes running at once",
        _dig("measures", "exec_with_64_sandboxes_running", "p50_ms"),
        15.0,
        "ms",
        True,
    ),
    (
        "gVisor cold start to first result",
        _dig("measures", "runsc_cold_start_to_first_result", "p50_ms"),
        500.0,
        "ms",
        True,
    ),
    ("vs smolagents' fastest mode", _peer_factor("smolagents"), PEER_GOAL, "x", False),
]


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the figure this run measured (None: not measured)."""
    rows = []
    for what, get, goal, unit, lower in GOALS:
        value = get(results)
        met = None if value is None else (value <= goal if lower else value >= goal)
        rows.append(
            {"what": what, "value": value, "goal": goal, "unit": unit, "met": met, "lower": lower}
        )
    return rows


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "x":
        return f"{value:,.0f}x"
    if unit == "/s":
        return f"{value:.1f} /s"
    return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"


def _goal_table(results: dict[str, Any]) -> list[str]:
    lines = ["| measure (p50) | this run | goal | met |", "|---|---:|---:|:---:|"]
    for row in goals(results):
        sign = "≤" if row["lower"] else "≥"
        verdict = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {row['what']} | {_num(row['value'], row['unit'])} | "
            f"{sign} {_num(row['goal'], row['unit'])} | {verdict} |"
        )
    return lines


def _measure_rows(measures: dict[str, Any], names: list[str]) -> list[str]:
    lines = ["| measure | n | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name in names:
        value = measures.get(name)
        if isinstance(value, dict) and "p50_ms" in value and "n" in value:
            lines.append(
                f"| {name} | {value['n']} | {value['p50_ms']:.2f} | {value['p99_ms']:.2f} |"
            )
    return lines


def _machine(results: dict[str, Any]) -> str:
    m = results["machine"]
    busy = m.get("cpu_busy_before")
    busy_text = "" if busy is None else f", {busy:.0%} of the CPUs busy just before"
    return (
        f"`{results.get('machine_kind', '?')}`: {m.get('cpus')} CPUs, Python {m.get('python')}, "
        f"Docker {m.get('docker')}{busy_text}; run of {results['when']}"
    )


def performance_section(results: dict[str, Any], json_name: str) -> str:
    """The README's Performance section (without its markers)."""
    lines = [
        f"Measured by `make bench` on {_machine(results)}. Ours and the peers in one run, on one "
        "machine; p50 unless named. Every figure, with p90 and p99, is in "
        f"[bench/RESULTS.md](bench/RESULTS.md) and the raw JSON in "
        f"[bench/results/{json_name}](bench/results/{json_name}).",
        "",
        *_goal_table(results),
    ]
    failures = results.get("failures") or {}
    if failures:
        lines += ["", f"Measures that failed in this run: {', '.join(sorted(failures))}."]
    return "\n".join(lines)


def _channel_table(results: dict[str, Any]) -> list[str]:
    designs = results["measures"].get("channel_designs") or {}
    if not designs:
        return []
    lines = [
        "",
        "## The sandbox channel's designs, same run",
        "",
        f"The default is `{results.get('channel_default', '?')}` (`LEGION_CHANNEL` picks one).",
        "",
        "| design | `1 + 1` p50 / p99 ms | `print(1 + 1)` p50 / p99 ms | call alone p50 ms "
        "| CPU ms per call | 10,000 calls s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, found in designs.items():

        def pair(name: str, found: dict[str, Any] = found) -> str:
            v = found.get(name)
            return f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f}" if v else "-"

        seq = found.get("tool_calls_sequential") or {}
        call = found.get("tool_call_only_p50_ms")
        lines.append(
            f"| {kind} | {pair('exec_expression')} | {pair('exec_print')} | "
            f"{'-' if call is None else f'{call:.3f}'} | {seq.get('cpu_ms_per_call', '-')} | "
            f"{seq.get('wall_s', '-')} |"
        )
    return lines


def results_markdown(results: dict[str, Any], json_name: str) -> str:
    """The whole of bench/RESULTS.md."""
    measures = results["measures"]
    ours = [k for k, v in measures.items() if isinstance(v, dict) and "n" in v]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`) from "
        f"[results/{json_name}](results/{json_name}); do not edit by hand.",
        "",
        f"Machine: {_machine(results)}.",
        "",
        "## Goals",
        "",
        *_goal_table(results),
        *_channel_table(results),
        "",
        "## Ours",
        "",
        *_measure_rows(measures, ours),
    ]
    rates = measures.get("rates") or {}
    if rates:
        lines += ["", *[f"- {name}: {value:.2f}" for name, value in rates.items()]]
    peers = results.get("peers") or {}
    if peers.get("measures"):
        lines += [
            "",
            "## Peers, same run",
            "",
            *_measure_rows(peers["measures"], list(peers["measures"])),
        ]
        versions = ", ".join(f"{k} {v}" for k, v in (peers.get("versions") or {}).items())
        if versions:
            lines += ["", f"Peer versions: {versions}."]
    if results.get("goal"):
        lines += ["", "Each peer's fastest mode over our warm exec (p50):", ""]
        for group, check in results["goal"].items():
            lines.append(
                f"- {group}: {check['fastest_mode']}, {check['times_our_warm_exec']:,.0f}x"
            )
    failures = results.get("failures") or {}
    if failures:
        lines += ["", "## Failed measures", ""]
        lines += [f"- {name}: {e['type']}: {e['message']}" for name, e in failures.items()]
    return "\n".join(lines) + "\n"


def replace_section(readme: str, section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section}\n{END}{tail}"


def readme_section(readme: str) -> str:
    """What the README holds between the markers now."""
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def publish(results: dict[str, Any]) -> list[Path]:
    """Keep ``results`` as the latest run of this machine kind and render it
    into RESULTS.md and the README; the paths written."""
    kind = results.setdefault("machine_kind", machine_kind(results["machine"].get("cpus")))
    path = latest_path(kind)
    path.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS_MD.write_text(results_markdown(results, path.name))
    README.write_text(replace_section(README.read_text(), performance_section(results, path.name)))
    return [path, RESULTS_MD, README]
