"""An in-memory `Store`: the LMDB store's semantics without LMDB, for unit tests.

The same rules (`broker/core/lifecycle.py`) decide every status change; the records live
in a dict and the indexes are derived from them when asked (pending order, timers,
listings), except the idempotency and coalesce keys, which name one command each.

Like the LMDB store, every operation returns a future that completes on the event loop,
in submission order; the operation itself runs at once (there is no writer thread), so
one submitted later sees the effects of one submitted earlier. Records handed out are
copies. Room is unlimited: `space_problem` never refuses.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import TypeVar

from broker.core import clock, lifecycle
from broker.core.errors import BrokerError, NotFound, StoreUnavailable
from broker.core.lifecycle import TERMINAL
from broker.core.store import Created, NewCommand, new_command_id
from broker.core.store import Store as StoreInterface
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t

T = TypeVar("T")
_NOTHING: Mapping[int, int] = MappingProxyType({})
#: what `room_bytes` reports: more than anything a test writes
UNLIMITED_BYTES = 1 << 62


class MemoryStore(StoreInterface):
    """Commands and vehicle states in dicts; nothing survives the object."""

    def __init__(
        self, *, retention_ms: int = 7 * 86_400_000, idempotency_window_ms: int = 86_400_000
    ) -> None:
        self._retention_ms = retention_ms
        self._idempotency_window_ms = idempotency_window_ms
        self._commands: dict[str, t.Command] = {}
        #: (idempotency scope, idempotency key) -> the command it names
        self._idem: dict[tuple[str, str], str] = {}
        #: (vehicle_id, coalesce key) -> the newest command holding it
        self._coalesce: dict[tuple[str, str, str], str] = {}
        self._states: dict[str, bytes] = {}
        self._seq = 0
        self._clock_reference = (0, 0, "")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._operations = 0

    # -- lifetime, gauges and counters ---------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def close(self) -> None:
        self._closed = True

    @property
    def pending(self) -> int:
        return sum(1 for _ in self._pending_of(None))

    @property
    def clock_reference(self) -> tuple[int, int, str]:
        return self._clock_reference

    #: room is unlimited: nothing is refused for lack of it
    room_bytes = UNLIMITED_BYTES
    reserve_bytes = 0
    space_refusals = 0

    @property
    def commits(self) -> int:
        """Every operation is its own commit."""
        return self._operations

    @property
    def operations(self) -> int:
        return self._operations

    def space_problem(self, *, critical: bool = False) -> str | None:
        return None

    # -- commands ------------------------------------------------------------------------

    def create(
        self,
        items: Sequence[NewCommand],
        *,
        online: Container[str],
        now_ms: int,
        deliver: Mapping[int, int] = _NOTHING,
    ) -> asyncio.Future[list[Created | BrokerError]]:
        def op() -> list[Created | BrokerError]:
            out: list[Created | BrokerError] = []
            for index, item in enumerate(items):
                try:
                    is_online = item.vehicle_id in online
                    out.append(self._create_one(item, is_online, now_ms, deliver.get(index)))
                except BrokerError as exc:
                    out.append(exc)
            return out

        return self._submit(op)

    def _create_one(
        self, item: NewCommand, online: bool, now_ms: int, result_timeout_ms: int | None
    ) -> Created:
        lifecycle.check_commit_by(item)
        if item.command_id:
            existing = self._commands.get(item.command_id)
            if lifecycle.resends(existing, item):
                return Created(_copy(existing), True, ())  # type: ignore[arg-type]
        idem = (item.sender, item.idempotency_key)
        if item.idempotency_key:
            earlier = self._commands.get(self._idem.get(idem, ""))
            window_ms = self._idempotency_window_ms
            if earlier is not None and lifecycle.repeats(
                earlier, item, now_ms=now_ms, window_ms=window_ms
            ):
                return Created(_copy(earlier), True, ())
        self._seq += 1
        command = lifecycle.new_record(
            item,
            command_id=item.command_id or new_command_id(now_ms),
            seq=self._seq,
            online=online,
            now_ms=now_ms,
            result_timeout_ms=result_timeout_ms,
        )
        superseded: tuple[t.Command, ...] = ()
        if item.coalesce_key:
            coalesce = (item.vehicle_id, item.sender, item.coalesce_key)
            supersede = partial(lifecycle.supersede, by=command.command_id, now_ms=now_ms)
            older = self._change(self._coalesce.get(coalesce, ""), supersede)
            superseded = () if older is None else (older,)
            self._coalesce[coalesce] = command.command_id
        if item.idempotency_key:
            self._idem[idem] = command.command_id
        self._commands[command.command_id] = command
        self._stamp(now_ms)
        return Created(_copy(command), False, superseded)

    def mark_delivered(
        self, deliveries: Sequence[tuple[str, int]], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        def op() -> list[t.Command]:
            changed = []
            for command_id, timeout_ms in deliveries:
                deliver = partial(lifecycle.deliver, now_ms=now_ms, result_timeout_ms=timeout_ms)
                command = self._change(command_id, deliver)
                if command is not None:
                    changed.append(command)
            return changed

        return self._submit(op)

    def mark_acked(
        self, command_id: str, *, now_ms: int, result_timeout_ms: int
    ) -> asyncio.Future[t.Command | None]:
        ack = partial(lifecycle.ack, now_ms=now_ms, result_timeout_ms=result_timeout_ms)
        return self._submit(lambda: self._change(command_id, ack))

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
        result = partial(
            lifecycle.result,
            vehicle_id=vehicle_id,
            success=success,
            message=message,
            detail=detail,
            now_ms=now_ms,
        )
        return self._submit(lambda: self._change(command_id, result))

    def requeue(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        requeue = partial(lifecycle.requeue, now_ms=now_ms)
        return self._submit(lambda: self._change_all(command_ids, requeue))

    def abandon(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        def op() -> list[t.Command]:
            changed = self._change_all(command_ids, partial(lifecycle.abandon, now_ms=now_ms))
            for command in changed:
                self._release_idempotency_key(command)
            return changed

        return self._submit(op)

    def cancel(self, command_id: str, *, now_ms: int) -> asyncio.Future[t.Command]:
        def op() -> t.Command:
            command = self._found(command_id)
            lifecycle.cancel(command, now_ms=now_ms)
            self._stamp(now_ms)
            return _copy(command)

        return self._submit(op)

    def fire_timers(
        self, *, now_ms: int, limit: int = 1000
    ) -> asyncio.Future[tuple[list[t.Command], int]]:
        def op() -> tuple[list[t.Command], int]:
            timers = ((self._timer_at(c), c.command_id) for c in self._commands.values())
            due = heapq.nsmallest(limit, (timer for timer in timers if timer[0] <= now_ms))
            changed = []
            for _, command_id in due:
                command = self._commands[command_id]
                if lifecycle.timer_due(command, now_ms=now_ms) is lifecycle.Due.PURGE:
                    self._purge(command)
                else:
                    self._stamp(now_ms)
                    changed.append(_copy(command))
            return changed, len(due)

        return self._submit(op)

    def recover(self, *, now_ms: int, senders: dict[str, int] | None = None) -> asyncio.Future[int]:
        def op() -> int:
            pending = list(self._pending_of(None))
            if senders is not None:
                for command in pending:
                    senders[command.sender] = senders.get(command.sender, 0) + 1
            self._change_all(
                [c.command_id for c in pending], partial(lifecycle.recover, now_ms=now_ms)
            )
            return len(pending)

        return self._submit(op)

    def load_pending(
        self, vehicle_ids: Sequence[str], *, limit: int | None = None
    ) -> asyncio.Future[dict[str, list[t.Command]]]:
        def in_dispatch_order(vehicle_id: str) -> list[t.Command]:
            pending = sorted(self._pending_of(vehicle_id), key=lambda c: (-c.lane, c.seq))
            return [_copy(c) for c in pending[:limit]]

        return self._submit(lambda: {v: in_dispatch_order(v) for v in vehicle_ids})

    def get(self, command_id: str) -> asyncio.Future[t.Command]:
        return self._submit(lambda: _copy(self._found(command_id)))

    def list_vehicle(
        self, vehicle_id: str, *, limit: int, sender: str | None = None
    ) -> asyncio.Future[list[t.Command]]:
        def op() -> list[t.Command]:
            commands = [
                c
                for c in self._commands.values()
                if c.vehicle_id == vehicle_id and sender in (None, c.sender)
            ]
            commands.sort(key=lambda c: -c.seq)
            return [_copy(c) for c in commands[:limit]]

        return self._submit(op)

    # -- vehicle state -------------------------------------------------------------------

    def put_states(self, states: Sequence[svc.VehicleState]) -> asyncio.Future[None]:
        blobs = [(s.vehicle_id, s.SerializeToString()) for s in states]  # as they are now
        return self._submit(lambda: self._states.update(blobs))

    def get_state(self, vehicle_id: str) -> asyncio.Future[svc.VehicleState | None]:
        def op() -> svc.VehicleState | None:
            blob = self._states.get(vehicle_id)
            return None if blob is None else svc.VehicleState.FromString(blob)

        return self._submit(op)

    # -- helpers -------------------------------------------------------------------------

    def _submit(self, op: Callable[[], T]) -> asyncio.Future[T]:
        """Run `op` now; its future completes on the loop after those submitted before."""
        assert self._loop is not None, "store not started"
        future: asyncio.Future[T] = self._loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("the store is closed (broker shutting down)"))
            return future
        self._operations += 1
        try:
            value = op()
        except BrokerError as exc:  # raised before the operation changed anything
            self._loop.call_soon(_fail, future, exc)
        else:
            self._loop.call_soon(_resolve, future, value)
        return future

    def _found(self, command_id: str) -> t.Command:
        command = self._commands.get(command_id)
        if command is None:
            raise NotFound(f"no command {command_id!r}")
        return command

    def _change(self, command_id: str, rule: Callable[[t.Command], bool]) -> t.Command | None:
        """Apply a lifecycle rule to a command: a copy of the changed record, or None
        (there is no such command, or the rule refused the change)."""
        command = self._commands.get(command_id)
        if command is None or not rule(command):
            return None
        self._stamp(command.updated_at_ms)
        return _copy(command)

    def _change_all(
        self, command_ids: Sequence[str], rule: Callable[[t.Command], bool]
    ) -> list[t.Command]:
        changed = (self._change(command_id, rule) for command_id in command_ids)
        return [command for command in changed if command is not None]

    def _pending_of(self, vehicle_id: str | None) -> Iterator[t.Command]:
        """Non-terminal commands (of one vehicle, or of all)."""
        for command in self._commands.values():
            if command.status not in TERMINAL and vehicle_id in (None, command.vehicle_id):
                yield command

    def _timer_at(self, command: t.Command) -> int:
        return lifecycle.timer_at(command, self._retention_ms)

    def _stamp(self, now_ms: int) -> None:
        """A write of a timestamp: keep the clock reference (the highest time written)."""
        wall_ms, steady_ns = clock.current().reference()
        stamp_ms = max(now_ms, wall_ms)
        if stamp_ms > self._clock_reference[0]:
            self._clock_reference = (stamp_ms, steady_ns, clock.BOOT_ID)

    def _release_idempotency_key(self, command: t.Command) -> None:
        key = (command.sender, command.idempotency_key)
        if command.idempotency_key and self._idem.get(key) == command.command_id:
            del self._idem[key]

    def _purge(self, command: t.Command) -> None:
        """Retention: drop a terminal command and every key that names it."""
        del self._commands[command.command_id]
        self._release_idempotency_key(command)
        coalesce = (command.vehicle_id, command.sender, command.coalesce_key)
        if command.coalesce_key and self._coalesce.get(coalesce) == command.command_id:
            del self._coalesce[coalesce]


def _copy(command: t.Command) -> t.Command:
    out = t.Command()
    out.CopyFrom(command)
    return out


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # cancelled by its caller meanwhile
        future.set_result(value)


def _fail(future: asyncio.Future[T], error: BrokerError) -> None:
    if not future.done():
        future.set_exception(error)
