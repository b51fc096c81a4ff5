"""JWTs as bearer tokens: keys made here (RS256 and ES256), checked by
JWTAuthenticator on its own and by a real `legion serve --jwt-jwks ...`
through legion.Client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import legion
from legion.server import Principal
from legion.server.jwt_auth import JWTAuthenticator, load_principal_defaults
from legion.testing import FakeOpenAIServer

from .conftest import ServerProcess, legion_cli, server_env, start_server, stop_cleanly

ISSUER = "https://id.example.test/"
AUDIENCE = "legion-tests"
IDENTITY_AGENTS = "tests.server.identity_agents:REGISTRY"


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    stranger: rsa.RSAPrivateKey
    """A key the server does not know."""

    @property
    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        return {"keys": [{**rsa_jwk, "kid": "rsa-1"}, {**ec_jwk, "kid": "ec-1"}]}

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def claims(**changes: Any) -> dict[str, Any]:
    """Ada's claims, valid for five minutes; a change of None drops the claim."""
    now = int(time.time())
    found: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "ada",
        "tenant": "acme",
        "roles": ["reader"],
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
    }
    found.update(changes)
    return {k: v for k, v in found.items() if v is not None}


def signed(key: Any, alg: str, kid: str | None, **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token made without PyJWT (which refuses to make the forgeries below):
    HMAC-SHA256 with ``secret``, or no signature at all."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return f"{signing_input}."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def tampered(token: str, **changes: Any) -> str:
    """``token`` with its payload rewritten and its signature kept."""
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    return f"{header}.{_b64(json.dumps(data).encode())}.{signature}"


def refused_tokens(keys: Keys) -> dict[str, str]:
    """Tokens that must each be refused, by what is wrong with them."""
    now = int(time.time())
    good = signed(keys.rsa, "RS256", "rsa-1")
    return {
        "expired": signed(keys.rsa, "RS256", "rsa-1", exp=now - 60, nbf=now - 600),
        "not yet valid": signed(keys.ec, "ES256", "ec-1", nbf=now + 600),
        "wrong audience": signed(keys.rsa, "RS256", "rsa-1", aud="another-service"),
        "wrong issuer": signed(keys.ec, "ES256", "ec-1", iss="https://evil.example.test/"),
        "unknown kid": signed(keys.stranger, "RS256", "rsa-2"),
        "alg none": hand_made({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(), None),
        "HS256 with the public key": hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), keys.rsa_public_pem()
        ),
        "HS256 with the JWK": hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"},
            claims(),
            json.dumps(keys.jwks["keys"][0]).encode(),
        ),
        "tampered payload": tampered(good, sub="root"),
        "signed by a stranger with a known kid": signed(keys.stranger, "RS256", "rsa-1"),
        "ES256 against the RSA key": signed(keys.ec, "ES256", "rsa-1"),
        "no kid": signed(keys.rsa, "RS256", None),
        "no expiry": signed(keys.rsa, "RS256", "rsa-1", exp=None),
        "no subject": signed(keys.rsa, "RS256", "rsa-1", sub=None),
        "a number as subject": signed(keys.rsa, "RS256", "rsa-1", sub=7),
        "not a JWT": "not.a.jwt",
        "huge": "a" * 20_000,
    }


def authenticator(keys: Keys, **options: Any) -> JWTAuthenticator:
    return JWTAuthenticator(
        keys.jwks,
        issuer=ISSUER,
        audience=AUDIENCE,
        vault_claims={"sub": "user", "tenant": "tenant", "roles": "roles"},
        **options,
    )


# --- the authenticator on its own --------------------------------------------------


