"""End-to-end signed commands: the sender signs, the car checks, the broker only carries.

A sender (`CommandSigner`, with its own Ed25519 key: `broker keys command-keygen`) signs
a `CommandBody` (key id, vehicle id, command id, name, payload, issued-at, expires-at)
and sends the envelope `SignedCommand{body, signature}`; the broker stores it and copies
it verbatim into every CommandFrame of that command. The signature is Ed25519 over
`SIGNING_CONTEXT + body`, the exact serialized body bytes.

The car (`CommandVerifier`, given to `broker.sdk.vehicle.VehicleAgent`) parses those
exact bytes, never a re-encoding, and executes the body's name and payload, not the
frame's. It refuses (`Refused`, which the agent reports as a FAILED result "refused:
<reason>", the handler never called), in this order:

1. unsigned, where the frame's name requires a signature (`require_signatures`);
2. a malformed envelope (no body, a signature that is not 64 bytes) or body (not a
   CommandBody, not its canonical encoding: every field once, in number order, no
   default-valued field, no unknown field; a key id that is not 8 bytes; an empty
   vehicle id, command id or name; expires-at not after issued-at);
3. an unknown key id; 4. a bad signature;
5. a name that key may not sign;
6. another vehicle's command; 7. a command id other than the frame's (an old envelope
   under a new id);
8. issued in the future (beyond `clock_skew_ms` of the car's clock), a lifetime longer
   than `max_lifetime_ms`, or expired (the car's clock at or past expires-at: never
   executed late);
9. replayed: a command id this car has run before (`ReplayGuard`: ids kept until their
   signed expiry, bounded in number).

Strictness, chosen: a body must be the canonical encoding, so no two parsers can read one
signed body two ways (a repeated field is last-wins in one library, first-wins in
another), and a field this car does not know (a future restriction it cannot honour) is
refused rather than ignored. docs/security.md ("End-to-end signed commands") is the
format for implementers in other languages, and the threat model.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.core.clock import now_ms as clock_now_ms
from broker.core.store import new_command_id
from broker.security import keys
from broker.security.keys import KEY_ID_BYTES, key_id, load_private_key
from broker.v1 import types_pb2 as t

#: what the signature covers, before the body: a signature made for anything else (a
#: token, another protocol) never verifies as a command
SIGNING_CONTEXT = b"broker.v1.CommandBody\x00"
SIGNATURE_BYTES = 64
#: the broker's command id rule (broker.core.commands.ID_PATTERN, which the SDKs may not
#: import): a sender-chosen id must pass it or the broker refuses the send
COMMAND_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
#: how far ahead of the car's clock a command's issued-at may be (the sender's clock ahead)
CLOCK_SKEW_MS = 60_000
#: the longest lifetime (expires-at - issued-at) a car accepts: the broker's own cap
MAX_LIFETIME_MS = 7 * 86400 * 1000
#: command ids a car remembers at most (see `ReplayGuard`)
REPLAY_MAX = 100_000
#: a reason quotes at most this much of a value it names
_SHOWN = 80


class Refused(Exception):
    """A command the car must not execute; `reason` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _shown(value: str) -> str:
    return repr(value[:_SHOWN])


def signed_bytes(body: bytes) -> bytes:
    """The exact bytes an Ed25519 signature of a command covers."""
    return SIGNING_CONTEXT + body


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A sender's public key file; a private key is refused: a car must hold the senders'
    public keys only."""
    return keys.load_public_key(path, holder="give the car the public key")


# -- the sender ---------------------------------------------------------------------------------


class CommandSigner:
    """Signs commands with one sender's private key (the broker never holds it)."""

    def __init__(
        self, private_key: Ed25519PrivateKey, *, clock: Callable[[], int] = clock_now_ms
    ) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())
        self._clock = clock

    @classmethod
    def from_file(cls, path: Path) -> CommandSigner:
        """From a private key file (refused if other users may read it)."""
        return cls(load_private_key(path))

    def sign(
        self,
        vehicle_id: str,
        name: str,
        payload: bytes = b"",
        *,
        ttl_s: float | None = None,
        expires_at_ms: int | None = None,
        command_id: str | None = None,
        now_ms: int | None = None,
    ) -> t.SignedCommand:
        """An envelope for `vehicle_id` expiring `ttl_s` from now, or at `expires_at_ms`
        (exactly one of them). The command id is new (time-ordered, unguessable) unless
        given; resend the same envelope to retry (the broker deduplicates it)."""
        issued = self._clock() if now_ms is None else now_ms
        if (ttl_s is None) == (expires_at_ms is None):
            raise ValueError("give exactly one of ttl_s and expires_at_ms")
        expires = issued + round((ttl_s or 0) * 1000) if expires_at_ms is None else expires_at_ms
        if expires <= issued:
            raise ValueError("a signed command must expire after it is issued")
        command_id = new_command_id(issued) if command_id is None else command_id
        if not COMMAND_ID_PATTERN.fullmatch(command_id):
            raise ValueError(f"command id must match {COMMAND_ID_PATTERN.pattern}")
        body = t.CommandBody(
            key_id=self.key_id,
            vehicle_id=vehicle_id,
            command_id=command_id,
            name=name,
            payload=payload,
            issued_at_ms=issued,
            expires_at_ms=expires,
        ).SerializeToString(deterministic=True)
        return t.SignedCommand(body=body, signature=self._key.sign(signed_bytes(body)))


