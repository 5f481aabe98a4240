"""Signed tokens: binding, scopes, tampering, expiry."""

from __future__ import annotations

import pytest

from broker.core.errors import PermissionDenied, Unauthenticated
from broker.security.auth import Authenticator, Principal, issue_token

SECRET = "unit-secret-0123456789abcdef"


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_vehicle_token_binds_its_vehicle() -> None:
    auth = Authenticator(SECRET)
    principal = auth.authenticate(_md(issue_token(SECRET, vehicle="car-1")))
    assert principal == Principal("vehicle", "car-1")
    assert auth.vehicle_identity(principal, None) == "car-1"
    assert auth.vehicle_identity(principal, "car-1") == "car-1"
    with pytest.raises(PermissionDenied, match="car-1"):
        auth.vehicle_identity(principal, "car-2")
    with pytest.raises(PermissionDenied):
        principal.require("read")


def test_service_scopes() -> None:
    auth = Authenticator(SECRET)
    reader = auth.authenticate(_md(issue_token(SECRET, service="app", scopes=["read"])))
    reader.require("read")
    with pytest.raises(PermissionDenied, match="send"):
        reader.require("send")
    with pytest.raises(PermissionDenied):
        auth.vehicle_identity(reader, "car-1")
    admin = auth.authenticate(_md(issue_token(SECRET, service="ops", scopes=["admin"])))
    admin.require("send")
    with pytest.raises(ValueError, match="unknown scopes"):
        issue_token(SECRET, service="x", scopes=["root"])
    with pytest.raises(ValueError):
        issue_token(SECRET)


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer ")],
        _md("v1.e30"),
        _md("v2.a.b"),
        _md("v1.!!!.###"),
    ],
)
def test_missing_or_malformed_is_unauthenticated(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(Unauthenticated):
        Authenticator(SECRET).authenticate(metadata)


def test_tampered_and_expired_tokens() -> None:
    auth = Authenticator(SECRET)
    token = issue_token(SECRET, service="app", scopes=["read"])
    prefix, _body, signature = token.split(".")
    other = issue_token(SECRET, service="app", scopes=["admin"]).split(".")[1]
    with pytest.raises(Unauthenticated, match="signature"):
        auth.verify(f"{prefix}.{other}.{signature}")
    with pytest.raises(Unauthenticated, match="signature"):
        Authenticator("some-other-secret-000000").verify(token)
    old = issue_token(SECRET, vehicle="car-1", ttl_s=10, now=1000)
    assert auth.verify(old, now=1005).name == "car-1"
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify(old, now=1011)


def test_insecure_dev_needs_a_named_vehicle() -> None:
    auth = Authenticator("", insecure_dev=True)
    dev = auth.authenticate([])
    dev.require("admin")
    assert auth.vehicle_identity(dev, "car-9") == "car-9"
    with pytest.raises(Unauthenticated, match="x-vehicle-id"):
        auth.vehicle_identity(dev, None)
