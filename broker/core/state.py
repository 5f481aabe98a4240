"""Last known vehicle state: per-field values with the time each was reported.

Reports update memory at once and reach LMDB in coalesced flushes: a connected car's
changes at most one persist interval late (one write per car per interval, not one per
report, spread over the interval), a car that goes is written at once. Connectedness
comes from the live session, so a disconnected car always reads as "last seen at", never
as current.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from broker.core.errors import BrokerError, InvalidArgument
from broker.core.sessions import SessionRegistry
from broker.core.store import Store
from broker.v1 import command_service_pb2 as svc

logger = logging.getLogger(__name__)
SIGNAL_NAME_MAX = 128
T = TypeVar("T")


def check_signals(signals: Iterable[Any]) -> None:
    """Refuse a batch with a bad signal name (before it is applied or buffered)."""
    for signal in signals:
        if not signal.name or len(signal.name) > SIGNAL_NAME_MAX:
            raise InvalidArgument(f"signal names must be 1-{SIGNAL_NAME_MAX} characters")


class _Live:
    """A connected car's state: the last persisted record plus the reports since.

    Reports land in `overlay` (name -> (Value, reported_at_ms, received_at_ms)), plain
    dict work; they are folded into the protobuf record only when it is read or
    persisted. Under telemetry load a car reports many times per flush, so the protobuf
    work is paid per field per flush instead of per signal per report.
    """

    __slots__ = ("added", "last_seen_ms", "overlay", "record")

    def __init__(self, record: Any) -> None:
        self.record = record
        self.overlay: dict[str, tuple[Any, int, int]] = {}
        self.added = 0  # names in the overlay that the record does not hold yet
        self.last_seen_ms = record.last_seen_ms

    def materialize(self) -> Any:
        """Fold the overlay into the record; returns the record."""
        record = self.record
        fields = record.fields
        for name, (value, reported_at_ms, received_at_ms) in self.overlay.items():
            field = fields[name]
            field.value.CopyFrom(value)
            field.reported_at_ms = reported_at_ms
            field.received_at_ms = received_at_ms
        self.overlay.clear()
        self.added = 0
        record.last_seen_ms = self.last_seen_ms
        return record


class VehicleStates:
    def __init__(self, store: Store, sessions: SessionRegistry, *, max_fields: int) -> None:
        self._store = store
        self._sessions = sessions
        self._max_fields = max_fields
        self._live: dict[str, _Live] = {}  # vehicle_id -> its state, for connected cars
        self._streams: dict[str, int] = {}  # vehicle_id -> streams attached (old + new)
        #: cars with unpersisted changes -> when the oldest was made (ms), oldest first
        self._dirty: dict[str, int] = {}

    async def attach(self, vehicle_id: str) -> None:
        """A stream for this car starts: hold its durable state in memory while any does."""
        self._streams[vehicle_id] = self._streams.get(vehicle_id, 0) + 1
        if vehicle_id not in self._live:
            stored = await self._store.get_state(vehicle_id)
            if vehicle_id not in self._live:  # another stream may have loaded it meanwhile
                self._live[vehicle_id] = _Live(stored or svc.VehicleState(vehicle_id=vehicle_id))

    async def detach(self, vehicle_id: str) -> None:
        """A stream for this car ended; after its last one, persist and drop the state."""
        remaining = self._streams.get(vehicle_id, 0) - 1
        if remaining > 0:
            self._streams[vehicle_id] = remaining
            return
        self._streams.pop(vehicle_id, None)
        live = self._live.pop(vehicle_id, None)
        self._dirty.pop(vehicle_id, None)
        if live is None:
            return
        try:
            # A stream attaching meanwhile reads after this write: the writer is FIFO.
            await self._store.put_states([live.materialize()])
        except BrokerError as exc:
            logger.warning("could not persist state of %s: %s", vehicle_id, exc.message)

    def seen(self, vehicle_id: str, at_ms: int) -> None:
        """Note a frame from the car. Not a reason to write: last_seen reaches LMDB with
        the next field change or when the car disconnects (while it is connected, the
        live session, not last_seen, says it is current)."""
        live = self._live.get(vehicle_id)
        if live is not None:
            live.last_seen_ms = at_ms

    def hello(self, vehicle_id: str, firmware: str, capabilities: Iterable[str]) -> None:
        """What the car's Hello said about it (kept with its state, persisted with it)."""
        live = self._live.get(vehicle_id)
        if live is not None:
            record = live.record
            record.firmware = firmware
            del record.capabilities[:]
            record.capabilities.extend(capabilities)

    def report(self, vehicle_id: str, signals: Iterable[Any], received_at_ms: int) -> None:
        """Apply reported signals; an older report never overwrites a newer value."""
        live = self._live.get(vehicle_id)
        if live is None:
            return
        # The hottest loop under telemetry load: dict work only (see `_Live`).
        overlay = live.overlay
        for signal in signals:
            name = signal.name
            if not name or len(name) > SIGNAL_NAME_MAX:
                raise InvalidArgument(f"signal names must be 1-{SIGNAL_NAME_MAX} characters")
            # Unstamped means "now"; a car clock running ahead cannot date a value later
            # than its arrival (it would freeze the field until that time).
            stamp = min(signal.reported_at_ms or received_at_ms, received_at_ms)
            held = overlay.get(name)
            if held is not None:
                if held[1] > stamp:
                    continue
            else:
                current = live.record.fields.get(name)
                if current is None:
                    if len(live.record.fields) + live.added >= self._max_fields:
                        raise InvalidArgument(f"more than {self._max_fields} distinct state fields")
                    live.added += 1
                elif current.reported_at_ms > stamp:
                    continue
            overlay[name] = (signal.value, stamp, received_at_ms)
        if vehicle_id not in self._dirty:
            self._dirty[vehicle_id] = received_at_ms

    async def get(self, vehicle_id: str) -> svc.VehicleState:
        """The state as a client should see it, with live connectedness."""
        live = self._live.get(vehicle_id)
        if live is not None:
            state = live.materialize()
        else:
            state = await self._store.get_state(vehicle_id) or svc.VehicleState(
                vehicle_id=vehicle_id
            )
        out = svc.VehicleState()
        out.CopyFrom(state)
        session = self._sessions.get(vehicle_id)
        out.connected = session is not None
        out.connected_since_ms = session.connected_since_ms if session is not None else 0
        return out

    async def flush(self, *, share: float = 1.0, changed_before_ms: int | None = None) -> None:
        """Persist cars whose state changed, oldest change first: at least `share` of them
        (rounded up) and every one changed before `changed_before_ms`. The periodic flush
        passes a share, so a fleet that changed all at once is written over the interval,
        not in one burst. Written a slice at a time: the event loop runs between slices."""
        dirty = self._dirty
        quota = math.ceil(len(dirty) * share)
        due: list[str] = []
        for vehicle_id, since_ms in dirty.items():  # oldest change first
            if len(due) >= quota and (changed_before_ms is None or since_ms >= changed_before_ms):
                break
            due.append(vehicle_id)
        for vehicle_id in due:
            del dirty[vehicle_id]
        writes = []
        for vehicle_ids in _slices(due, FLUSH_SLICE):
            states = [live.materialize() for v in vehicle_ids if (live := self._live.get(v))]
            if states:
                # Serialized here, so reports landing meanwhile cannot race the write.
                writes.append(self._store.put_states(states))
            await asyncio.sleep(0)
        await asyncio.gather(*writes)


#: cars whose state is folded and serialized per event-loop turn while flushing (~0.3 ms at
#: 10 fields each; a verbosity storm's 90 fields make it ~3 ms)
FLUSH_SLICE = 8


def _slices(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
