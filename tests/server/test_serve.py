"""`legion serve` start-up and shut-down: the registry, where it may listen,
TLS with and without client certificates, SIGTERM with runs in flight; and
`legion run`, embedded and remote."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
import signal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import legion
from legion.server import check_listen, load_registry
from legion.server.commands import Progress
from legion.testing import FakeOpenAIServer

from .agents import REGISTRY
from .conftest import Served, legion_cli, server_env, start_server, stop_cleanly
from .support import Beacon, next_event

SLEEP = "#code import time\ntime.sleep(60)"


# --- the registry ---------------------------------------------------------------------------


def test_registries_of_every_supported_shape_load() -> None:
    from . import agents

    assert load_registry("tests.server.agents:REGISTRY") == agents.REGISTRY
    assert load_registry("tests.server.agents:make_registry") == {
        "Echo": agents.Echo,
        "Counter": agents.Counter,
    }
    assert load_registry("tests.server.agents:Coder") == {"Coder": agents.Coder}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tests.server.agents", "package.module:attribute"),
        ("tests.server.no_such_module:REGISTRY", "cannot import tests.server.no_such_module"),
        ("tests.server.agents:MISSING", "has no attribute 'MISSING'"),
        ("tests.server.agents:NOT_AGENTS", "'Oops' is <class 'dict'>, not a legion.Agent"),
        ("tests.server.agents:ABSTRACT", "Base is abstract"),
        ("tests.server.agents:NUMBER", "it must be a dict {name: AgentClass}"),
        ("tests.server.agents:EMPTY", "holds no agents"),
    ],
)
def test_a_bad_registry_is_refused_with_the_reason(spec: str, problem: str) -> None:
    with pytest.raises(legion.UsageError) as refused:
        load_registry(spec)
    assert problem in str(refused.value)


def test_serve_exits_2_on_a_bad_registry_address_or_token_file(
    fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    env = server_env(fake_model)
    bad = legion_cli("serve", "--agents", "tests.server.agents:NOT_AGENTS", env=env)
    assert bad.returncode == 2, bad.stderr
    assert "'Oops' is <class 'dict'>, not a legion.Agent subclass" in bad.stderr
    public = legion_cli(
        "serve", "--agents", "tests.server.agents:REGISTRY", "--listen", "0.0.0.0:0", env=env
    )
    assert public.returncode == 2, public.stderr
    assert "refusing to listen on 0.0.0.0:0 without tokens" in public.stderr
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"t": {"name": "x", "vault": {}, "colour": "red"}}')
    strange = legion_cli(
        "serve", "--agents", "tests.server.agents:REGISTRY", "--tokens", str(tokens), env=env
    )
    assert strange.returncode == 2 and "unknown key(s) ['colour']" in strange.stderr


@pytest.mark.parametrize(
    ("listen", "allowed"),
    [
        ("127.0.0.1:0", True),
        ("127.8.9.10:50051", True),
        ("localhost:50051", True),
        ("[::1]:0", True),
        ("unix:/tmp/legion.sock", True),
        ("0.0.0.0:0", False),
        ("[::]:50051", False),
        ("192.0.2.7:50051", False),
        ("example.invalid:50051", False),
    ],
)
def test_without_tokens_only_loopback_or_a_unix_socket(listen: str, allowed: bool) -> None:
    check_listen(listen, authenticated=True)  # with tokens, anywhere
    if allowed:
        check_listen(listen, authenticated=False)
    else:
        with pytest.raises(legion.UsageError, match=r"refusing to listen .* without tokens"):
            check_listen(listen, authenticated=False)


@pytest.mark.parametrize("listen", ["nowhere", "host:port", "127.0.0.1:70000", ":50051", "unix:"])
def test_a_malformed_address_is_refused(listen: str) -> None:
    with pytest.raises(legion.UsageError, match=r"HOST:PORT|needs a path"):
        check_listen(listen, authenticated=True)


# --- shut-down -------------------------------------------------------------------------------


async def test_sigterm_with_runs_in_flight_leaves_no_container(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Served on a Unix socket without tokens; two runs are in their code when
    SIGTERM comes: their callers get UNAVAILABLE, the server exits 0, and no
    container of that server process is left."""
    socket = tmp_path / "api.sock"
    server = start_server(
        ["--listen", f"unix:{socket}", "--grace-seconds", "0.5"], server_env(fake_model), tmp_path
    )
    try:
        async with legion.Client(f"unix:{socket}") as client, client.events() as events:
            beacons = [Beacon("sandbox.eval.start") for _ in range(2)]
            runs = [asyncio.create_task(client.run("Coder", SLEEP, on_event=b)) for b in beacons]
            await asyncio.wait_for(asyncio.gather(*(b.reached.wait() for b in beacons)), 90)
            assert len(await asyncio.to_thread(server.containers)) == 2
            server.process.send_signal(signal.SIGTERM)
            for run in runs:
                with pytest.raises(legion.Unavailable, match="shutting down"):
                    await asyncio.wait_for(run, 60)
            with pytest.raises(legion.Unavailable, match="shutting down"):  # and so do streams
                await asyncio.wait_for(next_event(events, lambda e: False), 60)
        code = await asyncio.to_thread(server.process.wait, 60)
    finally:
        stop_cleanly(server)
    assert code == 0
    log = server.log()
    assert "runs_cancelled" in log and "server_stopped" in log
    assert "Traceback" not in log, log


