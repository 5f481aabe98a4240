"""Signed tokens (HMAC-SHA256) for cars and services.

A token is `v1.<base64url(JSON claims)>.<base64url(HMAC)>`. A vehicle token binds one
vehicle id (the car can only open its own stream); a service token carries scopes.
Tokens travel as `authorization: Bearer <token>` metadata. mTLS will produce the same
`Principal` from a certificate, so nothing past `authenticate` cares which was used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from broker.core.errors import PermissionDenied, Unauthenticated
from broker.wire import VEHICLE_ID_HEADER

SCOPES = frozenset({"send", "read", "admin"})
_PREFIX = "v1"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a vehicle (bound to its id) or a service (with scopes)."""

    kind: str  # "vehicle" | "service" | "dev"
    name: str
    scopes: frozenset[str] = frozenset()

    def require(self, scope: str) -> None:
        if self.kind == "vehicle":  # whatever its claims say: a car credential is a car's
            raise PermissionDenied("a vehicle token cannot call the command service")
        if self.kind == "dev" or "admin" in self.scopes or scope in self.scopes:
            return
        raise PermissionDenied(f"token for service {self.name!r} lacks the {scope!r} scope")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(
    secret: str,
    *,
    vehicle: str | None = None,
    service: str | None = None,
    scopes: Iterable[str] = (),
    ttl_s: float = 365 * 86400,
    now: float | None = None,
) -> str:
    """Sign a vehicle token (`vehicle=`) or a service token (`service=`, `scopes=`)."""
    if (vehicle is None) == (service is None):
        raise ValueError("give exactly one of vehicle= or service=")
    scope_list = sorted(set(scopes))
    if vehicle is not None and scope_list:
        raise ValueError("a vehicle token carries no scopes")
    unknown = set(scope_list) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    issued = time.time() if now is None else now
    claims = {
        "sub": vehicle if vehicle is not None else service,
        "kind": "vehicle" if vehicle is not None else "service",
        "scopes": scope_list,
        "iat": int(issued),
        "exp": int(issued + ttl_s),
    }
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signature = hmac.new(secret.encode(), f"{_PREFIX}.{body}".encode(), hashlib.sha256).digest()
    return f"{_PREFIX}.{body}.{_b64(signature)}"


class Authenticator:
    """Turns call metadata into a `Principal`, or raises UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(self, secret: str, *, insecure_dev: bool = False) -> None:
        self._secret = secret.encode()
        self._insecure_dev = insecure_dev

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise Unauthenticated("malformed token")
        expected = hmac.new(self._secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
        try:
            signature = _unb64(parts[2])
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError):
            raise Unauthenticated("malformed token") from None
        if not hmac.compare_digest(expected.digest(), signature):
            raise Unauthenticated("token signature does not verify")
        if not isinstance(claims, dict) or claims.get("kind") not in ("vehicle", "service"):
            raise Unauthenticated("malformed token claims")
        if float(claims.get("exp", 0)) < (time.time() if now is None else now):
            raise Unauthenticated("token expired")
        return Principal(
            str(claims["kind"]), str(claims["sub"]), frozenset(claims.get("scopes", ()))
        )

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller behind this metadata; in insecure-dev mode, anyone is `dev`."""
        token = None
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, rest = value.partition(" ")
                if scheme.lower() != "bearer" or not rest:
                    raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
                token = rest.strip()
        if token is None:
            if self._insecure_dev:
                return Principal("dev", "insecure-dev")
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        return self.verify(token)

    def vehicle_identity(self, principal: Principal, claimed: str | None) -> str:
        """The vehicle id a Connect stream may use: the token's own, never another car's."""
        if principal.kind == "vehicle":
            if claimed is not None and claimed != principal.name:
                raise PermissionDenied(
                    f"this token belongs to vehicle {principal.name!r}, not {claimed!r}"
                )
            return principal.name
        if principal.kind == "dev":
            if not claimed:
                raise Unauthenticated(
                    f"insecure-dev mode: name the vehicle with '{VEHICLE_ID_HEADER}' metadata"
                )
            return claimed
        raise PermissionDenied("only a vehicle token can open a vehicle stream")
