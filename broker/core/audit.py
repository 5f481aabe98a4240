"""The audit trail, without I/O: who sent, cancelled, superseded and read what, and every
refusal, as one `AuditEvent` each.

`AuditTrail.record` is what callers use. It is cheap (an event built and appended to a
buffer; no I/O, no serialization) and never raises: the audit trail must not fail or
slow the call it records. Where the events go is a subclass's business:
`broker/storage/audit_log.py` writes them as JSON lines, `MemoryAuditTrail` keeps them
for tests, `NullAuditTrail` forgets them.

Denials (`DENY`) are rate limited per actor (`DenialLimiter`), so a peer that floods the
broker with refused calls can neither grow the buffer nor turn the trail into a disk
writer: past the limit, denials are counted and summed up in one `suppressed` line per
actor every few seconds.

An event never holds a payload, a token or a key: its fields are ids, names, status
names and a refusal's message (the broker's own text, which names no secret), each
bounded.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from broker.core import clock

logger = logging.getLogger(__name__)

# What happened (`AuditEvent.action`). The domain's actions:
SEND = "send"
CANCEL = "cancel"
SUPERSEDE = "supersede"
GET = "get"
LIST = "list"
WATCH = "watch"
STATE = "state"
#: a call or stream refused (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
#: UNAVAILABLE); `method` names the RPC, `outcome` the status
DENY = "deny"
# The trail's own lines (actor `BROKER`): it began, it ended cleanly, it went on after a
# line cut short by an unclean stop, files removed by retention.
START = "start"
STOP = "stop"
RECOVER = "recover"
PRUNE = "prune"

#: the outcome of an action done as asked
OK = "ok"
#: a send that found the command its idempotency key names
DEDUPLICATED = "deduplicated"
#: the outcome of a summary line: `count` denials of `actor` not recorded one by one
SUPPRESSED = "suppressed"
#: the actor of the trail's own lines
BROKER = "broker"
#: the actor suppressed denials are counted under once `DenialLimiter.max_actors` are
OTHER_ACTORS = "*"

#: the longest text kept in a string field (a refusal's message, mostly); longer is cut
MAX_FIELD_CHARS = 256


class AuditEvent(NamedTuple):
    """One line of the trail. Empty strings (and a zero `tally`) are fields not given."""

    #: broker time (Unix milliseconds, broker/core/clock.py)
    at_ms: int
    action: str
    #: who: a principal's `actor` ("service:fleet-app", "vehicle:car-1"), "peer:<address>"
    #: for a caller refused before it proved who it is, or `BROKER`
    actor: str
    outcome: str = OK
    vehicle_id: str = ""
    command_id: str = ""
    #: the command's name ("unlock")
    name: str = ""
    #: the RPC ("SendCommand", "Connect"), for denials
    method: str = ""
    #: grpc's peer string ("ipv4:10.0.0.7:51234")
    peer: str = ""
    #: why: a refusal's message; what a summary or a broker line says
    reason: str = ""
    #: how many denials a `SUPPRESSED` line stands for (the line's `count`; a tuple's
    #: own `count` keeps its name)
    tally: int = 0

    def fields(self) -> dict[str, str | int]:
        """The event as a JSON object's fields, in a fixed order, without empty ones;
        strings cut at `MAX_FIELD_CHARS`."""
        out: dict[str, str | int] = {
            "at_ms": self.at_ms,
            "actor": self.actor[:MAX_FIELD_CHARS],
            "action": self.action[:MAX_FIELD_CHARS],
            "outcome": self.outcome[:MAX_FIELD_CHARS],
        }
        for key, value in zip(_OPTIONAL_FIELDS, self[4:10], strict=True):
            if value:
                out[key] = value[:MAX_FIELD_CHARS]
        if self.tally:
            out["count"] = self.tally
        return out


#: the string fields written only when given, in their order
_OPTIONAL_FIELDS = AuditEvent._fields[4:10]


class DenialLimiter:
    """At most `per_actor` denials per actor and `total` in all are recorded one by one
    per `window_ms`; the rest are counted (`suppressed`) and summed up, per actor, in one
    `SUPPRESSED` event each `summary_every_ms` (`due`).

    Memory is bounded: the window's counts hold at most `total` actors, the pending
    summaries at most `max_actors` (the rest are counted under `OTHER_ACTORS`). So a
    flood writes at most `total` lines per window plus `max_actors + 1` summaries per
    `summary_every_ms`, whatever it sends and from however many addresses.
    """

    __slots__ = (
        "_counts",
        "_next_summary_ms",
        "_pending",
        "_recorded",
        "_window_start_ms",
        "max_actors",
        "per_actor",
        "summary_every_ms",
        "suppressed",
        "total",
        "window_ms",
    )

    def __init__(
        self,
        *,
        per_actor: int = 10,
        total: int = 200,
        window_ms: int = 1000,
        summary_every_ms: int = 10_000,
        max_actors: int = 100,
    ) -> None:
        self.per_actor = per_actor
        self.total = total
        self.window_ms = window_ms
        self.summary_every_ms = summary_every_ms
        self.max_actors = max_actors
        #: denials counted instead of recorded one by one (metrics)
        self.suppressed = 0
        self._window_start_ms = -(1 << 62)
        self._counts: dict[str, int] = {}
        self._recorded = 0
        #: actor -> [count, method of the latest, outcome of the latest]
        self._pending: dict[str, list[str | int]] = {}
        self._next_summary_ms = -(1 << 62)

    def allow(self, event: AuditEvent) -> bool:
        """Whether to record this denial one by one (else it is counted)."""
        now_ms = event.at_ms
        if now_ms - self._window_start_ms >= self.window_ms:
            self._window_start_ms = now_ms
            self._counts.clear()
            self._recorded = 0
        actor = event.actor
        seen = self._counts.get(actor, 0)
        if seen < self.per_actor and self._recorded < self.total:
            self._counts[actor] = seen + 1
            self._recorded += 1
            return True
        self.suppressed += 1
        pending = self._pending
        if actor not in pending and len(pending) >= self.max_actors:
            actor = OTHER_ACTORS
        entry = pending.get(actor)
        if entry is None:
            pending[actor] = [1, event.method, event.outcome]
        else:
            entry[0] = int(entry[0]) + 1
            entry[1] = event.method
            entry[2] = event.outcome
        return False

    def due(self, now_ms: int, *, final: bool = False) -> list[AuditEvent]:
        """The summaries to record now (all pending ones if `final`), oldest actor first."""
        if not self._pending or (not final and now_ms < self._next_summary_ms):
            return []
        self._next_summary_ms = now_ms + self.summary_every_ms
        pending, self._pending = self._pending, {}
        return [
            AuditEvent(
                now_ms,
                DENY,
                actor,
                SUPPRESSED,
                method=str(method),
                reason=(
                    f"{count} more denials (the latest {outcome}) not recorded one by one: "
                    f"over {self.per_actor} per actor or {self.total} in all per "
                    f"{self.window_ms / 1000:g}s"
                ),
                tally=int(count),
            )
            for actor, (count, method, outcome) in pending.items()
        ]


class AuditTrail:
    """Where audit events go: `record` them; a subclass says what `_append` does.

    `record` is called on the event loop (the domain and the gRPC adapters). `tick` is
    called by whoever drains the trail (every ~200 ms) to add the denial summaries due.
    """

    def __init__(
        self,
        *,
        now_ms: Callable[[], int] = clock.now_ms,
        limiter: DenialLimiter | None = None,
    ) -> None:
        self.now_ms = now_ms
        self.limiter = DenialLimiter() if limiter is None else limiter
        #: events lost before they were stored (a full buffer; the store adds its own)
        self.dropped_full = 0
        self._failed = False

    def record(
        self,
        action: str,
        actor: str,
        *,
        outcome: str = OK,
        vehicle_id: str = "",
        command_id: str = "",
        name: str = "",
        method: str = "",
        peer: str = "",
        reason: str = "",
    ) -> None:
        """Record that `actor` did `action` (to `vehicle_id` / `command_id`, a command
        named `name`) with `outcome`: `OK`, `DEDUPLICATED`, or a status name. Never
        raises; costs about a microsecond."""
        try:
            event = AuditEvent(
                self.now_ms(), action, actor, outcome, vehicle_id, command_id, name,
                method, peer, reason[:MAX_FIELD_CHARS],
            )  # fmt: skip
            if action == DENY and not self.limiter.allow(event):
                return
            self._append(event)
        except Exception:
            self.dropped_full += 1
            if not self._failed:
                self._failed = True
                logger.exception("audit record lost (logged once)")

    def deny(
        self,
        actor: str,
        outcome: str,
        method: str,
        *,
        peer: str = "",
        reason: str = "",
        vehicle_id: str = "",
        command_id: str = "",
    ) -> None:
        """Record a refusal (rate limited per actor, see `DenialLimiter`)."""
        self.record(
            DENY, actor, outcome=outcome, method=method, peer=peer, reason=reason,
            vehicle_id=vehicle_id, command_id=command_id,
        )  # fmt: skip

    def tick(self, *, final: bool = False) -> None:
        """Add the denial summaries that are due (all of them if `final`)."""
        for event in self.limiter.due(self.now_ms(), final=final):
            self._append(event)

    def _append(self, event: AuditEvent) -> None:
        raise NotImplementedError

    # what the metrics read (a subclass that stores events sets these)

    @property
    def written(self) -> int:
        """Events stored."""
        return 0

    @property
    def dropped(self) -> int:
        """Events lost: the buffer was full, or the store could not write them."""
        return self.dropped_full

    @property
    def suppressed(self) -> int:
        """Denials counted in a summary instead of recorded one by one."""
        return self.limiter.suppressed


class NullAuditTrail(AuditTrail):
    """Forgets every event (a `Handlers` built without a trail)."""

    def _append(self, event: AuditEvent) -> None:
        pass


class MemoryAuditTrail(AuditTrail):
    """Keeps the last `max_events` events in memory (unit tests)."""

    def __init__(
        self,
        *,
        max_events: int = 100_000,
        now_ms: Callable[[], int] = clock.now_ms,
        limiter: DenialLimiter | None = None,
    ) -> None:
        super().__init__(now_ms=now_ms, limiter=limiter)
        self.events: deque[AuditEvent] = deque(maxlen=max_events)

    def _append(self, event: AuditEvent) -> None:
        self.events.append(event)

    @property
    def written(self) -> int:
        return len(self.events)

    def select(
        self,
        action: str | None = None,
        *,
        actor: str | None = None,
        vehicle_id: str | None = None,
        command_id: str | None = None,
        outcome: str | None = None,
    ) -> list[AuditEvent]:
        """The events with these fields, oldest first."""
        return [
            e
            for e in self.events
            if _matches(
                e,
                (
                    ("action", action),
                    ("actor", actor),
                    ("vehicle_id", vehicle_id),
                    ("command_id", command_id),
                    ("outcome", outcome),
                ),
            )
        ]


def _matches(event: AuditEvent, wanted: Iterable[tuple[str, str | None]]) -> bool:
    return all(value is None or getattr(event, key) == value for key, value in wanted)
