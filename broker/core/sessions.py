"""Live vehicle streams: at most one per car; a newer connection replaces the older."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from broker.core.errors import BrokerError, Replaced, Unavailable
from broker.core.quotas import STREAM_BUDGET, STREAM_BUDGET_VEHICLE, Refusals, TokenBuckets
from broker.v1 import types_pb2 as t

#: Put in a session's outbox to end its stream.
CLOSE = object()


class CommandOut:
    """A command waiting in a car's outbox, and the attempt it goes out as. `recorded`:
    its delivery is on disk already (it was created DELIVERED), so the stream writes it
    without recording it again; otherwise the stream records it first and takes the
    attempt the store gives it (broker/core/stream.py)."""

    __slots__ = ("attempt", "command", "recorded")

    def __init__(self, command: t.Command, attempt: int, recorded: bool) -> None:
        self.command = command
        self.attempt = attempt
        self.recorded = recorded


class Outbox:
    """A car's frames waiting to be written, for exactly one reader (its stream's writer).

    Lighter than `asyncio.Queue` (~200 bytes against ~3.3 KB per connected car): a list
    and, while the writer waits, one future.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, limit: int) -> list[Any]:
        """Wait for at least one item; return up to `limit` of them, oldest first."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken, self._items = self._items[:limit], self._items[limit:]
        return taken

    def __len__(self) -> int:
        return len(self._items)


class Session:
    """One car's live stream, as the dispatcher sees it: an outbox of frames and commands."""

    __slots__ = (
        "close_error",
        "closed",
        "connected_since_ms",
        "heartbeats",
        "last_heard_s",
        "outbox",
        "session_id",
        "task",
        "vehicle_id",
    )

    def __init__(self, vehicle_id: str, *, now_ms: int) -> None:
        self.vehicle_id = vehicle_id
        self.session_id = os.urandom(8).hex()
        self.connected_since_ms = now_ms
        #: monotonic time of the last frame from the car (liveness)
        self.last_heard_s = time.monotonic()
        #: the car said (Hello) it sends heartbeats: silence means a dead link
        self.heartbeats = False
        self.outbox = Outbox()
        #: Why the stream ended; None for a clean end (the car hung up).
        self.close_error: BrokerError | None = None
        self.closed = False
        #: the stream's handler, cancelled when the link is found dead (its write to the
        #: car may be stuck in flow control, never to return on its own)
        self.task: asyncio.Task[Any] | None = None

    def send(self, frame: Any) -> None:
        """Queue a ready frame (a Control frame)."""
        if not self.closed:
            self.outbox.put(frame)

    def send_command(self, command: t.Command, attempt: int) -> None:
        """Queue a command; the stream records its delivery before writing it."""
        if not self.closed:
            self.outbox.put(CommandOut(command, attempt, recorded=False))

    def send_recorded(self, command: t.Command) -> None:
        """Queue a command whose delivery the store has recorded already (its attempt)."""
        if not self.closed:
            self.outbox.put(CommandOut(command, command.attempt, recorded=True))

    def close(self, error: BrokerError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self.outbox.put(CLOSE)


class SessionRegistry:
    """vehicle_id -> its live session."""

    def __init__(self) -> None:
        self._by_vehicle: dict[str, Session] = {}

    def attach(self, session: Session) -> None:
        """Make `session` the car's live one; close the one it replaces."""
        old = self._by_vehicle.get(session.vehicle_id)
        self._by_vehicle[session.vehicle_id] = session
        if old is not None:
            old.close(Replaced("replaced by a newer connection for this vehicle"))

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the live one; True if it was."""
        if self._by_vehicle.get(session.vehicle_id) is session:
            del self._by_vehicle[session.vehicle_id]
            return True
        return False

    def get(self, vehicle_id: str) -> Session | None:
        return self._by_vehicle.get(vehicle_id)

    def __contains__(self, vehicle_id: object) -> bool:
        return vehicle_id in self._by_vehicle

    def __len__(self) -> int:
        return len(self._by_vehicle)

    def all(self) -> list[Session]:
        return list(self._by_vehicle.values())

    def close_silent(self, timeout_s: float) -> int:
        """Close the streams the broker has heard nothing on for `timeout_s`: their links
        died without a FIN (a NAT timeout, a handover), so their cars are gone even if
        the socket still looks open. Only cars that said they send heartbeats are
        judged (an older car is left to the transport's keepalive). Returns how many
        were closed."""
        heard_after = time.monotonic() - timeout_s
        silent = [
            s
            for s in self._by_vehicle.values()
            if s.last_heard_s < heard_after and s.heartbeats and not s.closed
        ]
        for session in silent:
            session.close(Unavailable(f"nothing heard from this car for {timeout_s:g}s: dead link"))
            if session.task is not None:
                session.task.cancel()
        return len(silent)


class StreamDeferred(Unavailable):
    """A new vehicle stream told to come back later (storm control); `reason` says which
    budget deferred it: the fleet's (`stream_budget`) or its own car's
    (`stream_budget_vehicle`)."""

    def __init__(self, message: str, *, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.reason = reason


class StreamGate:
    """Admits new vehicle streams at a bounded rate, so a reconnect storm is spread out.

    A token bucket: `rate_per_s` new streams a second, bursts up to `burst`. A stream
    refused here is told when to come back (UNAVAILABLE with a jittered retry-after that
    grows with the backlog), so a whole fleet reconnecting after a crash arrives as a
    ramp the broker can take instead of a wall that knocks it over again.

    Before the fleet's bucket, each car credential has its own (`vehicle_rate_per_s`,
    `vehicle_burst`): a car reconnecting in a loop is deferred on it (told the wait for
    its next token) and never reaches the fleet's, so it cannot spend the budget of the
    others. A car deferred by the fleet's bucket gets its own token back. The cars'
    buckets are forgotten once refilled, and at most `max_vehicles` are held.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        max_wait_s: float = 60.0,
        vehicle_rate_per_s: float = 0.5,
        vehicle_burst: float = 10.0,
        max_vehicles: int = 100_000,
        refusals: Refusals | None = None,
    ) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._tokens = burst
        self._updated = time.monotonic()
        self._max_wait_s = max_wait_s
        self._deferred_recently = 0.0  # decays: how many were told to wait lately
        self._vehicle_rate = vehicle_rate_per_s
        self._vehicle_burst = vehicle_burst
        self._vehicles = TokenBuckets(max_buckets=max_vehicles)
        self.refusals = refusals if refusals is not None else Refusals()
        self.admitted = 0
        #: deferred by the fleet's bucket, and by a car's own
        self.deferred = 0
        self.deferred_vehicle = 0

    @property
    def vehicle_buckets(self) -> int:
        """Cars' stream buckets held (bounded by `max_vehicles`)."""
        return len(self._vehicles)

    def admit(self, vehicle_id: str | None = None) -> None:
        """Take a token (the car's own, then the fleet's) or raise StreamDeferred
        (UNAVAILABLE) with a jittered retry-after."""
        if vehicle_id is not None:
            wait_s = self._vehicles.take(vehicle_id, self._vehicle_rate, self._vehicle_burst)
            if wait_s:
                self.deferred_vehicle += 1
                self.refusals.count(STREAM_BUDGET_VEHICLE)
                retry_ms = int(random.uniform(1.0, 1.5) * wait_s * 1000) + 1
                raise StreamDeferred(
                    f"this car opened more than {self._vehicle_burst:g} streams lately "
                    f"({self._vehicle_rate:g} a second allowed); reconnect in {retry_ms} ms",
                    reason=STREAM_BUDGET_VEHICLE,
                    retry_after_ms=retry_ms,
                )
        now = time.monotonic()
        elapsed = now - self._updated
        self._updated = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._deferred_recently = max(0.0, self._deferred_recently - elapsed * self._rate)
        if self._tokens >= 1:
            self._tokens -= 1
            self.admitted += 1
            return
        if vehicle_id is not None:
            self._vehicles.give_back(vehicle_id, self._vehicle_burst)
        self.deferred += 1
        self.refusals.count(STREAM_BUDGET)
        self._deferred_recently += 1
        # Spread everyone told to wait over the time the backlog needs at our rate.
        backlog_s = min(self._max_wait_s, max(1.0, self._deferred_recently / self._rate))
        retry_ms = int(random.uniform(0.5, 1.0) * backlog_s * 1000)
        raise StreamDeferred(
            "the broker is admitting new vehicle streams at a bounded rate; reconnect later",
            reason=STREAM_BUDGET,
            retry_after_ms=retry_ms,
        )
