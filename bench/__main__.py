"""`make bench`: our sandbox against the sandboxes users would pick instead.

Measured in one run on this machine, all with the same snippet
(`print(1 + 1)`, which must print 2):

- ours: a warm exec in an open `legion.Sandbox`, exec with tool calls, a pool
  acquire, a cold start to the first result, idle memory, the delay from a
  print to its line on the host (bench/live_output.py), an MCP tool call
  from sandbox code against the same server called from the host
  (bench/mcp_calls.py); 100 overlapping tool calls with ``.map`` and 10,000
  sequential ones from one step (bench/fanout.py); the data
  environment's cold start and first run with and without preload
  (bench/environments.py);
- `docker run --rm --network none <image> python3 -c ...`, the floor of a
  container per execution;
- the peers (bench/peers.py): llm-sandbox, AutoGen's
  DockerCommandLineCodeExecutor and smolagents' DockerExecutor, each with a
  session per execution (default stop and SIGKILL stop) and many executions in
  one session. They run in their own virtualenv, bench/.venv-peers, from
  images built offline from our base image (bench/peer_setup.py builds both
  when missing or outdated; the first time takes a few minutes).

Prints a table (n, p50/p90/p99, and each p50 over our warm exec's p50), the
goal check (our warm exec at least 100x faster than every peer's fastest
mode), the peers' versions and why any peer could not run; writes all of it
to bench/results/<timestamp>.json.

Each measure runs on its own: one that fails (an error, or a check that saw
something other than it must) is recorded with its error's type and message
under "failures" in the JSON and at the end of the table, and the others
still run. The process then exits 1, naming the failed measures and why (a
peer that could not run counts as one). LEGION_BENCH_FAIL=name,... makes the
named measures (shell patterns allowed) fail on purpose, for the tests.

`--smoke` (the test suite's mode) runs a few iterations of our measures and
the docker run baseline only, in well under a minute; add `--peers` to also
run one or a few iterations of each peer (without the 10 s default-stop
modes; it builds the peers' venv and images first if needed, which makes the
first such run slower). `--no-peers` skips the peers in a full run.

    python -m bench [--smoke] [--peers | --no-peers] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import docker

import legion
from legion.sandbox.channel import CHANNEL_ENV, DEFAULT_CHANNEL

from . import (
    channel,
    environments,
    fanout,
    files,
    live_output,
    mcp_calls,
    peer_setup,
    remote,
    results_md,
    scaling,
)
from .common import (
    EXPECTED_STDOUT,
    SNIPPET,
    CheckFailed,
    Measures,
    check,
    remove_peer_containers,
    summary,
    timed,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
GOAL_FACTOR = results_md.PEER_GOAL
PEER_TIMEOUT_S = 1200
BUSY_SHARE = 0.25  # CPU share busy just before we measure, above which the table warns

# Which peer each measure belongs to, for the goal check (its fastest mode).
PEER_GROUPS = {
    "docker_run_rm_baseline": "docker run --rm",
    "llm-sandbox": "llm-sandbox",
    "autogen": "AutoGen",
    "smolagents": "smolagents",
}


NOTES = """\
modes: "per run" is a new session/executor for each execution, with its set-up,
execute and tear-down phases on the rows below it; "in session" is many executions
in one open session. "default stop" is what users get: those containers' PID 1
ignores SIGTERM, so stopping one waits Docker's full 10 s grace.
networks: ours, docker run and llm-sandbox run with none; AutoGen on the default
bridge (its executor takes no network option); smolagents on the bridge (the host
reaches its Jupyter gateway through a port published on loopback)."""


def cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over the next `seconds` (Linux), before we measure.

    The load average would count our own set-up (pip, docker build) too.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def echo(payload: str) -> int:
    """The host tool the tool-call benchmarks call."""
    return len(payload)


def check_snippet(result: Any, where: str) -> None:
    """The snippet printed what it must (``result``: an ExecResult)."""
    check(
        result.stdout.strip(), EXPECTED_STDOUT, f"{SNIPPET!r} {where} printed", error=result.error
    )


async def bench_warm(runtime: legion.SandboxRuntime, n: int, log: Measures) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with legion.Sandbox(runtime=runtime, tools=[echo]) as sandbox:

        async def snippet() -> None:
            check_snippet(await sandbox.run(SNIPPET), "in a warm sandbox")

        async def run_value(code: str, expected: object) -> None:
            result = await sandbox.run(code)
            check(result.value, expected, f"value of {code!r}", error=result.error)

        async def measure(name: str, count: int, code: str, expected: object) -> None:
            value = await log.run(name, lambda: timed(count, lambda: run_value(code, expected)))
            if value is not None:
                results[name] = value

        # The snippet every peer runs too: the basis of every ratio.
        if (warm := await log.run("warm_exec", lambda: timed(n, snippet))) is not None:
            results["warm_exec"] = warm
        await measure("warm_exec_expression", n, "1 + 1", 2)
        await measure("exec_with_tool_call", n, "echo('x')", 1)
        if "exec_with_tool_call" in results and "warm_exec_expression" in results:
            # The tool call alone: a run with a call, less a run of a bare expression.
            results["exec_with_tool_call"]["call_only_p50_ms"] = (
                results["exec_with_tool_call"]["p50_ms"] - results["warm_exec_expression"]["p50_ms"]
            )
        await run_value("big = 'x' * (1024 * 1024)\nlen(big)", 1024 * 1024)
        await measure("exec_with_tool_call_1mib", max(3, n // 10), "echo(big)", 1024 * 1024)
        memory = log.run_sync(
            "idle_memory_mib", lambda: _container_memory_mib(sandbox.container_id)
        )
        if memory is not None:
            results["idle_memory_mib"] = memory
    return results


def _summary(samples: list[float]) -> dict[str, Any]:
    return dict(summary(samples))


def _container_memory_mib(container_id: str | None) -> float:
    if container_id is None:
        raise CheckFailed("the warm sandbox has no container to read the memory of")
    stats = docker.from_env().api.stats(container_id, stream=False)
    usage = stats.get("memory_stats", {})
    used = usage.get("usage", 0) - usage.get("stats", {}).get("total_inactive_file", 0)
    return round(float(used) / (1024 * 1024), 1)


async def bench_pool_acquire(n: int) -> dict[str, Any]:
    samples = []
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        for _ in range(n):
            await runtime.warm()  # measure a pop, not a start
            start = time.perf_counter()
            lease = await runtime.acquire()
            samples.append(time.perf_counter() - start)
            await runtime.release(lease)
    return _summary(samples)


async def bench_cold(n: int) -> dict[str, Any]:
    samples = []
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        for _ in range(n):
            start = time.perf_counter()
            async with legion.Sandbox(runtime=runtime) as sandbox:
                check_snippet(await sandbox.run(SNIPPET), "in a cold sandbox")
                samples.append(time.perf_counter() - start)
    return _summary(samples)


def bench_docker_run(n: int, image: str | None) -> dict[str, Any]:
    if image is None:
        raise CheckFailed("no sandbox image to run: the shared runtime did not start")
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        run = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", image, "python3", "-c", SNIPPET],
            check=False,
            capture_output=True,
            text=True,
        )
        samples.append(time.perf_counter() - start)
        check(run.returncode, 0, "exit status of docker run", error=run.stderr.strip()[-500:])
        check(run.stdout.strip(), EXPECTED_STDOUT, f"{SNIPPET!r} in docker run printed")
    return _summary(samples)


async def bench_ours(smoke: bool, log: Measures) -> tuple[dict[str, Any], str | None]:
    n = 5 if smoke else 200
    measures: dict[str, Any] = {}
    rates: dict[str, float] = {}
    image: str | None = None

    async def with_shared_runtime() -> None:
        nonlocal image
        async with legion.SandboxRuntime(pool_size=1) as runtime:
            image = runtime.image
            warm = await log.run("warm sandbox", lambda: bench_warm(runtime, n, log))
            measures.update(warm or {})
            measures.update(await live_output.measure(runtime, smoke, log))
            measures.update(await mcp_calls.measure(runtime, smoke, log))
            measures.update(await fanout.measure(runtime, smoke, log))
            rates.update(await files.measure(runtime, smoke, log))
            scaled, found = await scaling.measure(runtime, smoke, log)
            rates.update(found)
            say("the controller API, long-lived turns and snapshots...")
            measures.update(await remote.measure(runtime, smoke, log))
            measures.update(scaled)

    async def put(name: str, measure: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        if (value := await log.run(name, measure)) is not None:
            measures[name] = value

    async def docker_run() -> dict[str, Any]:
        return bench_docker_run(2 if smoke else 20, image)

    await log.run("shared runtime", with_shared_runtime)
    measures.update(await channel.measure(smoke, log))
    measures["rates"] = rates
    await put("pool_acquire", lambda: bench_pool_acquire(3 if smoke else 30))
    await put("cold_start_to_first_result", lambda: bench_cold(2 if smoke else 15))
    say("the data environment: cold start, first run with and without preload...")
    found, extra = await environments.measure(smoke, log)
    measures.update(found)
    rates.update(extra)
    await put("docker_run_rm_baseline", docker_run)
    await put("import_legion_client", lambda: bench_client_import(3 if smoke else 10))
    return measures, image


async def bench_client_import(n: int) -> dict[str, Any]:
    """Seconds for a fresh interpreter to `import legion.client` (what a
    program that only talks to a controller pays), less a bare interpreter's
    start, and whether that import loaded docker-py or litellm (it must not)."""
    probe = (
        "import sys, time; t = time.perf_counter(); import legion.client; "
        "print(time.perf_counter() - t, 'docker' in sys.modules, 'litellm' in sys.modules)"
    )
    samples = []
    for _ in range(n):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", probe], capture_output=True, text=True
        )
        check(done.returncode, 0, "the import probe's exit status", error=done.stderr[-500:])
        seconds, docker_loaded, litellm_loaded = done.stdout.split()
        check((docker_loaded, litellm_loaded), ("False", "False"), "docker, litellm imported")
        samples.append(float(seconds))
    return _summary(samples)


# --- the peers ----------------------------------------------------------------


def prepare_peers() -> tuple[Path | None, dict[str, Any], dict[str, str]]:
    """The peers' python, their images, and the peers that cannot run (with why)."""
    blocked: dict[str, str] = {}
    python: Path | None = None
    try:
        python = peer_setup.ensure_peers_venv()
    except Exception as exc:
        reason = f"installing bench/peers-requirements.txt failed: {exc}"
        blocked = dict.fromkeys(("llm-sandbox", "autogen", "smolagents"), reason)
    images = peer_setup.ensure_images()
    for kind, peers in (("py", ("llm-sandbox", "autogen")), ("jupyter", ("smolagents",))):
        if kind in images["errors"]:
            for peer in peers:
                reason = f"its image could not be built offline: {images['errors'][kind]}"
                blocked.setdefault(peer, reason)
    return python, images, blocked