# -- the car --------------------------------------------------------------------------------------


class ReplayGuard:
    """The command ids a car has run, each kept until its signed expiry.

    After that a replay is refused as expired, so the set holds only what could still be
    replayed. It is bounded: past `max_entries` it forgets the id that expires first and
    from then on refuses every command expiring no later than that one (`floor_ms`):
    it may then refuse a command it never saw, never run one twice.

    It lives in memory: a car that restarts forgets it (the expiry bounds that window).
    To keep it across restarts, save `snapshot()` and pass it back as `entries`.
    """

    def __init__(
        self,
        max_entries: int = REPLAY_MAX,
        entries: Iterable[tuple[str, int]] = (),
        floor_ms: int = 0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self.floor_ms = floor_ms
        self._expiry: dict[str, int] = {}
        self._by_expiry: list[tuple[int, str]] = []
        for command_id, expires_at_ms in entries:
            self.add(command_id, expires_at_ms)

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._expiry

    def forget_expired(self, now_ms: int) -> None:
        """Drop ids whose command expired (`now_ms` at or past its expiry)."""
        heap = self._by_expiry
        while heap and heap[0][0] <= now_ms:
            _, command_id = heapq.heappop(heap)
            self._expiry.pop(command_id, None)

    def check(self, command_id: str, expires_at_ms: int) -> None:
        """Refused if `command_id` ran before, or its expiry is below the floor."""
        if command_id in self._expiry:
            raise Refused(f"replayed: command {_shown(command_id)} was already executed")
        if expires_at_ms <= self.floor_ms:
            raise Refused(
                "replay memory full: this car cannot tell whether it ran a command "
                f"expiring at or before {self.floor_ms}"
            )

    def add(self, command_id: str, expires_at_ms: int) -> None:
        if command_id in self._expiry:
            return
        self._expiry[command_id] = expires_at_ms
        heapq.heappush(self._by_expiry, (expires_at_ms, command_id))
        while len(self._expiry) > self.max_entries:
            expiry, old = heapq.heappop(self._by_expiry)
            del self._expiry[old]
            self.floor_ms = max(self.floor_ms, expiry)

    def snapshot(self) -> tuple[list[tuple[str, int]], int]:
        """`(entries, floor_ms)`: what `ReplayGuard(entries=..., floor_ms=...)` restores."""
        return sorted(self._expiry.items(), key=lambda item: item[1]), self.floor_ms


@dataclass(frozen=True)
class TrustedCommandKey:
    """A sender's public key a car trusts, and the command names it may sign (None: all)."""

    public_key: Ed25519PublicKey
    names: frozenset[str] | None = None


def trusted_key(path: Path, names: Iterable[str] | None = None) -> tuple[bytes, TrustedCommandKey]:
    """`(key id, TrustedCommandKey)` from a public key file, for `CommandVerifier`."""
    public_key = load_public_key(path)
    return key_id(public_key), TrustedCommandKey(
        public_key, None if names is None else frozenset(names)
    )


class CommandVerifier:
    """What a car checks before it executes a command (the module docstring's order).

    `trusted`: key id -> `TrustedCommandKey` (or a `(public key, names or None)` pair).
    `require_signatures`: True (every command), False (none: an unsigned command runs as
    sent; a signed one is still checked) or the names that need one. `clock`: the car's
    own clock in Unix milliseconds, which decides expiry (never the broker's); it must
    not step back (the default, broker.core.clock.now_ms, does not) or the replay memory
    could forget an id too early.
    """

    def __init__(
        self,
        trusted: Mapping[bytes, TrustedCommandKey | tuple[Ed25519PublicKey, Iterable[str] | None]],
        *,
        require_signatures: bool | Iterable[str] = True,
        clock: Callable[[], int] = clock_now_ms,
        clock_skew_ms: int = CLOCK_SKEW_MS,
        max_lifetime_ms: int = MAX_LIFETIME_MS,
        replay: ReplayGuard | None = None,
    ) -> None:
        self._trusted: dict[bytes, TrustedCommandKey] = {}
        for kid, entry in trusted.items():
            if len(kid) != KEY_ID_BYTES:
                raise ValueError(f"a key id is {KEY_ID_BYTES} bytes, got {kid!r}")
            if not isinstance(entry, TrustedCommandKey):
                public_key, names = entry
                entry = TrustedCommandKey(public_key, None if names is None else frozenset(names))
            if key_id(entry.public_key) != kid:
                raise ValueError(f"key id {kid.hex()} is not that public key's")
            self._trusted[kid] = entry
        self._require: bool | frozenset[str] = (
            require_signatures
            if isinstance(require_signatures, bool)
            else frozenset(require_signatures)
        )
        self._clock = clock
        self._skew_ms = clock_skew_ms
        self._max_lifetime_ms = max_lifetime_ms
        self.replay = replay if replay is not None else ReplayGuard()

    def requires_signature(self, name: str) -> bool:
        require = self._require
        return require if isinstance(require, bool) else name in require

    def check(
        self, frame: Any, vehicle_id: str, now_ms: int | None = None, *, record: bool = True
    ) -> tuple[str, bytes]:
        """The `(name, payload)` to execute for a CommandFrame, or `Refused`. A signed
        command that passes is remembered as run (`record=False`: checked only)."""
        if not frame.HasField("signed"):
            if self.requires_signature(frame.name):
                raise Refused(f"unsigned: this car requires a signature for {_shown(frame.name)}")
            return frame.name, frame.payload
        body = self._verified_body(frame.signed)
        if body.vehicle_id != vehicle_id:
            raise Refused(
                f"signed for vehicle {_shown(body.vehicle_id)}, not this one ({_shown(vehicle_id)})"
            )
        if body.command_id != frame.command_id:
            raise Refused(
                f"command id mismatch: signed as {_shown(body.command_id)}, delivered as "
                f"{_shown(frame.command_id)}"
            )
        now = self._clock() if now_ms is None else now_ms
        if body.issued_at_ms > now + self._skew_ms:
            raise Refused(
                f"issued in the future: {body.issued_at_ms - now} ms ahead of this car's clock"
            )
        if body.expires_at_ms - body.issued_at_ms > self._max_lifetime_ms:
            raise Refused(
                f"lifetime of {(body.expires_at_ms - body.issued_at_ms) // 1000} s is above "
                f"the {self._max_lifetime_ms // 1000} s this car accepts"
            )
        if now >= body.expires_at_ms:
            raise Refused(
                f"expired: at {body.expires_at_ms}, {now - body.expires_at_ms} ms before "
                "this car's clock"
            )
        replay = self.replay
        replay.forget_expired(now)
        replay.check(body.command_id, body.expires_at_ms)
        if record:
            replay.add(body.command_id, body.expires_at_ms)
        return body.name, body.payload

    def _verified_body(self, envelope: Any) -> t.CommandBody:
        raw: bytes = envelope.body
        if not raw or len(envelope.signature) != SIGNATURE_BYTES:
            raise Refused("malformed envelope: it needs a body and a 64-byte signature")
        try:
            body = t.CommandBody.FromString(raw)
        except Exception:  # protobuf's DecodeError, or worse for hostile bytes
            raise Refused("malformed body: not a CommandBody") from None
        body.DiscardUnknownFields()
        if body.SerializeToString(deterministic=True) != raw:
            raise Refused(
                "malformed body: not the canonical encoding (a repeated, unknown, "
                "out-of-order or default-valued field)"
            )
        if len(body.key_id) != KEY_ID_BYTES:
            raise Refused(f"malformed body: a key id is {KEY_ID_BYTES} bytes")
        if not (body.vehicle_id and body.command_id and body.name):
            raise Refused("malformed body: vehicle id, command id and name are required")
        if body.expires_at_ms <= body.issued_at_ms:
            raise Refused("malformed body: it expires before it is issued")
        trusted = self._trusted.get(body.key_id)
        if trusted is None:
            raise Refused(f"unknown signing key {body.key_id.hex()}")
        try:
            trusted.public_key.verify(envelope.signature, signed_bytes(raw))
        except InvalidSignature:
            raise Refused(f"bad signature (key {body.key_id.hex()})") from None
        if trusted.names is not None and body.name not in trusted.names:
            raise Refused(f"key {body.key_id.hex()} may not sign {_shown(body.name)}")
        return body
