"""Signed commands without a broker: the envelope, every refusal reason, the replay memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.core.errors import InvalidArgument
from broker.security.keys import generate_key_pair, key_id
from broker.security.signing import (
    CLOCK_SKEW_MS,
    SIGNING_CONTEXT,
    CommandSigner,
    CommandVerifier,
    Refused,
    ReplayGuard,
    TrustedCommandKey,
    load_public_key,
    signed_bytes,
    trusted_key,
)
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link

NOW = 1_700_000_000_000
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()


def signer(key: Ed25519PrivateKey = KEY) -> CommandSigner:
    return CommandSigner(key, clock=lambda: NOW)


def verifier(**kwargs: Any) -> CommandVerifier:
    kwargs.setdefault("clock", lambda: NOW)
    trusted = kwargs.pop("trusted", {key_id(KEY.public_key()): (KEY.public_key(), None)})
    return CommandVerifier(trusted, **kwargs)


def frame(envelope: t.SignedCommand | None, command_id: str | None = None, **fields: Any) -> Any:
    """The CommandFrame a broker would send for `envelope` (its id from the body)."""
    if envelope is not None and command_id is None:
        command_id = t.CommandBody.FromString(envelope.body).command_id
    return link.CommandFrame(command_id=command_id or "c-1", signed=envelope, **fields)


def signed_raw(raw: bytes, key: Ed25519PrivateKey = KEY) -> t.SignedCommand:
    """Any bytes, signed by a key holder: what only strictness can refuse."""
    return t.SignedCommand(body=raw, signature=key.sign(signed_bytes(raw)))


def body(**changes: Any) -> t.CommandBody:
    fields: dict[str, Any] = {
        "key_id": key_id(KEY.public_key()),
        "vehicle_id": "car-1",
        "command_id": "cmd-1",
        "name": "unlock",
        "payload": b'{"door":"all"}',
        "issued_at_ms": NOW,
        "expires_at_ms": NOW + 60_000,
    }
    fields.update(changes)
    return t.CommandBody(**fields)


def refusal(check: CommandVerifier, command: Any, vehicle_id: str = "car-1", **kw: Any) -> str:
    with pytest.raises(Refused) as info:
        check.check(command, vehicle_id, **kw)
    return info.value.reason


# -- the honest path ------------------------------------------------------------------------


def test_an_honest_command_passes_and_the_body_is_what_runs() -> None:
    envelope = signer().sign("car-1", "unlock", b'{"door":"all"}', ttl_s=30)
    # The frame's unsigned copies say something else: the body is what runs.
    command = frame(envelope, name="lock", payload=b"evil")
    assert verifier().check(command, "car-1") == ("unlock", b'{"door":"all"}')


def test_the_signature_covers_the_context_then_the_exact_body_bytes() -> None:
    envelope = signer().sign("car-1", "unlock", ttl_s=30, command_id="cmd-7")
    KEY.public_key().verify(envelope.signature, SIGNING_CONTEXT + envelope.body)
    assert SIGNING_CONTEXT == b"broker.v1.CommandBody\x00"
    parsed = t.CommandBody.FromString(envelope.body)
    assert parsed.key_id == key_id(KEY.public_key()) and len(parsed.key_id) == 8
    assert (parsed.vehicle_id, parsed.command_id, parsed.name) == ("car-1", "cmd-7", "unlock")
    assert (parsed.issued_at_ms, parsed.expires_at_ms) == (NOW, NOW + 30_000)
    # Without the context the signature is worthless (a signature made for anything else
    # never verifies as a command).
    bare = signed_raw(envelope.body)
    bare.signature = KEY.sign(envelope.body)
    assert "bad signature" in refusal(verifier(), frame(bare))


def test_signer_ids_expiry_and_arguments() -> None:
    one = signer()
    first = t.CommandBody.FromString(one.sign("car-1", "lock", ttl_s=1).body)
    second = t.CommandBody.FromString(one.sign("car-1", "lock", ttl_s=1).body)
    assert first.command_id != second.command_id  # new, unguessable ids
    assert first.command_id.startswith(f"{NOW:012x}")  # time-ordered like the broker's
    at = t.CommandBody.FromString(one.sign("car-1", "lock", expires_at_ms=NOW + 5).body)
    assert at.expires_at_ms == NOW + 5
    with pytest.raises(ValueError, match="exactly one"):
        one.sign("car-1", "lock")
    with pytest.raises(ValueError, match="exactly one"):
        one.sign("car-1", "lock", ttl_s=1, expires_at_ms=NOW + 5)
    with pytest.raises(ValueError, match="expire after"):
        one.sign("car-1", "lock", expires_at_ms=NOW)
    with pytest.raises(ValueError, match="command id"):
        one.sign("car-1", "lock", ttl_s=1, command_id="not an id!")


def test_key_files(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "keys", "sender")
    from_file = CommandSigner.from_file(private)
    kid, trusted = trusted_key(public, ["unlock", "lock"])
    assert kid == from_file.key_id
    assert trusted.names == frozenset({"unlock", "lock"})
    assert trusted_key(public)[1].names is None
    assert key_id(load_public_key(public)) == kid
    with pytest.raises(InvalidArgument, match="private key"):
        load_public_key(private)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(InvalidArgument, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(InvalidArgument, match="No such file"):
        load_public_key(tmp_path / "missing.pem")


def test_the_verifier_refuses_a_key_listed_under_another_keys_id() -> None:
    with pytest.raises(ValueError, match="not that public key"):
        CommandVerifier({key_id(OTHER_KEY.public_key()): TrustedCommandKey(KEY.public_key())})
    with pytest.raises(ValueError, match="8 bytes"):
        CommandVerifier({b"short": TrustedCommandKey(KEY.public_key())})


# -- unsigned -----------------------------------------------------------------------------------


def test_unsigned_commands_follow_the_policy() -> None:
    unsigned = link.CommandFrame(command_id="c-1", name="unlock", payload=b"p")
    assert "unsigned" in refusal(verifier(), unsigned)  # default: every name needs one
    assert "unsigned" in refusal(verifier(require_signatures={"unlock"}), unsigned)
    assert verifier(require_signatures={"horn"}).check(unsigned, "car-1") == ("unlock", b"p")
    assert verifier(require_signatures=False).check(unsigned, "car-1") == ("unlock", b"p")


def test_a_signed_command_is_checked_even_where_no_signature_is_required() -> None:
    envelope = signer(OTHER_KEY).sign("car-1", "unlock", ttl_s=30)
    assert "unknown signing key" in refusal(verifier(require_signatures=False), frame(envelope))


# -- malformed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        (t.SignedCommand(body=b"", signature=b"s" * 64), "malformed envelope"),
        (t.SignedCommand(body=body().SerializeToString(), signature=b"s" * 63), "64-byte"),
        (signed_raw(b"\xff\xff\xff"), "not a CommandBody"),
        (signed_raw(b"\x12\x02\xff\xfe"), "not a CommandBody"),  # vehicle id not UTF-8
        # A repeated field: last-wins here, first-wins elsewhere. Refused, though signed.
        (
            signed_raw(
                body().SerializeToString() + t.CommandBody(vehicle_id="car-2").SerializeToString()
            ),
            "canonical",
        ),
        (signed_raw(body().SerializeToString() + b"\x40\x01"), "canonical"),  # unknown field 8
        (
            signed_raw(body(vehicle_id="").SerializeToString() + b"\x12\x05car-1"),
            "canonical",
        ),  # out of order
        (signed_raw(body(payload=b"").SerializeToString() + b"\x2a\x00"), "canonical"),  # default
        (signed_raw(body(key_id=b"1234").SerializeToString()), "key id is 8 bytes"),
        (signed_raw(body(vehicle_id="").SerializeToString()), "are required"),
        (signed_raw(body(command_id="").SerializeToString()), "are required"),
        (signed_raw(body(name="").SerializeToString()), "are required"),
        (signed_raw(body(expires_at_ms=NOW).SerializeToString()), "expires before"),
    ],
)
def test_malformed_envelopes_and_bodies_are_refused(envelope: Any, reason: str) -> None:
    assert reason in refusal(verifier(), frame(envelope, command_id="cmd-1"))


# -- keys and signatures -----------------------------------------------------------------------


def test_an_unknown_key_is_refused() -> None:
    envelope = signer(OTHER_KEY).sign("car-1", "unlock", ttl_s=30)
    reason = refusal(verifier(), frame(envelope))
    assert reason == f"unknown signing key {key_id(OTHER_KEY.public_key()).hex()}"


@pytest.mark.parametrize(
    "change",
    [
        {"payload": b'{"door":"driver"}'},  # altered
        {"vehicle_id": "car-2"},  # retargeted
        {"expires_at_ms": NOW + 3_600_000},  # re-dated: extended
        {"issued_at_ms": NOW + 1},  # re-dated
        {"name": "lock"},
        {"command_id": "cmd-2"},
    ],
)
def test_any_change_to_a_signed_body_breaks_the_signature(change: dict[str, Any]) -> None:
    envelope = signed_raw(body().SerializeToString())
    envelope.body = body(**change).SerializeToString()  # the broker's edit, same signature
    assert "bad signature" in refusal(verifier(), frame(envelope, command_id="cmd-1"))


def test_a_flipped_signature_bit_is_refused() -> None:
    envelope = signer().sign("car-1", "unlock", ttl_s=30)
    envelope.signature = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    assert "bad signature" in refusal(verifier(), frame(envelope))


def test_a_key_signs_only_the_names_it_is_trusted_for() -> None:
    check = verifier(trusted={key_id(KEY.public_key()): (KEY.public_key(), ["climate"])})
    reason = refusal(check, frame(signer().sign("car-1", "unlock", ttl_s=30)))
    assert reason == f"key {key_id(KEY.public_key()).hex()} may not sign 'unlock'"
    assert check.check(frame(signer().sign("car-1", "climate", ttl_s=30)), "car-1")[0] == "climate"


# -- which car, which id --------------------------------------------------------------------------


def test_another_cars_command_is_refused() -> None:
    envelope = signer().sign("car-2", "unlock", ttl_s=30)
    assert (
        refusal(verifier(), frame(envelope)) == "signed for vehicle 'car-2', not this one ('car-1')"
    )


def test_an_old_envelope_under_a_new_id_is_refused() -> None:
    envelope = signer().sign("car-1", "unlock", ttl_s=30, command_id="old")
    reason = refusal(verifier(), frame(envelope, command_id="new"))
    assert reason == "command id mismatch: signed as 'old', delivered as 'new'"


def test_reasons_quote_at_most_80_characters_of_what_the_broker_sent() -> None:
    envelope = signer().sign("car-1", "unlock", ttl_s=30)
    reason = refusal(verifier(), frame(envelope, command_id="x" * 5000))
    assert len(reason) < 300


# -- time ---------------------------------------------------------------------------------------


def test_expiry_is_decided_by_the_cars_clock() -> None:
    envelope = signer().sign("car-1", "unlock", ttl_s=60)
    assert "expired" in refusal(verifier(), frame(envelope), now_ms=NOW + 60_000)
    assert "expired" in refusal(verifier(clock=lambda: NOW + 61_000), frame(envelope))
    assert verifier().check(frame(envelope), "car-1", now_ms=NOW + 59_999)[0] == "unlock"


def test_issued_in_the_future_beyond_the_skew_is_refused() -> None:
    ahead = CommandSigner(KEY, clock=lambda: NOW + CLOCK_SKEW_MS + 1)
    assert "issued in the future" in refusal(
        verifier(), frame(ahead.sign("car-1", "lock", ttl_s=5))
    )
    within = CommandSigner(KEY, clock=lambda: NOW + CLOCK_SKEW_MS)
    assert verifier().check(frame(within.sign("car-1", "lock", ttl_s=5)), "car-1")[0] == "lock"


def test_a_lifetime_above_the_cars_cap_is_refused() -> None:
    envelope = signer().sign("car-1", "lock", ttl_s=3601)
    assert "lifetime" in refusal(verifier(max_lifetime_ms=3_600_000), frame(envelope))


# -- replay ---------------------------------------------------------------------------------------


def test_a_command_runs_once() -> None:
    check = verifier()
    command = frame(signer().sign("car-1", "unlock", ttl_s=30, command_id="once"))
    assert check.check(command, "car-1", record=False)[0] == "unlock"  # checked only
    assert check.check(command, "car-1")[0] == "unlock"
    assert "once" in check.replay
    assert refusal(check, command) == "replayed: command 'once' was already executed"


def test_the_replay_memory_forgets_ids_once_they_expired() -> None:
    check = verifier()
    for index, ttl_s in enumerate((1, 2, 3)):
        check.check(frame(signer().sign("car-1", "lock", ttl_s=ttl_s, command_id=f"c{index}")),
                    "car-1")  # fmt: skip
    assert len(check.replay) == 3
    later = frame(signer().sign("car-1", "lock", ttl_s=10, command_id="later"))
    check.check(later, "car-1", now_ms=NOW + 2_000)  # c0 and c1 expired: forgotten
    assert len(check.replay) == 2 and "c0" not in check.replay and "c2" in check.replay
    # A replay of a forgotten one is refused all the same: it expired.
    old = frame(signer().sign("car-1", "lock", ttl_s=1, command_id="c0"))
    assert "expired" in refusal(check, old, now_ms=NOW + 2_000)


def test_the_replay_memory_is_bounded_and_never_lets_a_replay_through() -> None:
    guard = ReplayGuard(max_entries=3)
    check = verifier(replay=guard)
    sent = [
        frame(signer().sign("car-1", "lock", ttl_s=10 + i, command_id=f"c{i}")) for i in range(4)
    ]
    for command in sent:
        check.check(command, "car-1")
    assert len(guard) == 3 and "c0" not in guard
    assert guard.floor_ms == NOW + 10_000  # c0's expiry: nothing expiring by then runs
    assert "replay memory full" in refusal(check, sent[0])  # c0 again: refused, not run
    short = frame(signer().sign("car-1", "lock", ttl_s=9, command_id="short"))
    assert "replay memory full" in refusal(check, short)  # unseen, but cannot be told apart
    fresh = frame(signer().sign("car-1", "lock", ttl_s=60, command_id="fresh"))
    assert check.check(fresh, "car-1")[0] == "lock"


def test_the_replay_memory_can_be_kept_across_restarts() -> None:
    first = verifier()
    command = frame(signer().sign("car-1", "unlock", ttl_s=30, command_id="kept"))
    first.check(command, "car-1")
    entries, floor = first.replay.snapshot()
    assert entries == [("kept", NOW + 30_000)]
    restarted = verifier(replay=ReplayGuard(entries=entries, floor_ms=floor))
    assert "replayed" in refusal(restarted, command)
    with pytest.raises(ValueError):
        ReplayGuard(max_entries=0)


def test_refusals_remember_nothing() -> None:
    check = verifier()
    envelope = signer().sign("car-1", "unlock", ttl_s=30, command_id="x")
    refusal(check, frame(envelope, command_id="y"))
    refusal(check, frame(envelope), vehicle_id="car-2")
    assert len(check.replay) == 0
    assert check.check(frame(envelope), "car-1")[0] == "unlock"


def test_the_documented_test_vector() -> None:
    """docs/security.md's vector, for implementers in other languages: keep them equal."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    envelope = CommandSigner(key).sign(
        "car-1", "unlock", b'{"door":"all"}', expires_at_ms=1_700_000_060_000,
        command_id="018bcfe56800a1b2c3d4e5f6", now_ms=1_700_000_000_000,
    )  # fmt: skip
    assert key_id(key.public_key()).hex() == "56475aa75463474c"
    assert envelope.body.hex() == (
        "0a0856475aa75463474c12056361722d311a18303138626366653536383030613162326333643465"
        "3566362206756e6c6f636b2a0e7b22646f6f72223a22616c6c227d3080d095ffbc3138e0a499ffbc31"
    )
    assert envelope.signature.hex() == (
        "cd577b3629d4cc1d96271d10065fa13a0790af908daab27c838dc9d7ec1ea9d8"
        "14870640e44d1e64de3f46eafcb70a3a734bd1bc14452fb19e3d129a9d6cea05"
    )
    check = CommandVerifier({key_id(key.public_key()): (key.public_key(), None)},
                            clock=lambda: 1_700_000_000_000)  # fmt: skip
    assert check.check(frame(envelope), "car-1") == ("unlock", b'{"door":"all"}')