def run_peers(
    python: Path, images: dict[str, Any], smoke: bool, peers: list[str]
) -> dict[str, Any]:
    tags = [images[k] for k in ("py", "py_sigkill", "jupyter") if k in images]
    with tempfile.TemporaryDirectory(prefix="legion-bench-peers-") as tmp:
        out = Path(tmp) / "peers.json"
        cmd = [str(python), "-m", "bench.peers", "--images", json.dumps(images), "--out", str(out)]
        cmd += [f"--only={peer}" for peer in peers]
        if smoke:
            cmd.append("--smoke")
        # The peers' own output (some print) goes to stderr, beside the progress.
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr)
        try:
            code = child.wait(timeout=PEER_TIMEOUT_S)
        except BaseException:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
        finally:
            left = remove_peer_containers(tags)
            if left:
                say(f"removed peer containers left behind: {', '.join(left)}")
        if code != 0 or not out.exists():
            raise RuntimeError(f"bench.peers exited with status {code} (see its output above)")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def bench_peers(
    smoke: bool, python: Path | None, images: dict[str, Any], blocked: dict[str, str]
) -> dict[str, Any]:
    wanted = [p for p in ("llm-sandbox", "autogen", "smolagents") if p not in blocked]
    results: dict[str, Any] = {"measures": {}, "versions": {}, "unavailable": {}}
    if python is not None and wanted:
        say(f"measuring the peers: {', '.join(wanted)}...")
        try:
            results = run_peers(python, images, smoke, wanted)
        except Exception as exc:
            blocked = {**blocked, **dict.fromkeys(wanted, str(exc))}
    results["unavailable"] = {**blocked, **results.get("unavailable", {})}
    results["images"] = {
        k: images[k] for k in ("base", "py", "py_sigkill", "jupyter") if k in images
    }
    results["image_versions"] = images.get("versions", {})
    return results