# --- TLS ----------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_tls_with_client_certificates(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    ca_key, server_key, client_key, stranger_key = _key(), _key(), _key(), _key()
    ca = _certificate("Legion test CA", ca_key, ca=True)
    files = {
        "ca.pem": ca,
        "server.pem": _certificate("legion server", server_key, ("Legion test CA", ca_key)),
        "server.key": _pem_key(server_key),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    client_cert = _certificate("a client", client_key, ("Legion test CA", ca_key))
    stranger_cert = _certificate("a stranger", stranger_key)  # self-signed, not by the CA
    server = start_server(
        [
            *("--listen", "127.0.0.1:0"),
            *("--tls-cert", str(tmp_path / "server.pem")),
            *("--tls-key", str(tmp_path / "server.key")),
            *("--tls-client-ca", str(tmp_path / "ca.pem")),
        ],
        server_env(fake_model),
        tmp_path,
    )
    try:
        trusted = legion.Client(
            server.address,
            root_certificates=ca,
            certificate_chain=client_cert,
            private_key=_pem_key(client_key),
        )
        async with trusted:
            assert len(await trusted.list_agents()) == len(REGISTRY)
            async with trusted.events():
                pass
        refused = {
            "plaintext": legion.Client(server.address),
            "no client certificate": legion.Client(server.address, root_certificates=ca),
            "a stranger's certificate": legion.Client(
                server.address,
                root_certificates=ca,
                certificate_chain=stranger_cert,
                private_key=_pem_key(stranger_key),
            ),
            "an untrusted server": legion.Client(
                server.address,
                root_certificates=stranger_cert,
                certificate_chain=client_cert,
                private_key=_pem_key(client_key),
            ),
        }
        for why, client in refused.items():
            async with client:
                try:
                    await asyncio.wait_for(client.list_agents(), 30)
                except legion.Unavailable:
                    continue
            pytest.fail(f"a client with {why} was served")
        async with trusted:  # and the server still serves
            assert len(await trusted.list_agents()) == len(REGISTRY)
    finally:
        stop_cleanly(server)


# --- legion run -------------------------------------------------------------------------------


def test_legion_run_embedded_prints_progress_and_the_answer(
    fake_model: FakeOpenAIServer,
) -> None:
    done = legion_cli("run", "tests.server.agents:Counter", "#json 12", env=server_env(fake_model))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 12
    assert "run Counter started" in done.stderr and "the model answered" in done.stderr
    failed = legion_cli("run", "tests.server.agents:Nobody", "hi", env=server_env(fake_model))
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        "legion run: UsageError: module tests.server.agents has no attribute 'Nobody'"
    ]


def test_legion_run_remote(served: Served, fake_model: FakeOpenAIServer) -> None:
    env = server_env(fake_model, LEGION_SERVER_TOKEN=served.tokens.bob)
    done = legion_cli("run", "Coder", "#code Profile.user()", "--remote", served.address, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "bob"
    assert "step 1: running code" in done.stderr and "tool Profile.user" in done.stderr
    for args, expected in (
        (["Echo", "#babble"], "legion run: MaxRetriesReached: Echo: 2 failed steps in a row"),
        (["Echo", "hi", "--token", "wrong"], "legion run: Unauthenticated: unknown token"),
    ):
        failed = legion_cli(
            *("run", *args, "--remote", served.address, "--quiet"),
            *("--config", '{"max_retries": 1}'),
            env=env,
        )
        assert failed.returncode == 1 and failed.stdout == ""
        assert failed.stderr.startswith(expected) and failed.stderr.count("\n") == 1, failed.stderr


class Output(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.reminded = asyncio.Event()

    def write(self, text: str) -> int:
        if "still running code" in text:
            self.reminded.set()
        return super().write(text)


async def test_progress_lines_and_a_reminder_during_long_steps() -> None:
    out = Output()
    progress = Progress(out, every=0.05)
    ticking = asyncio.create_task(progress.tick())
    try:
        progress(legion.telemetry.Event("run.start", "r" * 32, None, 0.0, {"agent": "Coder"}))
        progress(legion.telemetry.Event("iteration.start", "r" * 32, None, 0.0, {"index": 1}))
        await asyncio.wait_for(out.reminded.wait(), 10)
        progress(legion.telemetry.Event("iteration.stop", "r" * 32, None, 0.0, {"index": 1}))
        quiet_from = len(out.getvalue())
        await asyncio.sleep(0.2)  # nothing in progress: no reminders
    finally:
        ticking.cancel()
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["run Coder started (run rrrrrrrr)", "  step 1: running code"]
    assert "  step 1 done" in lines
    assert out.getvalue()[quiet_from:] == ""
