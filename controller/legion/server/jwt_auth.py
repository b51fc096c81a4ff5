"""Bearer tokens that are JWTs, checked against a JSON Web Key Set.

One deployment can then serve many end users without a token-table entry
each: the identity provider signs tokens, the server checks them and maps
their claims to a :class:`~legion.server.Principal`::

    authenticator = JWTAuthenticator.from_file(
        "jwks.json",
        issuer="https://id.example.com/",
        audience="legion",
        principal_claim="sub",                       # the principal's name
        vault_claims={"sub": "user", "tenant": "tenant", "roles": "roles"},
        principal_defaults={"max_concurrent_runs": 2},
    )

A token is accepted only when all of these hold; otherwise it is refused
(``UNAUTHENTICATED``, with the same message as any unknown token; the reason
is logged on the server):

- its header names a key id (``kid``) that the key set holds, and an
  algorithm that is in the allowlist (asymmetric ones only: never ``none``,
  never HS*) and fits that key's type (an RS/PS token needs an RSA key, an
  ES token an EC key of the matching curve, EdDSA an OKP key), and that the
  key's own ``alg``, when it has one, names;
- its signature verifies with that key;
- ``exp`` is present and in the future, ``nbf`` (when present) in the past,
  ``iss`` equals the issuer and ``aud`` holds the audience (``leeway``
  seconds of clock skew allowed);
- the principal claim is a non-empty string.

The key set is read once, when the authenticator is made.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import jwt
from jwt.exceptions import PyJWKError, PyJWTError

from .._log import get_logger
from ..errors import UsageError
from .auth import Principal

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "JWTAuthenticator",
    "load_principal_defaults",
    "parse_vault_claims",
]

log = get_logger("legion.server.jwt")

_KEY_TYPES = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}
"""Each allowed algorithm, with the key type (and curve) it must be used with."""

ASYMMETRIC_ALGORITHMS: tuple[str, ...] = tuple(_KEY_TYPES)
"""The algorithms a :class:`JWTAuthenticator` may allow (the default: all of them)."""

MAX_TOKEN_CHARS = 16 * 1024
"""A longer bearer token is refused before it is parsed."""


class JWTAuthenticator:
    """An :class:`~legion.server.Authenticator` for JWTs signed by keys of a JWKS.

    ``jwks`` is the key set (``{"keys": [...]}``, public keys only). The
    principal's name is the ``principal_claim`` (``sub``); ``vault_claims``
    maps claims to vault keys (``{"tenant": "tenant", "roles": "roles"}``; a
    claim the token lacks is left out of the vault). ``principal_defaults``
    are the :class:`~legion.server.Principal` keyword fields given to every
    principal it makes (``max_concurrent_runs``, budgets...; a ``vault`` there
    is a base that claims add to).
    """

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = ASYMMETRIC_ALGORITHMS,
        principal_claim: str = "sub",
        vault_claims: Mapping[str, str] | None = None,
        principal_defaults: Mapping[str, Any] | None = None,
        leeway: float = 0.0,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise UsageError("a JWT authenticator needs the issuer its tokens must name (iss)")
        if not isinstance(audience, str) or not audience:
            raise UsageError("a JWT authenticator needs the audience its tokens must name (aud)")
        if isinstance(algorithms, str) or not algorithms:
            raise UsageError("algorithms must be a non-empty list, e.g. ['RS256', 'ES256']")
        unknown = sorted(set(algorithms) - set(_KEY_TYPES))
        if unknown:
            raise UsageError(
                f"JWT algorithm(s) {unknown} are not allowed; choose from "
                f"{list(ASYMMETRIC_ALGORITHMS)} (no 'none', no HS*: a server that checks "
                "tokens must not be able to make them)"
            )
        if not isinstance(principal_claim, str) or not principal_claim:
            raise UsageError("principal_claim must name a claim, e.g. 'sub'")
        if leeway < 0:
            raise UsageError("leeway must be zero or more seconds")
        self.issuer = issuer
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.principal_claim = principal_claim
        self.vault_claims = dict(vault_claims or {})
        for claim, key in self.vault_claims.items():
            if not (isinstance(claim, str) and claim and isinstance(key, str) and key):
                raise UsageError("vault_claims maps claim names to vault keys (both non-empty)")
        self.principal_defaults = _checked_defaults(principal_defaults or {})
        self.leeway = leeway
        self._keys = _read_key_set(jwks)

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys it accepts, sorted."""
        return sorted(self._keys)

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> JWTAuthenticator:
        """Read the key set from a JSON file; ``options`` as for the constructor."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read the JWKS file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"the JWKS file {path} is not valid JSON: {exc}") from None
        try:
            return cls(data, **options)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None

    async def authenticate(self, token: str) -> Principal | None:
        try:
            return self._principal(token)
        except _Refused as refused:
            log.info("jwt_refused", reason=str(refused))
        except PyJWTError as exc:
            log.info("jwt_refused", reason=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a malformed token must never fail the call
            log.warning("jwt_refused", reason=f"unreadable token: {type(exc).__name__}: {exc}")
        return None

    def _principal(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_CHARS:
            raise _Refused(f"token longer than {MAX_TOKEN_CHARS} characters")
        header = jwt.get_unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise _Refused(f"algorithm {alg!r} is not allowed")
        if not isinstance(kid, str) or kid not in self._keys:
            raise _Refused(f"key id {kid!r} is not in the key set")
        jwk = self._keys[kid]
        kty, curve = _KEY_TYPES[alg]
        if jwk.get("kty") != kty or (curve is not None and jwk.get("crv") != curve):
            raise _Refused(f"algorithm {alg} does not fit key {kid!r} ({jwk.get('kty')})")
        if jwk.get("alg") not in (None, alg):
            raise _Refused(f"key {kid!r} is for {jwk.get('alg')}, not {alg}")
        claims = jwt.decode(
            token,
            key=jwt.PyJWK(jwk, algorithm=alg),
            algorithms=[alg],
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={"require": ["exp", "iss", "aud"]},
        )
        name = claims.get(self.principal_claim)
        if not isinstance(name, str) or not name.strip():
            raise _Refused(f"claim {self.principal_claim!r} is not a non-empty string")
        fields = dict(self.principal_defaults)
        vault = dict(fields.pop("vault", None) or {})
        vault.update(
            {key: claims[claim] for claim, key in self.vault_claims.items() if claim in claims}
        )
        return Principal(name, vault=vault, **fields)


class _Refused(Exception):
    """Why a token is refused (logged, never told to the caller)."""


def _read_key_set(jwks: Any) -> dict[str, dict[str, Any]]:
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise UsageError('a JWKS is a JSON object {"keys": [...]} with at least one key')
    found: dict[str, dict[str, Any]] = {}
    for index, key in enumerate(keys):
        if not isinstance(key, dict):
            raise UsageError(f"JWKS key {index} is not a JSON object")
        kid = key.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UsageError(f"JWKS key {index} has no key id (kid); tokens name keys by it")
        if kid in found:
            raise UsageError(f"the JWKS holds two keys with the id {kid!r}")
        if key.get("kty") not in {"RSA", "EC", "OKP"}:
            raise UsageError(
                f"JWKS key {kid!r} has kty {key.get('kty')!r}; only public keys of type "
                "RSA, EC or OKP are accepted"
            )
        if any(part in key for part in ("d", "p", "q")):
            raise UsageError(f"JWKS key {kid!r} holds a private key; give the public key only")
        try:
            jwt.PyJWK(key)
        except (PyJWKError, PyJWTError, ValueError) as exc:
            raise UsageError(f"JWKS key {kid!r} is not usable: {exc}") from None
        found[kid] = key
    return found


def _checked_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(defaults, Mapping):
        raise UsageError("principal defaults must be a table of Principal fields")
    if "name" in defaults:
        raise UsageError("principal defaults cannot set the name: it comes from the token")
    known = sorted(f.name for f in fields(Principal) if f.name != "name")
    unknown = sorted(set(defaults) - set(known))
    if unknown:
        raise UsageError(f"principal defaults: unknown field(s) {unknown}; a Principal has {known}")
    Principal("defaults", **defaults)  # the Principal's own checks, at start-up
    return dict(defaults)


def load_principal_defaults(value: str) -> dict[str, Any]:
    """``--jwt-principal-defaults``: inline JSON (``{"max_concurrent_runs": 2}``),
    or a ``.json`` or ``.toml`` file holding the same table."""
    text, where, toml = value, "--jwt-principal-defaults", False
    if not value.lstrip().startswith("{"):
        path = Path(value)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(
                f"--jwt-principal-defaults is neither JSON nor a readable file: {value} "
                f"({exc.strerror})"
            ) from None
        where, toml = str(path), path.suffix == ".toml"
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise UsageError(f"{where} is not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a table of Principal fields")
    return _checked_defaults(data)


def parse_vault_claims(specs: Iterable[str]) -> dict[str, str]:
    """``--jwt-vault-claim CLAIM[=KEY]`` values: claim -> vault key (KEY: CLAIM)."""
    mapping: dict[str, str] = {}
    for spec in specs:
        claim, _, key = spec.partition("=")
        claim, key = claim.strip(), (key or claim).strip()
        if not claim or not key:
            raise UsageError(f"--jwt-vault-claim takes CLAIM or CLAIM=KEY, got {spec!r}")
        mapping[claim] = key
    return mapping