# --- report -------------------------------------------------------------------


def _group(name: str) -> str | None:
    for prefix, group in PEER_GROUPS.items():
        if name.startswith(prefix):
            return group
    return None


def goal_check(measures: dict[str, Any], peer_measures: dict[str, Any]) -> dict[str, Any]:
    """Each peer's fastest mode (p50) over our warm exec (p50), against the goal
    (empty without a warm exec: its failure is reported instead)."""
    if "warm_exec" not in measures:
        return {}
    warm = measures["warm_exec"]["p50_ms"]
    fastest: dict[str, tuple[str, float]] = {}
    candidates = dict(peer_measures)
    if "docker_run_rm_baseline" in measures:
        candidates["docker_run_rm_baseline"] = measures["docker_run_rm_baseline"]
    for name, value in candidates.items():
        group = _group(name)
        if group and (group not in fastest or value["p50_ms"] < fastest[group][1]):
            fastest[group] = (name, value["p50_ms"])
    return {
        group: {
            "fastest_mode": name,
            "p50_ms": p50,
            "times_our_warm_exec": p50 / warm,
            "goal": GOAL_FACTOR,
            "met": p50 / warm >= GOAL_FACTOR,
        }
        for group, (name, p50) in fastest.items()
    }


def _row(name: str, value: dict[str, Any], warm: float | None) -> tuple[str, ...]:
    return (
        name,
        str(value["n"]),
        f"{value['p50_ms']:.2f}",
        f"{value['p90_ms']:.2f}",
        f"{value['p99_ms']:.2f}",
        _ratio(value["p50_ms"] / warm) if warm else "-",
    )


