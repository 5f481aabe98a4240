"""Signed tokens (Ed25519) for cars and services: the format, minting and strict checking.

A token is `v2.<body>.<signature>`, both parts canonical unpadded base64url:

* body = the signing key's id (8 raw bytes, `broker.security.keys.key_id`) followed by
  the claims as compact JSON: `sub` (vehicle id or service name), `kind` (`vehicle` or
  `service`), `scopes` (services only), `iat`, `exp` and optionally `nbf` (whole Unix
  seconds), `jti` (the token id that revocation names), and for a service optionally
  `vehicles`: the vehicle ids it may command and read, each an exact id or a prefix
  ending in `*` (absent: every vehicle);
* signature = Ed25519 over the ASCII bytes `v2.<body>`.

`check_token` decodes in this order, so nothing an attacker sends is parsed before a
trusted key has vouched for it: total size (`MAX_TOKEN_CHARS`), exact shape, canonical
base64url (any other character, padding or non-zero trailing bits is refused), the key id
(a key listed for this broker), the signature over the exact bytes, and only then the
claims (compact JSON, no duplicate names, no unknown names, no NaN/Infinity, each of its
type), and the times against the clock (`TokenRules`). Every failure is `Unauthenticated`
with a message that says which check failed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.core.errors import Unauthenticated
from broker.security.keys import KEY_ID_BYTES, TrustedKey, key_id, load_private_key

VERSION = "v2"
#: send: send and cancel its own commands; read: read and watch its own commands and
#: vehicle states; read:fleet: read and watch every sender's commands; admin: all of
#: these, cancel any command, raise a command's lane
SCOPES = frozenset({"send", "read", "read:fleet", "admin"})
#: the longest `vehicles` list a token may carry
MAX_VEHICLE_PATTERNS = 64
_VEHICLE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}|[A-Za-z0-9_.:-]{0,63}\*")
#: a token longer than this is refused before anything else is looked at
MAX_TOKEN_CHARS = 4096
SIGNATURE_BYTES = 64
#: lifetimes `issue_token` gives unless told otherwise
DEFAULT_TTL_S = {"vehicle": 24 * 3600, "service": 3600}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: the largest time claim accepted (year 2286): keeps every time a small, exact integer
_MAX_TIME = 10**10
_MAX_NAME_CHARS = 256
_CLAIM_NAMES = frozenset({"sub", "kind", "scopes", "iat", "nbf", "exp", "jti", "vehicles"})


@dataclass(frozen=True)
class TokenRules:
    """What the broker accepts beyond a good signature: clock skew and lifetimes."""

    #: `iat` and `nbf` may be at most this far in the future (the issuer's clock ahead)
    clock_skew_s: float = 60
    #: kind -> the longest lifetime (`exp - iat`) accepted
    max_ttl_s: Mapping[str, float] = field(
        default_factory=lambda: {"vehicle": 7 * 86400, "service": 86400}
    )


@dataclass(frozen=True)
class Claims:
    """What a token that passed every check says."""

    subject: str
    kind: str
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    token_id: str
    key_id: str  # hex
    #: the vehicle patterns a service token is limited to; None: every vehicle
    vehicles: tuple[str, ...] | None = None


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode_canonical(text: str, what: str) -> bytes:
    """Unpadded base64url, refusing anything `b64encode` would not have produced."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise Unauthenticated(f"malformed token: {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Unauthenticated(f"malformed token: {what} is not base64url") from None
    if b64encode(data) != text:
        raise Unauthenticated(f"malformed token: {what} is not canonical base64url")
    return data


def new_token_id() -> str:
    """128 random bits, base64url (22 characters)."""
    return b64encode(os.urandom(16))


def issue_token(
    key: Ed25519PrivateKey,
    *,
    vehicle: str | None = None,
    service: str | None = None,
    scopes: Iterable[str] = (),
    ttl_s: float | None = None,
    now: float | None = None,
    not_before: float | None = None,
    token_id: str | None = None,
    vehicles: Iterable[str] | None = None,
) -> str:
    """Sign a vehicle token (`vehicle=`) or a service token (`service=`, `scopes=`,
    optionally limited to `vehicles=` patterns), valid for `ttl_s` (default
    `DEFAULT_TTL_S` of its kind) from `now`."""
    if (vehicle is None) == (service is None):
        raise ValueError("give exactly one of vehicle= or service=")
    kind = "vehicle" if vehicle is not None else "service"
    subject = vehicle if vehicle is not None else service
    if not subject:
        raise ValueError(f"the {kind} name must not be empty")
    scope_list = sorted(set(scopes))
    if kind == "vehicle" and scope_list:
        raise ValueError("a vehicle token carries no scopes")
    unknown = set(scope_list) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    issued = int(time.time() if now is None else now)
    lifetime = DEFAULT_TTL_S[kind] if ttl_s is None else ttl_s
    claims: dict[str, Any] = {
        "sub": subject,
        "kind": kind,
        "iat": issued,
        "exp": issued + math.ceil(lifetime),
        "jti": token_id or new_token_id(),
    }
    if kind == "service":
        claims["scopes"] = scope_list
    if vehicles is not None:
        patterns = sorted(set(vehicles))
        if kind == "vehicle" or not 0 < len(patterns) <= MAX_VEHICLE_PATTERNS:
            raise ValueError(f"vehicles= is 1-{MAX_VEHICLE_PATTERNS} patterns, services only")
        bad = [p for p in patterns if not _VEHICLE_PATTERN.fullmatch(p)]
        if bad:
            raise ValueError(f"not a vehicle id or 'prefix*' pattern: {bad[0]!r}")
        claims["vehicles"] = patterns
    if not_before is not None:
        claims["nbf"] = int(not_before)
    payload = key_id(key.public_key()) + json.dumps(
        claims, separators=(",", ":"), sort_keys=True
    ).encode("utf-8")
    signed = f"{VERSION}.{b64encode(payload)}"
    return f"{signed}.{b64encode(key.sign(signed.encode('ascii')))}"


def check_token(
    token: str,
    keys: Mapping[bytes, TrustedKey],
    rules: TokenRules,
    *,
    now: float | None = None,
) -> Claims:
    """The claims of a token that passes every check (module docstring), in that order."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated(f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise Unauthenticated(f"malformed token: expected '{VERSION}.<body>.<signature>'")
    body = b64decode_canonical(parts[1], "the body")
    signature = b64decode_canonical(parts[2], "the signature")
    if len(signature) != SIGNATURE_BYTES or len(body) <= KEY_ID_BYTES:
        raise Unauthenticated("malformed token: wrong signature or body length")
    trusted = keys.get(body[:KEY_ID_BYTES])
    if trusted is None:
        raise Unauthenticated(
            f"token signed by unknown key {body[:KEY_ID_BYTES].hex()} (not listed, or removed)"
        )
    try:
        trusted.public_key.verify(signature, f"{VERSION}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise Unauthenticated("token signature does not verify") from None
    claims = _parse_claims(body[KEY_ID_BYTES:])
    return _checked(claims, trusted, rules, time.time() if now is None else now)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate claim name")
    return result


def _parse_claims(raw: bytes) -> dict[str, Any]:
    try:
        claims = json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_object,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise Unauthenticated("malformed token claims (signed, but not valid JSON)") from None
    if not isinstance(claims, dict):
        raise Unauthenticated("malformed token claims: not a JSON object")
    unknown = set(claims) - _CLAIM_NAMES
    if unknown:
        raise Unauthenticated(f"malformed token claims: unknown claims {sorted(unknown)[:4]}")
    return claims


def _time_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    # bool is an int to Python; floats (1e300, a fraction) are not whole seconds
    if type(value) is not int or not 0 <= value <= _MAX_TIME:
        raise Unauthenticated(f"malformed token claims: {name!r} must be whole Unix seconds")
    return value


def _checked(
    claims: Mapping[str, Any], trusted: TrustedKey, rules: TokenRules, now: float
) -> Claims:
    subject, kind, token_id = claims.get("sub"), claims.get("kind"), claims.get("jti")
    if type(subject) is not str or not 0 < len(subject) <= _MAX_NAME_CHARS:
        raise Unauthenticated("malformed token claims: 'sub' must be a non-empty string")
    if kind not in ("vehicle", "service"):
        raise Unauthenticated("malformed token claims: 'kind' must be 'vehicle' or 'service'")
    if type(token_id) is not str or not 0 < len(token_id) <= _MAX_NAME_CHARS:
        raise Unauthenticated("malformed token claims: 'jti' must be a non-empty string")
    scopes = claims.get("scopes", [])
    if type(scopes) is not list or not all(type(s) is str and s in SCOPES for s in scopes):
        raise Unauthenticated(
            f"malformed token claims: 'scopes' must be a list of {sorted(SCOPES)}"
        )
    if kind == "vehicle" and scopes:
        raise Unauthenticated("malformed token claims: a vehicle token carries no scopes")
    vehicles = claims.get("vehicles")
    if vehicles is not None and (
        kind == "vehicle"
        or type(vehicles) is not list
        or not 0 < len(vehicles) <= MAX_VEHICLE_PATTERNS
        or not all(type(v) is str and _VEHICLE_PATTERN.fullmatch(v) for v in vehicles)
    ):
        raise Unauthenticated(
            f"malformed token claims: 'vehicles' must be 1-{MAX_VEHICLE_PATTERNS} vehicle "
            "ids or 'prefix*' patterns, in a service token"
        )
    if kind != trusted.kind:
        raise Unauthenticated(
            f"a {kind} token signed by key {trusted.key_id.hex()}, which may sign "
            f"{trusted.kind} tokens only"
        )
    issued_at = _time_claim(claims, "iat", required=True)
    expires_at = _time_claim(claims, "exp", required=True)
    not_before = _time_claim(claims, "nbf", required=False)
    assert issued_at is not None and expires_at is not None
    if issued_at > now + rules.clock_skew_s:
        raise Unauthenticated(
            f"token issued in the future ({issued_at - now:.0f}s ahead; the allowed clock "
            f"skew is {rules.clock_skew_s:g}s)"
        )
    if not_before is not None and not_before > now + rules.clock_skew_s:
        raise Unauthenticated(f"token not valid yet (for another {not_before - now:.0f}s)")
    if expires_at <= now:
        raise Unauthenticated("token expired")
    max_ttl_s = rules.max_ttl_s[kind]
    if expires_at - issued_at > max_ttl_s:
        raise Unauthenticated(
            f"token lifetime {expires_at - issued_at}s is longer than the {max_ttl_s:g}s this "
            f"broker accepts for {kind} tokens"
        )
    return Claims(
        subject,
        kind,
        frozenset(scopes),
        issued_at,
        expires_at,
        token_id,
        trusted.key_id.hex(),
        None if vehicles is None else tuple(vehicles),
    )


class TokenMinter:
    """A token provider for the SDKs (`token=` of `VehicleAgent` and `BrokerClient`):
    each call returns a token of this subject, minting a new one once the current one
    has used up half its lifetime.

    For simulators, tests and the token service of a deployment: it holds the private
    key, which a car or an app backend never does."""

    def __init__(
        self,
        key: Ed25519PrivateKey | Path,
        *,
        vehicle: str | None = None,
        service: str | None = None,
        scopes: Iterable[str] = (),
        ttl_s: float | None = None,
        vehicles: Iterable[str] | None = None,
    ) -> None:
        self._key = load_private_key(key) if isinstance(key, Path) else key
        self._claims: dict[str, Any] = {
            "vehicle": vehicle,
            "service": service,
            "scopes": tuple(scopes),
            "ttl_s": ttl_s,
            "vehicles": None if vehicles is None else tuple(vehicles),
        }
        kind = "vehicle" if vehicle is not None else "service"
        self._ttl_s = DEFAULT_TTL_S[kind] if ttl_s is None else ttl_s
        self._token = ""
        self._renew_at = 0.0
        #: tokens minted so far
        self.minted = 0

    def __call__(self) -> str:
        now = time.time()
        if now >= self._renew_at:
            self._token = issue_token(self._key, now=now, **self._claims)
            self._renew_at = now + self._ttl_s / 2
            self.minted += 1
        return self._token
