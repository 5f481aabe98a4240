"""Who is calling: call metadata -> a `Principal`, and the life of a credential on a stream.

A call carries `authorization: Bearer <token>` (broker/security/tokens.py: Ed25519, a key
per role, strict decoding). A vehicle token binds one vehicle id (the car can only open
its own stream); a service token carries scopes. mTLS produces the same `Principal` from
a certificate, so nothing past `authenticate` cares which was used.

A credential is checked when a call starts and, for calls that last (car streams,
watches), for as long as they last: `hold` ends the call with UNAUTHENTICATED when its
token expires, or within about a second of its id appearing on the revocation list.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from broker.core.errors import BrokerError, PermissionDenied, Unauthenticated
from broker.security.keys import TrustedKey
from broker.security.revocation import RevocationList
from broker.security.tokens import MAX_TOKEN_CHARS, SCOPES, TokenRules, check_token
from broker.wire import VEHICLE_ID_HEADER

__all__ = ["SCOPES", "Authenticator", "Hold", "Principal"]

logger = logging.getLogger(__name__)

#: how often the revocation list's file is looked at (and revoked streams ended)
REVOCATION_CHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: a vehicle (bound to its id) or a service (with scopes)."""

    kind: str  # "vehicle" | "service" | "dev"
    name: str
    scopes: frozenset[str] = frozenset()
    #: Unix seconds after which the credential is no longer valid (inf: never)
    expires_at: float = math.inf
    #: the token's id (`jti`), which revocation names; "" for a credential without one
    token_id: str = ""
    #: the vehicle patterns (exact ids, or prefixes ending in `*`) a service is limited
    #: to; None: every vehicle
    vehicles: tuple[str, ...] | None = None

    @property
    def actor(self) -> str:
        """The name commands, audit records and per-caller limits know it by."""
        return f"{self.kind}:{self.name}"

    def has(self, scope: str) -> bool:
        if self.kind == "dev" or "admin" in self.scopes or scope in self.scopes:
            return True
        return scope == "read" and "read:fleet" in self.scopes  # fleet-wide includes its own

    def require(self, scope: str) -> None:
        if self.kind == "vehicle":  # whatever its claims say: a car credential is a car's
            raise PermissionDenied("a vehicle token cannot call the command service")
        if self.has(scope):
            return
        raise PermissionDenied(f"token for service {self.name!r} lacks the {scope!r} scope")


class Hold:
    """A long-lived call's claim on its credential; `release` when the call ends."""

    __slots__ = ("_end", "_holds", "_timer", "token_id")

    def __init__(
        self,
        holds: set[Hold] | None,
        token_id: str,
        end: Callable[[BrokerError], object],
    ) -> None:
        self._holds = holds
        self.token_id = token_id
        self._end = end
        self._timer: asyncio.TimerHandle | None = None

    def end(self, error: BrokerError) -> None:
        if self._holds is not None and self in self._holds:
            self.release()
            self._end(error)

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._holds is not None:
            self._holds.discard(self)


class Authenticator:
    """Turns call metadata into a `Principal`, or raises UNAUTHENTICATED / PERMISSION_DENIED.

    `keys` are the public keys this broker trusts (key id -> key and the one kind it may
    sign); nothing here can mint a token.
    """

    def __init__(
        self,
        keys: Mapping[bytes, TrustedKey],
        *,
        rules: TokenRules | None = None,
        revocations: RevocationList | None = None,
        insecure_dev: bool = False,
    ) -> None:
        self._keys = dict(keys)
        self._rules = rules or TokenRules()
        self.revocations = revocations or RevocationList(None)
        self._insecure_dev = insecure_dev
        self._holds: set[Hold] = set()

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        claims = check_token(token, self._keys, self._rules, now=now)
        if claims.token_id in self.revocations:
            raise Unauthenticated(f"token {claims.token_id} is revoked")
        return Principal(
            claims.kind,
            claims.subject,
            claims.scopes,
            claims.expires_at,
            claims.token_id,
            claims.vehicles,
        )

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller behind this metadata; in insecure-dev mode, anyone is `dev`."""
        token = None
        for key, value in metadata or ():
            if key == "authorization":
                if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS + 16:
                    raise Unauthenticated("authorization metadata is not a bearer token")
                scheme, _, rest = value.partition(" ")
                if scheme.lower() != "bearer" or not rest.strip():
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

    # -- credentials of calls that last ----------------------------------------------------

    def hold(self, principal: Principal, end: Callable[[BrokerError], object]) -> Hold:
        """Call `end(Unauthenticated)` when `principal`'s credential expires or is revoked,
        unless the hold is released first. Call inside the event loop."""
        if not principal.token_id and principal.expires_at == math.inf:
            return Hold(None, "", end)  # insecure-dev: nothing to end
        hold = Hold(self._holds, principal.token_id, end)
        self._holds.add(hold)
        if principal.expires_at != math.inf:
            delay_s = max(0.0, principal.expires_at - time.time())
            hold._timer = asyncio.get_running_loop().call_later(
                delay_s,
                hold.end,
                Unauthenticated("token expired; reconnect with a fresh token"),
            )
        return hold

    def check_revocations(self) -> int:
        """Re-read the revocation list if its file changed and end the held calls whose
        tokens it now names; returns how many were ended."""
        if not self.revocations.refresh():
            return 0
        revoked = self.revocations.revoked
        ended = [hold for hold in self._holds if hold.token_id in revoked]
        for hold in ended:
            hold.end(Unauthenticated(f"token {hold.token_id} is revoked"))
        if ended:
            logger.info("ended %d streams whose tokens were revoked", len(ended))
        return len(ended)

    async def run(self) -> None:
        """The revocation check, about once a second, until cancelled."""
        while True:
            await asyncio.sleep(REVOCATION_CHECK_S)
            try:
                self.check_revocations()
            except Exception:  # the check must outlive any one bad stream
                logger.exception("revocation check failed")

    @property
    def held(self) -> int:
        """Calls whose credential is being watched."""
        return len(self._holds)