def _ratio(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _table(results: dict[str, Any]) -> str:
    measures = results["measures"]
    warm = measures["warm_exec"]["p50_ms"] if "warm_exec" in measures else None
    rows: list[tuple[str, ...]] = [("measure", "n", "p50 ms", "p90 ms", "p99 ms", "p50/warm")]
    rows += [_row(k, v, warm) for k, v in measures.items() if isinstance(v, dict) and "n" in v]
    peers = results.get("peers", {})
    for name, value in peers.get("measures", {}).items():
        rows.append(_row(name, value, warm))
        for phase, sub in value.get("phases", {}).items():
            rows.append(_row(f"  {phase}", sub, warm))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"same snippet everywhere: {SNIPPET!r} (prints {EXPECTED_STDOUT})")
    if "idle_memory_mib" in measures:
        lines.append(f"idle sandbox memory: {measures['idle_memory_mib']} MiB")
    for name, rate in measures.get("rates", {}).items():
        lines.append(f"{name}: {rate:.2f}")
    for name, ratio in results["ratios"].items():
        lines.append(f"{name}: {ratio:.0f}x")
    if "goal" in results:
        lines.append("")
        lines.append(f"goal: our warm exec at least {GOAL_FACTOR:.0f}x faster than each peer's")
        lines.append("fastest mode (p50):")
        for group, check in results["goal"].items():
            verdict = "met" if check["met"] else "NOT met"
            lines.append(
                f"  {group}: {check['fastest_mode']} {check['p50_ms']:.1f} ms = "
                f"{check['times_our_warm_exec']:.0f}x ours: {verdict}"
            )
    if peers:
        lines.append("")
        lines.append(NOTES)
        lines.append("")
        versions = ", ".join(f"{k} {v}" for k, v in peers.get("versions", {}).items())
        lines.append(f"peer versions: {versions}")
        images = peers.get("image_versions") or {}
        if images:
            lines.append(
                "in the smolagents image: " + ", ".join(f"{k} {v}" for k, v in images.items())
            )
        for peer, reason in peers.get("unavailable", {}).items():
            lines.append(f"could not run {peer}: {reason}")
    return "\n".join(lines + _footer(results))


