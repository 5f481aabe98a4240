"""Ed25519 tokens: binding, scopes, key roles and rotation, strict decoding, revocation,
credentials of calls that last, and a fuzz test of the parser."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from broker.core.errors import BrokerError, InvalidArgument, PermissionDenied, Unauthenticated
from broker.security.auth import Authenticator, Principal
from broker.security.keys import (
    TrustedKey,
    generate_key_pair,
    key_id,
    load_private_key,
    load_trusted_keys,
)
from broker.security.revocation import RevocationList
from broker.security.tokens import (
    MAX_TOKEN_CHARS,
    TokenMinter,
    TokenRules,
    b64encode,
    issue_token,
)

CAR_KEY = Ed25519PrivateKey.generate()
SERVICE_KEY = Ed25519PrivateKey.generate()
NOW = 1_700_000_000


def _trusted(**keys: Ed25519PrivateKey) -> dict[bytes, TrustedKey]:
    out = {}
    for kind, key in keys.items():
        public = key.public_key()
        out[key_id(public)] = TrustedKey(key_id(public), kind, public, Path(f"{kind}.public.pem"))
    return out


AUTH = Authenticator(_trusted(vehicle=CAR_KEY, service=SERVICE_KEY))


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _signed(claims: bytes | dict[str, object], key: Ed25519PrivateKey = SERVICE_KEY) -> str:
    """A token with exactly these claim bytes, properly signed by `key`."""
    raw = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    body = f"v2.{b64encode(key_id(key.public_key()) + raw)}"
    return f"{body}.{b64encode(key.sign(body.encode()))}"


def _claims(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": "app", "kind": "service", "scopes": ["read"], "iat": NOW, "exp": NOW + 600,
        "jti": "t-1",
    }  # fmt: skip
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_vehicle_token_binds_its_vehicle() -> None:
    token = issue_token(CAR_KEY, vehicle="car-1", token_id="car-token")
    principal = AUTH.authenticate(_md(token))
    assert (principal.kind, principal.name, principal.token_id) == ("vehicle", "car-1", "car-token")
    assert AUTH.vehicle_identity(principal, None) == "car-1"
    assert AUTH.vehicle_identity(principal, "car-1") == "car-1"
    with pytest.raises(PermissionDenied, match="car-1"):
        AUTH.vehicle_identity(principal, "car-2")
    with pytest.raises(PermissionDenied):
        principal.require("read")


def test_service_scopes() -> None:
    reader = AUTH.authenticate(_md(issue_token(SERVICE_KEY, service="app", scopes=["read"])))
    reader.require("read")
    with pytest.raises(PermissionDenied, match="send"):
        reader.require("send")
    with pytest.raises(PermissionDenied):
        AUTH.vehicle_identity(reader, "car-1")
    admin = AUTH.authenticate(_md(issue_token(SERVICE_KEY, service="ops", scopes=["admin"])))
    admin.require("send")
    with pytest.raises(ValueError, match="unknown scopes"):
        issue_token(SERVICE_KEY, service="x", scopes=["root"])
    with pytest.raises(ValueError):
        issue_token(SERVICE_KEY)
    with pytest.raises(ValueError, match="no scopes"):
        issue_token(CAR_KEY, vehicle="car-1", scopes=["read"])


def test_fleet_scopes_and_vehicle_limits() -> None:
    fleet = AUTH.authenticate(_md(issue_token(SERVICE_KEY, service="bi", scopes=["read:fleet"])))
    assert fleet.has("read") and fleet.has("read:fleet") and not fleet.has("send")
    assert (fleet.actor, fleet.vehicles) == ("service:bi", None)
    token = issue_token(SERVICE_KEY, service="acme", scopes=["send"], vehicles=["acme-*", "d-1"])
    assert AUTH.authenticate(_md(token)).vehicles == ("acme-*", "d-1")
    for bad in ([], ["a b"], [f"x{i}" for i in range(65)]):
        with pytest.raises(ValueError):
            issue_token(SERVICE_KEY, service="acme", vehicles=bad)
    with pytest.raises(ValueError, match="services only"):
        issue_token(CAR_KEY, vehicle="car-1", vehicles=["car-1"])


def test_short_default_lifetimes_and_an_id_in_every_token() -> None:
    car = AUTH.verify(issue_token(CAR_KEY, vehicle="car-1"))
    service = AUTH.verify(issue_token(SERVICE_KEY, service="app"))
    assert 86400 - 5 <= car.expires_at - time.time() <= 86400
    assert 3600 - 5 <= service.expires_at - time.time() <= 3600
    ids = {AUTH.verify(issue_token(CAR_KEY, vehicle="car-1")).token_id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 22 for i in ids)


def test_a_car_key_cannot_sign_a_service_token_nor_a_service_key_a_car_token() -> None:
    with pytest.raises(Unauthenticated, match="may sign vehicle tokens only"):
        AUTH.verify(issue_token(CAR_KEY, service="app", scopes=["admin"]))
    with pytest.raises(Unauthenticated, match="may sign service tokens only"):
        AUTH.verify(issue_token(SERVICE_KEY, vehicle="car-1"))
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(Unauthenticated, match="unknown key"):
        AUTH.verify(issue_token(stranger, vehicle="car-1"))


def test_rotation_two_keys_accepted_then_the_removed_one_refused(tmp_path: Path) -> None:
    folder = tmp_path / "vehicle-keys"
    old_private, old_public = generate_key_pair(tmp_path / "private", "cars-2024")
    new_private, new_public = generate_key_pair(tmp_path / "private", "cars-2025")
    folder.mkdir()
    for public in (old_public, new_public):
        (folder / public.name).write_bytes(public.read_bytes())
    _, service_public = generate_key_pair(tmp_path / "private", "services")

    def broker_auth() -> Authenticator:  # what a broker (re)started over these files holds
        return Authenticator(load_trusted_keys({"vehicle": [folder], "service": [service_public]}))

    old_token = issue_token(load_private_key(old_private), vehicle="car-1")
    new_token = issue_token(load_private_key(new_private), vehicle="car-1")
    both = broker_auth()
    assert both.verify(old_token).name == both.verify(new_token).name == "car-1"
    (folder / old_public.name).unlink()  # every car has a token from the new key by now
    rotated = broker_auth()
    assert rotated.verify(new_token).name == "car-1"
    with pytest.raises(Unauthenticated, match=f"unknown key {key_id_hex(old_private)}"):
        rotated.verify(old_token)


def key_id_hex(private: Path) -> str:
    return key_id(load_private_key(private).public_key()).hex()


def test_the_broker_is_given_public_keys_only(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "keys", "cars")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidArgument, match="public keys only"):
        load_trusted_keys({"vehicle": [private]})
    with pytest.raises(InvalidArgument, match="holds private key"):
        load_trusted_keys({"vehicle": [tmp_path / "keys"]})
    with pytest.raises(InvalidArgument, match="both vehicle and service"):
        load_trusted_keys({"vehicle": [public], "service": [public]})
    with pytest.raises(InvalidArgument, match=r"[Nn]o such file"):
        load_trusted_keys({"vehicle": [tmp_path / "missing.public.pem"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match=r"no \*\.public\.pem"):
        load_trusted_keys({"vehicle": [tmp_path / "empty"]})
    with pytest.raises(InvalidArgument, match="exists"):
        generate_key_pair(tmp_path / "keys", "cars")
    private.chmod(0o640)
    with pytest.raises(InvalidArgument, match="readable by other users"):
        load_private_key(private)


GOOD = issue_token(SERVICE_KEY, service="app", scopes=["read"], now=NOW, ttl_s=600)
_, _GOOD_BODY, _GOOD_SIG = GOOD.split(".")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "expected 'v2"),
        ("v1.e30.abc", "expected 'v2"),
        ("v2.a.b.c", "expected 'v2"),
        ("x" * (MAX_TOKEN_CHARS + 1), "longer than"),
        (f"v2.{_GOOD_BODY}.{_GOOD_SIG}!", "base64url"),  # junk after the signature
        (f"v2.{_GOOD_BODY}.{_GOOD_SIG}==", "base64url"),  # padding
        (f"v2.{_GOOD_BODY}.{_GOOD_SIG[:-1]}*", "base64url"),
        (f"v2.{_GOOD_BODY} .{_GOOD_SIG}", "base64url"),
        (
            f"v2.{_GOOD_BODY}.{_GOOD_SIG[:-1]}{'B' if _GOOD_SIG[-1] == 'A' else 'A'}",
            "canonical|verify",
        ),
        (f"v2.{_GOOD_BODY}.{_GOOD_SIG[:-4]}", "canonical|length"),
        (f"v2.{_GOOD_BODY}.{b64encode(bytes(63))}", "length"),
        (f"v2.{_GOOD_BODY[:-2]}.{_GOOD_SIG}", "canonical|verify|base64url"),
        (f"v2.{b64encode(b'x' * 40)}.{_GOOD_SIG}", "unknown key"),
        # unsigned deeply nested claims: refused at the signature, never parsed
        (f"v2.{b64encode(b'k' * 8 + b'[' * 2500)}.{_GOOD_SIG}", "unknown key"),
        ("v2.\u00e9\u00e9.\u00e9", "base64url"),
        # signed, but the claims are wrong
        (_signed(b"[" * 2500), "not valid JSON"),
        (_signed(b'{"sub": "app", "sub": "x"}'), "not valid JSON"),
        (_signed(b"\xff\xfe"), "not valid JSON"),
        (_signed(b"[]"), "not a JSON object"),
        (_signed(_claims(sub=None)), "'sub'"),
        (_signed(_claims(sub=7)), "'sub'"),
        (_signed(_claims(kind="root")), "'kind'"),
        (_signed(_claims(jti=None)), "'jti'"),
        (_signed(_claims(scopes="read")), "'scopes'"),
        (_signed(_claims(scopes=["read", {"x": 1}])), "'scopes'"),
        (_signed(_claims(extra=1)), "unknown claims"),
        (_signed(_claims(exp=None)), "'exp'"),
        (_signed(_claims(exp=1e300)), "'exp'"),
        (_signed(_claims(exp=True)), "'exp'"),
        (_signed(_claims(exp="never")), "'exp'"),
        (_signed(_claims(exp=10**30)), "'exp'"),
        (_signed(_claims(iat=NOW + 0.5)), "'iat'"),
        (_signed(b'{"sub":"app","kind":"service","iat":1,"jti":"t","exp":Infinity}'), "JSON"),
        (_signed(b'{"sub":"app","kind":"service","iat":1,"jti":"t","exp":NaN}'), "JSON"),
        (_signed(_claims(iat=NOW + 30 * 86400, exp=NOW + 30 * 86400 + 60)), "in the future"),
        (_signed(_claims(nbf=NOW + 3600)), "not valid yet"),
        (_signed(_claims(exp=NOW - 1)), "expired"),
        (_signed(_claims(exp=NOW + 2 * 86400)), "longer than"),
        (_signed(_claims(kind="vehicle", sub="car-1"), CAR_KEY), "no scopes"),
        (_signed(_claims(vehicles="acme-*")), "'vehicles'"),
        (_signed(_claims(vehicles=[])), "'vehicles'"),
        (_signed(_claims(vehicles=["acme *"])), "'vehicles'"),
        (_signed(_claims(vehicles=["a*b"])), "'vehicles'"),
        (_signed(_claims(vehicles=["x"] * 65)), "'vehicles'"),
        (
            _signed(_claims(kind="vehicle", sub="car-1", scopes=None, vehicles=["x"]), CAR_KEY),
            "'vehicles'",
        ),
    ],
)
def test_malformed_tokens_are_unauthenticated_with_a_clear_message(token: str, reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason) as info:
        AUTH.verify(token, now=NOW)
    assert info.value.message


def test_skew_and_lifetime_limits_hold_at_their_edges() -> None:
    assert AUTH.verify(GOOD, now=NOW + 599).name == "app"
    with pytest.raises(Unauthenticated, match="expired"):
        AUTH.verify(GOOD, now=NOW + 600)
    ahead = _signed(_claims(iat=NOW + 60, exp=NOW + 600))
    assert AUTH.verify(ahead, now=NOW).name == "app"  # the issuer's clock 60 s ahead
    with pytest.raises(Unauthenticated, match="in the future"):
        AUTH.verify(ahead, now=NOW - 1)
    strict = Authenticator(
        _trusted(service=SERVICE_KEY),
        rules=TokenRules(clock_skew_s=0, max_ttl_s={"vehicle": 60, "service": 60}),
    )
    with pytest.raises(Unauthenticated, match="longer than the 60s"):
        strict.verify(GOOD, now=NOW)


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer ")],
        [("authorization", b"Bearer x")],
        [("authorization", "Bearer " + "x" * 10_000)],
    ],
)
def test_missing_or_malformed_metadata_is_unauthenticated(
    metadata: list[tuple[str, str | bytes]],
) -> None:
    with pytest.raises(Unauthenticated):
        AUTH.authenticate(metadata)


def test_insecure_dev_needs_a_named_vehicle() -> None:
    auth = Authenticator({}, insecure_dev=True)
    dev = auth.authenticate([])
    dev.require("admin")
    assert auth.vehicle_identity(dev, "car-9") == "car-9"
    with pytest.raises(Unauthenticated, match="x-vehicle-id"):
        auth.vehicle_identity(dev, None)


def test_revocation_list_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# revoked token ids\n\n")
    auth = Authenticator(_trusted(service=SERVICE_KEY), revocations=RevocationList(revoked))
    token = issue_token(SERVICE_KEY, service="app", token_id="leaked-1")
    assert auth.verify(token).token_id == "leaked-1"
    revoked.write_text("# revoked token ids\nleaked-1\n")
    assert auth.check_revocations() == 0  # nothing held, but the list is reloaded
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.verify(token)
    revoked.unlink()  # an unreadable list keeps what it revoked
    assert auth.check_revocations() == 0
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.verify(token)
    with pytest.raises(InvalidArgument, match="auth_revocation_file"):
        RevocationList(tmp_path / "missing.txt")


async def test_held_credentials_end_at_expiry_and_on_revocation(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    auth = Authenticator(_trusted(vehicle=CAR_KEY), revocations=RevocationList(revoked))
    ended: dict[str, BrokerError] = {}
    soon = Principal("vehicle", "car-1", expires_at=time.time() + 0.2, token_id="a")
    later = Principal("vehicle", "car-2", expires_at=time.time() + 3600, token_id="b")
    released = Principal("vehicle", "car-3", expires_at=time.time() + 0.1, token_id="c")
    auth.hold(soon, lambda error: ended.setdefault("a", error))
    auth.hold(later, lambda error: ended.setdefault("b", error))
    auth.hold(released, lambda error: ended.setdefault("c", error)).release()
    auth.hold(Principal("dev", "x"), lambda error: ended.setdefault("dev", error))
    await asyncio.sleep(0.4)
    assert set(ended) == {"a"} and "expired" in ended["a"].message
    revoked.write_text("b\n")
    assert auth.check_revocations() == 1
    assert set(ended) == {"a", "b"} and "revoked" in ended["b"].message
    assert auth.held == 0


def test_token_minter_renews_at_half_life() -> None:
    minter = TokenMinter(CAR_KEY, vehicle="car-1", ttl_s=3600)
    first = minter()
    assert minter() == first and minter.minted == 1
    minter._renew_at = 0  # half the lifetime has passed
    assert minter() != first and AUTH.verify(minter()).name == "car-1"


# -- fuzz: only Unauthenticated, or a valid Principal --------------------------------------


def _only_unauthenticated_or_valid(token: str) -> None:
    try:
        principal = AUTH.verify(token, now=NOW)
    except Unauthenticated as error:
        assert error.message
        return
    assert principal == Principal("service", "app", frozenset({"read"}), NOW + 600, token_id(GOOD))


def token_id(token: str) -> str:
    return AUTH.verify(token, now=NOW).token_id


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_fuzz_random_strings(text: str) -> None:
    _only_unauthenticated_or_valid(text)
    _only_unauthenticated_or_valid(f"v2.{text}")
    _only_unauthenticated_or_valid(f"v2.{_GOOD_BODY}.{text}")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(min_value=0, max_value=len(GOOD)),
            st.characters(codec="ascii") | st.sampled_from(list("-_=.+/ ")),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutations_of_a_valid_token(edits: list[tuple[str, int, str]]) -> None:
    token = GOOD
    for op, at, char in edits:
        at = min(at, len(token))
        if op == "replace" and at < len(token):
            token = token[:at] + char + token[at + 1 :]
        elif op == "insert":
            token = token[:at] + char + token[at:]
        elif op == "delete":
            token = token[:at] + token[at + 1 :]
    _only_unauthenticated_or_valid(token)
