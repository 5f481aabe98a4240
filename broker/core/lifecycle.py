"""The command lifecycle: which status changes are allowed, and what each one writes.

Every store applies these rules, so an in-memory store and the LMDB one cannot disagree
on what a delivery, an ack or an expiry does. Each transition takes the current record,
decides whether the change is allowed, and if so applies it to the record in place and
returns True; the store then persists the record and keeps its indexes in step. Nothing
here knows about persistence.

- Waiting (ACCEPTED: about to be sent, QUEUED: its car is away): `deliver` puts it on the
  wire; `cancel` and `supersede` end it while it was never sent (`abandon` too: its
  sender gave up before it was durable); at its expiry it is EXPIRED, or UNKNOWN if it
  was sent once (the car may have run it).
- On the wire (DELIVERED, then ACKED): `result` ends it SUCCEEDED or FAILED; `requeue`
  (its car went away before acking) and `recover` (a restart) make a DELIVERED one wait
  again; at its result deadline it is UNKNOWN, which a late result still refines.

Each command has exactly one timer (`timer_at`): its expiry while it waits in the queue,
its result deadline while it is on the wire, its purge time once terminal.
"""

from __future__ import annotations

import enum
import time

from broker.core.errors import Conflict, FailedPrecondition
from broker.core.store import NewCommand, NotCommittedInTime
from broker.v1 import types_pb2 as t

TERMINAL = frozenset({t.SUCCEEDED, t.FAILED, t.EXPIRED, t.CANCELED, t.SUPERSEDED, t.UNKNOWN})
NOT_YET_SENT = frozenset({t.ACCEPTED, t.QUEUED})
#: on the wire: its timer is the result deadline
ON_THE_WIRE = frozenset({t.DELIVERED, t.ACKED})
#: what a caller waiting for delivery is waiting for
DELIVERED_OR_LATER = ON_THE_WIRE | TERMINAL
#: statuses a command may be (re-)sent from
_SENDABLE = frozenset({t.ACCEPTED, t.QUEUED, t.DELIVERED})
#: sent (or about to be) but not confirmed by the car: waits for it again
_UNCONFIRMED = frozenset({t.ACCEPTED, t.DELIVERED})


def never_sent(command: t.Command) -> bool:
    """Not on the wire yet. A requeued (or recovered) QUEUED command with attempt > 0 was
    sent once, and the car may have run it: it can no longer be canceled or superseded."""
    return command.status in NOT_YET_SENT and command.attempt == 0


def timer_at(command: t.Command, retention_ms: int) -> int:
    """When the command's one timer is due (see the module docstring)."""
    if command.status in TERMINAL:
        return int(command.updated_at_ms + retention_ms)
    if command.status in ON_THE_WIRE:
        return int(command.result_deadline_ms)
    return int(command.expires_at_ms)


def in_idempotency_window(command: t.Command, *, now_ms: int, window_ms: int) -> bool:
    """Whether a retry with the command's idempotency key must still find it."""
    return command.created_at_ms + window_ms > now_ms


def _move(command: t.Command, status: t.CommandStatus, now_ms: int) -> None:
    command.status = status
    command.updated_at_ms = now_ms


# -- creation ------------------------------------------------------------------------------


def check_commit_by(item: NewCommand) -> None:
    """Refuse (before anything is written) a command whose sender's deadline has passed."""
    if item.commit_by_s and time.monotonic() >= item.commit_by_s:
        raise NotCommittedInTime()


def repeats(earlier: t.Command, item: NewCommand, *, now_ms: int, window_ms: int) -> bool:
    """Whether `item` repeats `earlier`, the command its idempotency key names: then the
    caller gets `earlier` instead of a new command. Conflict if the key, still in its
    window, was used for a different vehicle, name or payload."""
    if not in_idempotency_window(earlier, now_ms=now_ms, window_ms=window_ms):
        return False
    if (earlier.vehicle_id, earlier.name, earlier.payload) != (
        item.vehicle_id,
        item.name,
        item.payload,
    ):
        raise Conflict(  # the caller's own command: keys are per caller
            f"idempotency key {item.idempotency_key!r} was used for command "
            f"{earlier.command_id} with a different vehicle, name or payload"
        )
    return True


def resends(existing: t.Command | None, item: NewCommand) -> bool:
    """Whether `item`, a command whose sender chose (and signed) its id, is a resend of
    `existing`, the command already stored under that id: then the sender gets
    `existing` back. Conflict if the id is taken by anything else."""
    if existing is None:
        return False
    if existing.sender == item.sender and item.signed == existing.signed:
        return True
    raise Conflict(f"command id {item.command_id!r} is already taken")


def new_record(
    item: NewCommand,
    *,
    command_id: str,
    seq: int,
    online: bool,
    now_ms: int,
    result_timeout_ms: int | None = None,
) -> t.Command:
    """A new command's record: ACCEPTED (about to be sent) for a car that is online, else
    QUEUED; DELIVERED when `result_timeout_ms` is given (it goes to the car right after
    the commit, as if `deliver` had run in the same write)."""
    command = t.Command(
        command_id=command_id,
        vehicle_id=item.vehicle_id,
        name=item.name,
        payload=item.payload,
        lane=item.lane,  # type: ignore[arg-type]
        status=t.ACCEPTED if online else t.QUEUED,
        created_at_ms=now_ms,
        updated_at_ms=now_ms,
        expires_at_ms=item.expires_at_ms or now_ms + item.ttl_ms,
        idempotency_key=item.idempotency_key,
        sender=item.sender,
        coalesce_key=item.coalesce_key,
        seq=seq,
    )
    if item.signed is not None:
        command.signed.CopyFrom(item.signed)
    if result_timeout_ms is not None:
        command.status = t.DELIVERED
        command.attempt = 1
        command.delivered_at_ms = now_ms
        command.result_deadline_ms = now_ms + result_timeout_ms
    return command