async def test_a_valid_token_maps_claims_to_a_principal_and_its_vault(keys: Keys) -> None:
    auth = authenticator(keys, principal_defaults={"max_concurrent_runs": 2, "vault": {"k": 1}})
    for key, alg, kid in ((keys.rsa, "RS256", "rsa-1"), (keys.ec, "ES256", "ec-1")):
        principal = await auth.authenticate(signed(key, alg, kid))
        assert principal == Principal(
            "ada",
            vault={"k": 1, "user": "ada", "tenant": "acme", "roles": ["reader"]},
            max_concurrent_runs=2,
        ), alg
    no_tenant = await auth.authenticate(signed(keys.rsa, "RS256", "rsa-1", tenant=None))
    assert no_tenant is not None and "tenant" not in no_tenant.vault
    assert auth.key_ids == ["ec-1", "rsa-1"]


async def test_every_bad_token_is_refused(keys: Keys) -> None:
    auth = authenticator(keys)
    accepted = {
        what: principal
        for what, token in refused_tokens(keys).items()
        if (principal := await auth.authenticate(token)) is not None
    }
    assert accepted == {}


async def test_the_leeway_and_the_algorithm_allowlist(keys: Keys) -> None:
    just_expired = signed(keys.rsa, "RS256", "rsa-1", exp=int(time.time()) - 5)
    assert await authenticator(keys).authenticate(just_expired) is None
    assert await authenticator(keys, leeway=30).authenticate(just_expired) is not None
    only_es = authenticator(keys, algorithms=["ES256"])
    assert await only_es.authenticate(signed(keys.rsa, "RS256", "rsa-1")) is None
    assert await only_es.authenticate(signed(keys.ec, "ES256", "ec-1")) is not None
    by_email = authenticator(keys, principal_claim="email")
    with_email = signed(keys.ec, "ES256", "ec-1", email="ada@example.test")
    principal = await by_email.authenticate(with_email)
    assert principal is not None and principal.name == "ada@example.test"


@pytest.mark.parametrize(
    ("jwks", "options", "problem"),
    [
        ({"keys": []}, {}, "at least one key"),
        ([], {}, "at least one key"),
        ({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}, {}, "has no key id"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}, {}, "only public keys"),
        ({"keys": [{"kty": "RSA", "kid": "r", "n": "!!", "e": "AQAB"}]}, {}, "is not usable"),
        (None, {"algorithms": ["HS256"]}, "no 'none', no HS*"),
        (None, {"algorithms": ["none"]}, "are not allowed"),
        (None, {"issuer": ""}, "needs the issuer"),
        (None, {"audience": ""}, "needs the audience"),
        (None, {"principal_defaults": {"budget_of_nothing": 1}}, "budget_of_nothing"),
        (None, {"principal_defaults": {"name": "x"}}, "cannot set the name"),
        (None, {"principal_defaults": {"max_concurrent_runs": 0}}, "at least 1"),
    ],
)
def test_a_bad_configuration_says_what_is_wrong(
    keys: Keys, jwks: Any, options: dict[str, Any], problem: str
) -> None:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, **options}
    with pytest.raises(legion.UsageError) as caught:
        JWTAuthenticator(keys.jwks if jwks is None else jwks, **settings)
    assert problem in str(caught.value)


def test_a_private_key_in_the_key_set_is_refused(keys: Keys) -> None:
    private = RSAAlgorithm.to_jwk(keys.rsa, as_dict=True)
    with pytest.raises(legion.UsageError, match="holds a private key"):
        JWTAuthenticator({"keys": [{**private, "kid": "k"}]}, issuer=ISSUER, audience=AUDIENCE)


def test_principal_defaults_come_from_json_or_a_file(tmp_path: Path) -> None:
    assert load_principal_defaults('{"max_concurrent_runs": 3}') == {"max_concurrent_runs": 3}
    toml = tmp_path / "defaults.toml"
    toml.write_text("max_concurrent_runs = 2\nvault = { plan = 'free' }\n")
    assert load_principal_defaults(str(toml)) == {
        "max_concurrent_runs": 2,
        "vault": {"plan": "free"},
    }
    with pytest.raises(legion.UsageError, match="neither JSON nor a readable file"):
        load_principal_defaults(str(tmp_path / "absent.json"))
    with pytest.raises(legion.UsageError, match="not valid JSON"):
        load_principal_defaults("{nope")


# --- through a real `legion serve` ----------------------------------------------------