def _footer(results: dict[str, Any]) -> list[str]:
    """The table's last lines: how busy the machine was, how long it took, what failed."""
    lines = []
    busy = results["machine"]["cpu_busy_before"]
    if busy is not None and busy > BUSY_SHARE:
        lines.append("")
        lines.append(f"note: {busy:.0%} of the CPUs were busy with other work just before we")
        lines.append("measured, so these numbers are noisier than on an idle machine.")
    durations = results.get("durations_s", {})
    if durations:
        lines.append("")
        lines.append("took: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()))
    failures = results.get("failures", {})
    if failures:
        lines.append("")
        lines.append(f"FAILED ({len(failures)}), so not in the figures above:")
        lines += [f"  {name}: {e['type']}: {e['message']}" for name, e in failures.items()]
    return lines


def ratios(measures: dict[str, Any]) -> dict[str, float]:
    """The docker run baseline over our warm exec and cold start (those measured)."""
    if "docker_run_rm_baseline" not in measures:
        return {}
    baseline = measures["docker_run_rm_baseline"]["p50_ms"]
    found = {}
    for label, name in (
        ("docker run --rm / warm exec (p50)", "warm_exec"),
        ("docker run --rm / cold start (p50)", "cold_start_to_first_result"),
    ):
        if name in measures:
            found[label] = baseline / measures[name]["p50_ms"]
    return found


def report(results: dict[str, Any], out: Path) -> int:
    """Write the JSON, print the table, name the failed measures; the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{stamp}{'-smoke' if results['smoke'] else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"\nwrote {path}")
    if not results["smoke"]:
        # The latest full run of this machine kind, and the pages made from it.
        for written in results_md.publish(results):
            print(f"wrote {written.relative_to(ROOT)}")
    failures = results["failures"]
    if not failures:
        return 0
    say(f"{len(failures)} measure(s) failed:")
    for name, error in failures.items():
        say(f"  {name}: {error['type']}: {error['message']}")
    return 1


def channel_default() -> str:
    """The channel design a runtime uses when nothing picks one."""
    return os.environ.get(CHANNEL_ENV) or DEFAULT_CHANNEL


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="a few iterations of each")
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the peers too (default: yes, except with --smoke)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    args = parser.parse_args(argv)
    with_peers = (not args.smoke) if args.peers is None else args.peers
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the peers' process
    # is stopped and their containers removed (run_peers), ours by legion.
    signal.signal(signal.SIGTERM, _on_sigterm)
    began = time.perf_counter()
    durations: dict[str, float] = {}
    peers: dict[str, Any] = {}
    log = Measures()
    python: Path | None = None
    images: dict[str, Any] = {}
    blocked: dict[str, str] = {}
    if with_peers:
        # Set-up first (it can take minutes), so nothing builds while we measure.
        say("preparing the peers (their venv and images; built only when missing or outdated)...")
        prepared = log.run_sync("peer set-up", prepare_peers)
        if prepared is not None:
            python, images, blocked = prepared
        durations["peer set-up"] = time.perf_counter() - began
    length = "well under a minute" if args.smoke else "a few minutes"
    say(f"measuring our sandbox (the {'smoke' if args.smoke else 'full'} run takes {length})...")
    busy_before = cpu_busy()
    start = time.perf_counter()
    measures, image = asyncio.run(bench_ours(args.smoke, log))
    durations["ours"] = time.perf_counter() - start
    if with_peers and "peer set-up" not in log.failures:
        start = time.perf_counter()
        peers = bench_peers(args.smoke, python, images, blocked)
        durations["peers"] = time.perf_counter() - start
        for peer, reason in peers["unavailable"].items():
            log.failures[f"peer {peer}"] = {"type": "PeerUnavailable", "message": reason}
    durations["total"] = time.perf_counter() - began
    engine = log.run_sync("docker version", lambda: docker.from_env().version().get("Version"))
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu_busy_before": busy_before,
            "load_average_after": os.getloadavg(),
            "docker": engine,
        },
        "legion": legion.__version__,
        "image": image,
        "snippet": SNIPPET,
        "smoke": args.smoke,
        "machine_kind": results_md.machine_kind(),
        "channel_default": channel_default(),
        "measures": measures,
        "ratios": ratios(measures),
    }
    if peers:
        if "warm_exec" in measures:
            warm = measures["warm_exec"]["p50_ms"]
            peers["ratios_vs_warm_exec_p50"] = {
                name: value["p50_ms"] / warm for name, value in peers["measures"].items()
            }
        results["peers"] = peers
        results["goal"] = goal_check(measures, peers["measures"])
    results["durations_s"] = {k: round(v, 1) for k, v in durations.items()}
    results["failures"] = log.failures
    return report(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