def supersede(older: t.Command, *, by: str, now_ms: int) -> bool:
    """A newer command with the same coalesce key replaces `older` if it was never sent."""
    if not never_sent(older):
        return False
    _move(older, t.SUPERSEDED, now_ms)
    older.status_reason = f"superseded by {by}"
    return True


# -- on the wire ---------------------------------------------------------------------------


def deliver(command: t.Command, *, now_ms: int, result_timeout_ms: int) -> bool:
    """The command goes on the wire (again): attempt + 1, a new result deadline. Refused
    once terminal or past its expires_at (the timer settles it then)."""
    if command.status not in _SENDABLE or now_ms >= command.expires_at_ms:
        return False
    attempt, delivered_at_ms = command.attempt + 1, command.delivered_at_ms or now_ms
    _move(command, t.DELIVERED, now_ms)
    command.attempt = attempt
    command.delivered_at_ms = delivered_at_ms  # the first delivery is kept
    command.result_deadline_ms = now_ms + result_timeout_ms
    return True


def ack(command: t.Command, *, now_ms: int, result_timeout_ms: int) -> bool:
    """The car has the command. Refused if stale (terminal, acked already) or for a
    command never sent. A re-queued command the car says it has (its Hello) is on the
    wire again only now: it gets a new result deadline, `result_timeout_ms` from now."""
    if command.status not in (t.DELIVERED, t.QUEUED) or command.attempt == 0:
        return False
    if command.status == t.QUEUED:
        command.result_deadline_ms = now_ms + result_timeout_ms
    _move(command, t.ACKED, now_ms)
    return True


def result(
    command: t.Command,
    *,
    vehicle_id: str,
    success: bool,
    message: str,
    detail: bytes,
    now_ms: int,
) -> bool:
    """The car's outcome. A late result refines UNKNOWN; other terminals are final.
    Refused for a command never sent, or from a car it is not for."""
    if command.attempt == 0 or command.vehicle_id != vehicle_id:
        return False
    if command.status in TERMINAL and command.status != t.UNKNOWN:
        return False
    reason = "result arrived after the result timeout" if command.status == t.UNKNOWN else ""
    _move(command, t.SUCCEEDED if success else t.FAILED, now_ms)
    command.result_message = message
    command.result_detail = detail
    command.status_reason = reason
    return True


def requeue(command: t.Command, *, now_ms: int) -> bool:
    """The car went away: a command sent but not acked waits for it again (attempt kept,
    result deadline cleared: it is re-sent, with a new one, when the car is back)."""
    if command.status not in _UNCONFIRMED:
        return False
    _move(command, t.QUEUED, now_ms)
    command.result_deadline_ms = 0
    return True


def recover(command: t.Command, *, now_ms: int) -> bool:
    """After a restart: what was on the wire is QUEUED again (sessions did not survive);
    an acked command stays ACKED, its result may still come."""
    return requeue(command, now_ms=now_ms)


# -- ended by the broker -------------------------------------------------------------------


def abandon(command: t.Command, *, now_ms: int) -> bool:
    """Its sender gave up before it was durable: CANCELED, never to be sent (the store
    also releases its idempotency key, so the sender's retry creates it afresh)."""
    if command.status in TERMINAL:
        return False
    _move(command, t.CANCELED, now_ms)
    command.status_reason = (
        "not accepted: it became durable only after its sender's deadline; never sent"
    )
    return True


def cancel(command: t.Command, *, now_ms: int) -> bool:
    """Cancel by request; FailedPrecondition once the command may have reached the car.
    (A command that does not exist is the store's NotFound, as for a read.)"""
    if not never_sent(command):
        raise FailedPrecondition(
            f"command {command.command_id} is {t.CommandStatus.Name(command.status)}; "
            "only a command not yet delivered can be canceled"
        )
    _move(command, t.CANCELED, now_ms)
    command.status_reason = "canceled by request"
    return True


class Due(enum.Enum):
    """What a store does with a command whose timer is due (`timer_due`)."""

    #: terminal and past its retention: drop it and every index entry naming it
    PURGE = "purge"
    #: moved to UNKNOWN or EXPIRED (in place): persist it
    SETTLED = "settled"


def timer_due(command: t.Command, *, now_ms: int) -> Due:
    """The command's timer (`timer_at`) is due: purge it, or settle it as EXPIRED (never
    sent) or UNKNOWN (it may have been executed)."""
    if command.status in TERMINAL:
        return Due.PURGE
    if command.status in ON_THE_WIRE:
        _move(command, t.UNKNOWN, now_ms)
        command.status_reason = (
            "delivered, but no result before the result timeout; it may have been executed"
        )
    elif command.attempt == 0:
        _move(command, t.EXPIRED, now_ms)
        command.status_reason = "expired before delivery"
    else:
        _move(command, t.UNKNOWN, now_ms)
        command.status_reason = (
            f"sent (attempt {command.attempt}) but its car went away before confirming it, "
            "and it expired before the car was back; it may have been executed"
        )
    return Due.SETTLED
