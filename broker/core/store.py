"""The command store as the domain sees it: the `Store` interface and its types.

Two implementations: `broker.storage.lmdb_store.LmdbStore` (durable, the broker's) and
`broker.storage.memory.MemoryStore` (for unit tests of the domain). Both apply the rules
of `broker.core.lifecycle`; they differ only in where the records live.

Every operation returns a future that completes on the event loop after the operation
is done (for LMDB: committed, fsynced by default), in the order the operations were
submitted. Records handed out are copies: changing one changes nothing stored.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Container, Mapping, Sequence
from typing import NamedTuple, Protocol

from broker.core.errors import BrokerError, StoreUnavailable, retry_hint_ms
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t


class NewCommand(NamedTuple):
    """A validated request to enqueue one command (policy already applied)."""

    vehicle_id: str
    name: str
    payload: bytes
    lane: int
    ttl_ms: int
    idempotency_key: str = ""
    #: the caller, who owns the command: its idempotency and coalesce keys never match
    #: another sender's
    sender: str = ""
    coalesce_key: str = ""
    #: monotonic time (time.monotonic()) after which it must not be written: its
    #: sender has given up, or it waited longer than a critical command may; 0 = none
    commit_by_s: float = 0.0
    #: a command signed end to end: its envelope (kept verbatim), and the command id and
    #: absolute expiry the sender chose and signed (they replace a new id and `ttl_ms`)
    signed: t.SignedCommand | None = None
    command_id: str = ""
    expires_at_ms: int = 0


class Created(NamedTuple):
    command: t.Command
    deduplicated: bool
    superseded: tuple[t.Command, ...]  # older commands this one coalesced away


class NotCommittedInTime(StoreUnavailable):
    """Not accepted: it could not be made durable before `NewCommand.commit_by_s`.

    Either nothing was written, or (`abandoned`) it became durable too late and is
    canceled before anything is sent; a retry with the same idempotency key is safe.
    """

    def __init__(self, *, abandoned: bool = False) -> None:
        what = (
            "it became durable only after its deadline and is canceled, never sent"
            if abandoned
            else "nothing was written"
        )
        super().__init__(
            "not accepted: the store could not make it durable in time (the store is "
            f"slow or stalled); {what}; a retry is safe",
            retry_after_ms=retry_hint_ms(),
        )


def new_command_id(now_ms: int) -> str:
    """Time-ordered, unguessable: 12 hex digits of milliseconds, 12 of randomness."""
    return f"{now_ms:012x}{os.urandom(6).hex()}"


class Store(Protocol):
    """Commands, their indexes and timers, and the last known vehicle states."""

    # -- lifetime ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving operations; their futures complete on `loop`."""

    async def close(self) -> None:
        """Finish everything submitted, then refuse more (StoreUnavailable)."""

    # -- gauges and counters (read at scrape time) ---------------------------------------

    @property
    def pending(self) -> int:
        """Non-terminal commands (the durable queue's depth)."""

    @property
    def clock_reference(self) -> tuple[int, int, str]:
        """`(highest broker time written, boot-time clock ns then, boot id)`, for
        `Clock.resume` (zeros and "" for a new store)."""

    @property
    def room_bytes(self) -> int:
        """Room left for more data."""

    @property
    def reserve_bytes(self) -> int:
        """Below this much room new commands are refused (`space_problem`)."""

    @property
    def space_refusals(self) -> int:
        """New commands refused for lack of room."""

    @property
    def commits(self) -> int:
        """Writes made durable (an LMDB group commit holds many operations)."""

    @property
    def operations(self) -> int:
        """Operations completed."""

    def space_problem(self, *, critical: bool = False) -> str | None:
        """Why new commands must be refused now for lack of space, or None. Critical
        commands may use half of the reserve."""

    # -- commands ------------------------------------------------------------------------

    def create(
        self,
        items: Sequence[NewCommand],
        *,
        online: Container[str],
        now_ms: int,
        deliver: Mapping[int, int] = ...,
    ) -> asyncio.Future[list[Created | BrokerError]]:
        """Enqueue commands in one write; per-item errors come back in place of a result.

        A command for a vehicle in `online` starts ACCEPTED (about to be sent), else QUEUED.
        `deliver` maps item positions to result timeouts (ms): those start DELIVERED, as if
        `mark_delivered` had run in the same write. An idempotency key still in its window
        returns the command it names (`deduplicated`); a coalesce key supersedes the older
        holder of the key if that was never sent.
        """

    def mark_delivered(
        self, deliveries: Sequence[tuple[str, int]], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """Record that commands go on the wire: `(command_id, result_timeout_ms)` pairs.
        Returns those recorded; one not returned must not be sent."""

    def mark_acked(
        self, command_id: str, *, now_ms: int, result_timeout_ms: int
    ) -> asyncio.Future[t.Command | None]:
        """The car has the command; None if the ack is stale."""

    def record_result(
        self,
        command_id: str,
        *,
        vehicle_id: str,
        success: bool,
        message: str,
        detail: bytes,
        now_ms: int,
    ) -> asyncio.Future[t.Command | None]:
        """The car's outcome; None when stale, unknown, or from another car."""

    def requeue(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """The car went away: commands sent but not acked wait for it again."""

    def abandon(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """Commands whose sender gave up before they were durable: CANCELED, never sent,
        their idempotency keys released."""

    def cancel(self, command_id: str, *, now_ms: int) -> asyncio.Future[t.Command]:
        """Cancel a command never sent; NotFound, or FailedPrecondition once sent."""

    def fire_timers(
        self, *, now_ms: int, limit: int = 1000
    ) -> asyncio.Future[tuple[list[t.Command], int]]:
        """Expire, time out and purge what is due: `(changed commands, timers due)`;
        fewer than `limit` due means nothing due is left."""

    def recover(self, *, now_ms: int, senders: dict[str, int] | None = None) -> asyncio.Future[int]:
        """After a start: what was on the wire is QUEUED again. Returns how many commands
        are pending; with `senders`, also adds each sender's count of them to it (read it
        once the future is done)."""

    def load_pending(
        self, vehicle_ids: Sequence[str], *, limit: int | None = None
    ) -> asyncio.Future[dict[str, list[t.Command]]]:
        """Each vehicle's non-terminal commands, in dispatch order (lane, then FIFO): the
        first `limit` of them (per vehicle), or all."""

    def get(self, command_id: str) -> asyncio.Future[t.Command]:
        """A command; NotFound if there is none (never created, or purged)."""

    def list_vehicle(
        self, vehicle_id: str, *, limit: int, sender: str | None = None
    ) -> asyncio.Future[list[t.Command]]:
        """A vehicle's commands (only those `sender` sent, if given), newest first."""

    # -- vehicle state -------------------------------------------------------------------

    def put_states(self, states: Sequence[svc.VehicleState]) -> asyncio.Future[None]:
        """Store vehicle states (as they are now: later changes to them are not written)."""

    def get_state(self, vehicle_id: str) -> asyncio.Future[svc.VehicleState | None]:
        """A vehicle's stored state, or None."""