@pytest.fixture(scope="module")
def jwt_server(
    docker_ready: None,
    fake_model: FakeOpenAIServer,
    keys: Keys,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    where = tmp_path_factory.mktemp("jwt")
    jwks = where / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks))
    server = start_server(
        [
            "--agents",
            IDENTITY_AGENTS,
            "--listen",
            "127.0.0.1:0",
            "--jwt-jwks",
            str(jwks),
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
            "--jwt-vault-claim",
            "sub=user",
            "--jwt-vault-claim",
            "tenant",
            "--jwt-vault-claim",
            "roles",
            "--jwt-principal-defaults",
            '{"max_concurrent_runs": 1}',
            "--grace-seconds",
            "2",
        ],
        server_env(fake_model),
        where,
    )
    try:
        yield server
    finally:
        stop_cleanly(server)


async def test_a_tool_reads_the_vault_the_token_maps_to(
    jwt_server: ServerProcess, keys: Keys
) -> None:
    token = signed(keys.rsa, "RS256", "rsa-1")
    async with legion.Client(jwt_server.address, token=token) as client:
        assert await client.principal() == "ada"
        result = await client.run("Teller", "#code Identity.whoami()")
    assert result.output == {"user": "ada", "tenant": "acme", "roles": ["reader"]}
    grace = signed(keys.ec, "ES256", "ec-1", sub="grace", tenant="globex", roles=["admin"])
    async with legion.Client(jwt_server.address, token=grace) as client:
        assert await client.principal() == "grace"
        result = await client.run("Teller", "#code Identity.whoami()")
    assert result.output == {"user": "grace", "tenant": "globex", "roles": ["admin"]}


async def test_the_server_refuses_bad_tokens_without_saying_why(
    jwt_server: ServerProcess, keys: Keys
) -> None:
    async def refusal(token: str) -> legion.Unauthenticated:
        async with legion.Client(jwt_server.address, token=token) as client:
            with pytest.raises(legion.Unauthenticated) as caught:
                await client.principal()
        return caught.value

    baseline = await refusal("an-opaque-token-the-server-never-issued")
    assert baseline.code == "UNAUTHENTICATED"
    for what, token in refused_tokens(keys).items():
        if what == "huge":  # over gRPC's own metadata limit: refused before any authenticator
            continue
        refused = await refusal(token)
        # the same answer as for any unknown token: nothing tells an attacker what to fix
        assert (refused.code, str(refused)) == (baseline.code, str(baseline)), what
    assert "jwt_refused" in jwt_server.log()
    # the server is still serving
    async with legion.Client(jwt_server.address, token=signed(keys.ec, "ES256", "ec-1")) as client:
        assert await client.principal() == "ada"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--jwt-issuer", ISSUER], "--jwt-issuer need --jwt-jwks FILE"),
        (["--jwt-jwks", "JWKS"], "needs --jwt-issuer and --jwt-audience"),
        (["--jwt-jwks", "MISSING", "--jwt-issuer", "i", "--jwt-audience", "a"], "cannot read"),
        (
            ["--jwt-jwks", "JWKS", "--jwt-issuer", "i", "--jwt-audience", "a", "--jwt-algorithm",
             "HS256"],
            "no 'none', no HS*",
        ),
        (
            ["--jwt-jwks", "JWKS", "--jwt-issuer", "i", "--jwt-audience", "a",
             "--jwt-principal-defaults", '{"nope": 1}'],
            "nope",
        ),
    ],
)  # fmt: skip
def test_bad_jwt_options_stop_the_server_at_start(
    keys: Keys,
    fake_model: FakeOpenAIServer,
    tmp_path: Path,
    args: list[str],
    problem: str,
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks))
    args = [
        str(jwks) if a == "JWKS" else str(tmp_path / "absent.json") if a == "MISSING" else a
        for a in args
    ]
    done = legion_cli(
        "serve", "--agents", IDENTITY_AGENTS, "--listen", "127.0.0.1:0", *args,
        env=server_env(fake_model), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert problem in done.stderr
