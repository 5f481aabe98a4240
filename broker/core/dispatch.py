"""Dispatch: per-vehicle queues (priority, then FIFO), an in-flight window, and timers.

The store is the truth; this module keeps in memory only what it needs to route: the
non-terminal commands of the cars that are connected, at most `max_outbox_per_car`
queued ones per car. A parked car's commands stay on disk until it connects; its queue
is then loaded from the store's `pending` index (the loads of cars connecting together
share one store operation). It knows nothing about gRPC or the wire: a car is a
`Session` with an outbox of commands, a service call is a method call.

**Bounded memory per connected car.** What a car has not taken yet is held in memory up
to the cap; past it, commands stay on disk only, and are loaded (in dispatch order, a
cap's worth at a time) as the car drains the ones held. The queue held is always a
*prefix* of the car's queue in dispatch order (lane, then FIFO): every command on disk
only sorts after every queued one held (`_VehicleQueue.floor` is a lower bound of the
keys on disk only). A new command that sorts before the floor (a higher lane) is taken
into memory, and if that makes the queue too long, the last one held goes back to "on
disk only" and lowers the floor; one that sorts after it stays on disk. So a newer
critical command still goes before queued bulk ones, however many there are, and a car
that never reads costs the cap, not its whole queue. Commands for a car whose queue is
at the cap are created QUEUED (as for a parked car): they are not about to be sent.

**Pending per sender.** The dispatcher sees every command created and every move to a
terminal status, so it keeps each sender's count of non-terminal commands
(`pending_of`), for the per-caller share of the durable queue (broker/core/quotas.py);
`recover` starts it from the store's counts after a restart. A command counts from its
submission (concurrent sends cannot overshoot a share by more than what is being
written) until it is terminal; a submission that fails, or that the store answers as a
deduplicated repeat, gives its count back.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.config import Config
from broker.core.clock import now_ms
from broker.core.errors import BrokerError, Unavailable, retry_hint_ms
from broker.core.events import EventHub
from broker.core.lifecycle import TERMINAL
from broker.core.quotas import COMMIT_DEADLINE, Refusals
from broker.core.sessions import CommandOut, Session, SessionRegistry
from broker.core.store import Created, NewCommand, NotCommittedInTime, Store
from broker.v1 import types_pb2 as t

logger = logging.getLogger(__name__)


@dataclass
class _VehicleQueue:
    """A connected car's commands. Exists while the car is connected and has any (or its
    queue is still loading); an empty queue of a connected car is dropped."""

    #: (-lane, seq, command_id): highest lane first, FIFO within a lane.
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    #: Every non-terminal command of this vehicle, by id (latest known record).
    commands: dict[str, t.Command] = field(default_factory=dict)
    #: Sent on the current stream (or acked on any), awaiting a result.
    in_flight: set[str] = field(default_factory=set)
    #: The store has not answered `load_pending` yet: nothing is sent meanwhile.
    loading: bool = False
    #: What the car said it already has (Hello.recent_command_ids), used once loaded.
    recent_command_ids: Collection[str] = ()
    #: None: every pending command of the car is in memory. Else some are on disk only,
    #: and the dispatch key (-lane, seq) of each of those is >= this one.
    floor: tuple[int, int] | None = None
    #: more of its commands are being loaded from the store (sending goes on meanwhile)
    refilling: bool = False
    #: the lowest key left on disk only since the last load was asked for; the floor a
    #: load implies is capped by it. (Stores settle operations in submission order, so
    #: what is left on disk while a load runs was created before it, and the load read
    #: it; this keeps a command from being stranded below the floor if one did not.)
    skipped: tuple[int, int] | None = None
    #: commands on disk only while ACCEPTED: requeued (QUEUED) when the car goes
    accepted_on_disk: set[str] = field(default_factory=set)

    def push(self, command: t.Command) -> None:
        heapq.heappush(self.heap, (-command.lane, command.seq, command.command_id))

    @property
    def held(self) -> int:
        """Commands held that are not on the wire (queued, or about to be settled)."""
        return len(self.commands) - len(self.in_flight)

    @property
    def spilled(self) -> bool:
        """Some of its commands are on disk only (or being loaded)."""
        return self.floor is not None or self.refilling


class Dispatcher:
    """Routes durable commands to live sessions and records what happens to them."""

    def __init__(
        self,
        store: Store,
        sessions: SessionRegistry,
        events: EventHub,
        config: Config,
        *,
        refusals: Refusals | None = None,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._events = events
        self._config = config
        self._queues: dict[str, _VehicleQueue] = {}
        self._to_load: dict[str, _VehicleQueue] = {}
        #: commands of connected cars being created, by vehicle: those promised a window
        #: slot (created DELIVERED) and those that will queue; a later command may take
        #: the fast path only when none of the second kind is ahead of it (FIFO)
        self._reserved: dict[str, int] = {}
        self._queueing: dict[str, int] = {}
        #: commands committed after their sender's deadline, until their abandonment is
        #: on disk: a retry that finds one (same idempotency key) is refused too
        self._abandoning: set[str] = set()
        #: commands abandoned so (metrics)
        self.abandoned = 0
        #: non-terminal commands by sender (submitted and not yet terminal)
        self._by_sender: dict[str, int] = {}
        self.refusals = refusals if refusals is not None else Refusals()
        #: queued commands held in memory per connected car, at most
        self.max_held = config.max_outbox_per_car
        #: commands sent back to "on disk only" to keep a car's queue in memory bounded,
        #: and loads of more of a car's queue as it drained (metrics)
        self.spills = 0
        self.refills = 0

    @property
    def queues_in_memory(self) -> int:
        """Cars whose queue is in memory: connected ones with pending commands."""
        return len(self._queues)

    @property
    def pending_total(self) -> int:
        """Non-terminal commands on disk (the durable queue's depth), for metrics and budgets."""
        return self._store.pending

    def pending_of(self, sender: str) -> int:
        """Non-terminal commands `sender` holds (those being written included)."""
        return self._by_sender.get(sender, 0)

    @property
    def pending_by_sender(self) -> dict[str, int]:
        """Non-terminal commands by sender (a copy, for metrics)."""
        return dict(self._by_sender)

    @property
    def commands_in_memory(self) -> int:
        """Command records held for connected cars (metrics)."""
        return sum(len(queue.commands) for queue in self._queues.values())

    @property
    def spilled_queues(self) -> int:
        """Connected cars with commands on disk only, past `max_outbox_per_car` (metrics)."""
        return sum(1 for queue in self._queues.values() if queue.spilled)

    def _count(self, sender: str, delta: int) -> None:
        count = self._by_sender.get(sender, 0) + delta
        if count > 0:
            self._by_sender[sender] = count
        else:
            self._by_sender.pop(sender, None)

    # -- services ------------------------------------------------------------------------

    async def recover(self) -> int:
        """Requeue what was on the wire at the last stop; returns the commands pending,
        and counts them by sender (`pending_of`).

        Call once, before serving. Nothing is loaded: cars get theirs when they connect.
        """
        senders: dict[str, int] = {}
        pending = await self._store.recover(now_ms=now_ms(), senders=senders)
        self._by_sender = {sender: n for sender, n in senders.items() if n > 0}
        return pending

    async def submit(self, items: Sequence[NewCommand]) -> list[Created | BrokerError]:
        """Durably enqueue commands, then dispatch those whose car is online.

        A command for a connected car with a free window slot and nothing queued ahead is
        created DELIVERED and written to the car right after the commit: one durable
        write instead of two (the frame still goes out only after its record is on disk).

        The in-memory side is taken up in a callback of the store write, so a caller
        cancelled during the fsync cannot strand a command that did commit. A command
        that became durable only after its `commit_by_s` (its sender gave up meanwhile)
        is abandoned there instead: never sent, answered as not accepted.
        """
        sessions = self._sessions
        live = {
            item.vehicle_id
            for item in items
            if (session := sessions.get(item.vehicle_id)) is not None and not session.closed
        }
        # A car whose queue in memory is full gets new commands QUEUED: not about to go.
        online = {vehicle_id for vehicle_id in live if not self._full(vehicle_id)}
        deliver: dict[int, int] = {}
        counted: list[tuple[dict[str, int], str]] = []
        for index, item in enumerate(items):
            vehicle_id = item.vehicle_id
            if vehicle_id not in live:
                continue
            if vehicle_id in online and self._has_free_slot(vehicle_id):
                timeout_s = self._config.policy(item.name).result_timeout_s
                deliver[index] = int(timeout_s * 1000)
                counter = self._reserved
            else:
                counter = self._queueing
            counter[vehicle_id] = counter.get(vehicle_id, 0) + 1
            counted.append((counter, vehicle_id))
        write = self._store.create(items, online=online, now_ms=now_ms(), deliver=deliver)
        for item in items:  # counted from now: `_created` gives back what was not created
            self._count(item.sender, 1)
        write.add_done_callback(lambda done: self._created(done, items, counted))
        return await asyncio.shield(write)

    def _has_free_slot(self, vehicle_id: str) -> bool:
        if self._queueing.get(vehicle_id):
            return False  # an earlier command of this car is on its way to the queue
        queue = self._queues.get(vehicle_id)
        busy = self._reserved.get(vehicle_id, 0)
        if queue is not None:
            if queue.loading or queue.heap or queue.spilled:
                return False  # loading, or others wait ahead of it: the normal path
            busy += len(queue.in_flight)
        return busy < self._config.window

    def _full(self, vehicle_id: str) -> bool:
        """Whether the car's queue in memory is at the cap (or some of it is on disk)."""
        queue = self._queues.get(vehicle_id)
        return queue is not None and (queue.spilled or queue.held >= self.max_held)

    def _created(
        self,
        write: asyncio.Future[list[Created | BrokerError]],
        items: Sequence[NewCommand],
        counted: Sequence[tuple[dict[str, int], str]],
    ) -> None:
        touched = set()
        for counter, vehicle_id in counted:
            left = counter[vehicle_id] - 1
            if left:
                counter[vehicle_id] = left
            else:
                del counter[vehicle_id]
            touched.add(vehicle_id)  # a slot promised and not used is free again
        if write.cancelled() or write.exception() is not None:
            for item in items:
                self._count(item.sender, -1)  # nothing was created
            for vehicle_id in touched:
                self._pump(vehicle_id)
            return
        stranded = []
        abandoned = []
        results = write.result()
        committed_s = time.monotonic()
        for index, result in enumerate(results):
            if isinstance(result, BrokerError):
                self._count(items[index].sender, -1)
                if isinstance(result, NotCommittedInTime):
                    self.refusals.count(COMMIT_DEADLINE)
                continue
            if result.deduplicated:
                self._count(items[index].sender, -1)  # the earlier one is counted already
                if result.command.command_id in self._abandoning:
                    results[index] = NotCommittedInTime(abandoned=True)
                continue
            for older in result.superseded:  # superseded whether or not this one goes
                self._apply(older)
            commit_by_s = items[index].commit_by_s
            if commit_by_s and committed_s > commit_by_s:
                abandoned.append(result.command.command_id)
                self._abandoning.add(result.command.command_id)
                self.abandoned += 1
                self.refusals.count(COMMIT_DEADLINE)
                results[index] = NotCommittedInTime(abandoned=True)  # what its caller hears
                continue
            command = result.command
            self._events.publish(command)
            vehicle_id = command.vehicle_id
            session = self._sessions.get(vehicle_id)
            queue = self._queues.get(vehicle_id)
            if queue is None:
                if session is None:
                    if command.status == t.DELIVERED:
                        stranded.append(command.command_id)  # the car went meanwhile
                    continue  # parked: it stays on disk until the car connects
                # Connected, loaded, and had nothing pending (its empty queue was dropped).
                queue = self._queues[vehicle_id] = _VehicleQueue()
            if command.status == t.DELIVERED and session is not None and not queue.loading:
                queue.commands[command.command_id] = command
                queue.in_flight.add(command.command_id)
                session.send_recorded(command)
            else:  # a loading queue sends it with the rest (the load sees it DELIVERED)
                self._enqueue(queue, command)
                touched.add(vehicle_id)
        for vehicle_id in touched:
            self._pump(vehicle_id)
        if stranded:
            self._record(self._store.requeue(stranded, now_ms=now_ms()))
        if abandoned:
            logger.warning(
                "%d commands became durable after their sender's deadline; abandoned unsent",
                len(abandoned),
            )
            self._abandon(abandoned)

    def _abandon(self, command_ids: list[str]) -> None:
        """Record commands as abandoned; until that is on disk they are never sent, and a
        failed write is tried again (the store may be failing: that made them late)."""
        write = self._store.abandon(command_ids, now_ms=now_ms())
        self._record(write)

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                asyncio.get_running_loop().call_later(ABANDON_RETRY_S, self._abandon, command_ids)
            else:
                self._abandoning.difference_update(command_ids)

        write.add_done_callback(done)

    async def cancel(self, command_id: str) -> t.Command:
        write = self._store.cancel(command_id, now_ms=now_ms())
        self._record(write)
        return await asyncio.shield(write)

    def current(self, vehicle_id: str, command_id: str) -> t.Command | None:
        """The latest record of a non-terminal command, from memory; None if not pending."""
        queue = self._queues.get(vehicle_id)
        return queue.commands.get(command_id) if queue is not None else None

    # -- sessions --------------------------------------------------------------------------

    def connect(self, session: Session, recent_command_ids: Collection[str] = ()) -> None:
        """A car's stream is up: replace any older one and start sending its queue."""
        self._sessions.attach(session)
        vehicle_id = session.vehicle_id
        queue = self._queues.get(vehicle_id)
        if queue is None:  # not in memory: ask the store (batched with other connects)
            queue = self._queues[vehicle_id] = _VehicleQueue(loading=True)
            queue.recent_command_ids = recent_command_ids
            if not self._to_load:
                asyncio.get_running_loop().call_soon(self._load_queued)
            self._to_load[vehicle_id] = queue
        elif queue.loading:
            queue.recent_command_ids = recent_command_ids
        else:  # a stream replaced another: memory is current
            self._resume(vehicle_id, queue, recent_command_ids)

    def _load_queued(self) -> None:
        batch, self._to_load = self._to_load, {}
        # A cap's worth each (plus what may be on the wire: those sort anywhere).
        limit = self.max_held + self._config.window
        for queue in batch.values():
            queue.skipped = None
        try:
            write = self._store.load_pending(list(batch), limit=limit)
        except Exception as exc:  # a store that raises at once fails the load, not the loop
            write = asyncio.get_running_loop().create_future()
            write.set_exception(exc)

        def loaded(future: asyncio.Future[dict[str, list[t.Command]]]) -> None:
            failed = future.cancelled() or future.exception() is not None
            if failed:
                why = "cancelled" if future.cancelled() else future.exception()
                logger.error("loading queued commands failed: %s", why)
            for vehicle_id, queue in batch.items():
                if self._queues.get(vehicle_id) is not queue:
                    continue  # disconnected meanwhile: a later connect loads again
                refill = not queue.loading
                queue.loading = queue.refilling = False
                if failed:  # forget the queue, so the car's next stream loads it again
                    del self._queues[vehicle_id]
                    session = self._sessions.get(vehicle_id)
                    if session is not None:
                        session.close(
                            Unavailable(
                                "could not load this car's queue; reconnect later",
                                retry_after_ms=retry_hint_ms(2.0, 10.0),
                            )
                        )
                    continue
                self._merge(queue, future.result().get(vehicle_id, []), limit)
                if refill:
                    self._pump(vehicle_id)
                else:
                    self._resume(vehicle_id, queue, queue.recent_command_ids)
                    queue.recent_command_ids = ()

        write.add_done_callback(loaded)

    def _merge(self, queue: _VehicleQueue, loaded: Sequence[t.Command], limit: int) -> None:
        """Take in the first `limit` pending commands of a car, as the store read them."""
        for command in loaded:
            # The load's records are as of its turn in the writer, after every earlier
            # write; a command created meanwhile is in `queue` already, or on disk only
            # past the floor (and then after every command loaded).
            command_id = command.command_id
            if command_id in queue.commands:
                continue
            queue.accepted_on_disk.discard(command_id)
            queue.commands[command_id] = command
            if command.status == t.ACKED:
                queue.in_flight.add(command_id)
            else:
                queue.push(command)
        floor = queue.skipped  # left on disk only while the load ran (it could not see them)
        if len(loaded) >= limit:  # there may be more: each sorts after the last loaded
            last = loaded[-1]
            after = (-last.lane, last.seq + 1)
            floor = after if floor is None else min(floor, after)
        queue.floor = floor
        self._trim(queue)

    def _enqueue(self, queue: _VehicleQueue, command: t.Command) -> None:
        """Hold a new command of a connected car, unless it belongs on disk only (it sorts
        after what is there); keep the queue held within the cap."""
        key = (-command.lane, command.seq)
        if queue.floor is not None and key >= queue.floor:
            if command.status == t.ACCEPTED:
                queue.accepted_on_disk.add(command.command_id)
            queue.skipped = key if queue.skipped is None else min(queue.skipped, key)
            return
        queue.commands[command.command_id] = command
        queue.push(command)
        if queue.held > self.max_held:
            self._trim(queue)

    def _trim(self, queue: _VehicleQueue) -> None:
        """Keep in memory only the first `max_held` queued commands below the floor; the
        rest go back to "on disk only", and the floor moves down to the first of them.
        Commands on the wire, or created DELIVERED while the queue loaded, always stay."""
        commands, in_flight, floor = queue.commands, queue.in_flight, queue.floor
        seen: set[tuple[int, int, str]] = set()
        queued: list[tuple[int, int, str]] = []
        pinned: list[tuple[int, int, str]] = []
        for entry in queue.heap:  # live entries once each (a heap may hold stale ones)
            command_id = entry[2]
            if command_id not in commands or command_id in in_flight or entry in seen:
                continue
            seen.add(entry)
            on_the_wire = commands[command_id].status in (t.DELIVERED, t.ACKED)
            (pinned if on_the_wire else queued).append(entry)
        queued.sort()
        room = max(0, self.max_held - len(pinned))
        kept = 0  # a prefix: the first `room` of those below the floor
        limit = min(room, len(queued))
        while kept < limit and (floor is None or queued[kept][:2] < floor):
            kept += 1
        dropped = queued[kept:]
        for _, _, command_id in dropped:
            if commands.pop(command_id).status == t.ACCEPTED:
                queue.accepted_on_disk.add(command_id)
        if dropped:
            self.spills += len(dropped)
            first = (dropped[0][0], dropped[0][1])
            queue.floor = first if floor is None else min(floor, first)
            queue.skipped = first if queue.skipped is None else min(queue.skipped, first)
        heap = queued[:kept] + pinned  # a sorted list is a heap; pinned ones are pushed after
        heapq.heapify(heap)
        queue.heap = heap

    def _refill(self, vehicle_id: str, queue: _VehicleQueue) -> None:
        """Load more of a car's queue from disk (batched with other loads)."""
        queue.refilling = True
        self.refills += 1
        if not self._to_load:
            asyncio.get_running_loop().call_soon(self._load_queued)
        self._to_load[vehicle_id] = queue

    def _resume(
        self, vehicle_id: str, queue: _VehicleQueue, recent_command_ids: Collection[str]
    ) -> None:
        """Start sending a (re)connected car's loaded queue."""
        # Sent-but-unacked commands go again on this stream (attempt+1), except those
        # the car says it already has: it repeats their results itself.
        for command_id in list(queue.in_flight):
            command = queue.commands.get(command_id)
            if command is None or command.status == t.ACKED:
                continue
            queue.in_flight.discard(command_id)
            queue.push(command)
        already_have = [
            cid
            for cid in recent_command_ids
            if cid in queue.commands and queue.commands[cid].attempt > 0
        ]
        for command_id in already_have:
            queue.in_flight.add(command_id)
            self._mark_acked(queue.commands[command_id])
        if not queue.commands and not queue.spilled:
            del self._queues[vehicle_id]
            return
        self._pump(vehicle_id)

    def disconnect(self, session: Session) -> bool:
        """A stream ended; if it was the car's live one, its unacked commands wait again
        (on disk: the car's queue leaves memory until it connects again).

        Returns whether the car is now without any stream (False when a newer stream
        replaced this one).
        """
        if not self._sessions.detach(session):
            return session.vehicle_id not in self._sessions
        queue = self._queues.pop(session.vehicle_id, None)
        self._to_load.pop(session.vehicle_id, None)
        if queue is None:
            return True
        unacked = [
            cid
            for cid, c in queue.commands.items()
            if c.status in (t.ACCEPTED, t.DELIVERED)
            or (cid in queue.in_flight and c.status != t.ACKED)
        ]
        unacked.extend(queue.accepted_on_disk)
        if unacked:
            self._record(self._store.requeue(unacked, now_ms=now_ms()))
        return True

    async def deliver(self, session: Session, outs: Sequence[CommandOut]) -> dict[str, int]:
        """Record commands as on the wire, durably, *before* they are written to the car.

        `outs` are commands waiting in the session's outbox, recorded in one write.
        Returns the attempt number of each command to write; one left out is dropped:
        it was canceled, superseded or expired meanwhile (the store decides, in order
        with those writes), or the stream is closing — then the commands stay in flight
        and disconnect()/connect() hand them to the next stream.
        """
        if session.closed:
            return {}
        policy = self._config.policy
        deliveries = [
            (out.command.command_id, int(policy(out.command.name).result_timeout_s * 1000))
            for out in outs
        ]
        write = self._store.mark_delivered(deliveries, now_ms=now_ms())
        self._record(write)
        attempts = {command.command_id: command.attempt for command in await asyncio.shield(write)}
        for out in outs:
            if out.command.command_id not in attempts:
                self._not_sent(session, out.command.command_id)
        return attempts

    def _not_sent(self, session: Session, command_id: str) -> None:
        """The store refused to put a command on the wire: free its window slot."""
        if self._sessions.get(session.vehicle_id) is not session:
            return
        queue = self._queues.get(session.vehicle_id)
        if queue is not None:
            queue.in_flight.discard(command_id)
            self._pump(session.vehicle_id)

    def acked(self, vehicle_id: str, command_id: str) -> None:
        queue = self._queues.get(vehicle_id)
        command = queue.commands.get(command_id) if queue is not None else None
        if command is not None:
            self._mark_acked(command)

    def _mark_acked(self, command: t.Command) -> None:
        timeout_ms = int(self._config.policy(command.name).result_timeout_s * 1000)
        self._record(
            self._store.mark_acked(
                command.command_id, now_ms=now_ms(), result_timeout_ms=timeout_ms
            )
        )

    def result(
        self, vehicle_id: str, command_id: str, *, success: bool, message: str, detail: bytes
    ) -> None:
        # A result may also refine an UNKNOWN command we no longer hold in memory, so the
        # store (which checks the vehicle) decides, not the in-memory queue.
        self._record(
            self._store.record_result(
                command_id,
                vehicle_id=vehicle_id,
                success=success,
                message=message,
                detail=detail,
                now_ms=now_ms(),
            )
        )

    # -- timers ----------------------------------------------------------------------------

    async def fire_timers(self) -> int:
        """Expire, time out and purge everything due now; returns the status changes made."""
        total = 0
        while True:
            changed, due = await self._store.fire_timers(now_ms=now_ms(), limit=1000)
            for command in changed:
                self._apply(command)
            total += len(changed)
            if due < 1000:
                return total

    async def run_timers(self) -> None:
        while True:
            try:
                await self.fire_timers()
            except BrokerError as exc:
                logger.warning("timer sweep failed: %s", exc.message)
            await asyncio.sleep(self._config.sweep_interval_s)

    # -- internals -------------------------------------------------------------------------

    def _pump(self, vehicle_id: str) -> None:
        session = self._sessions.get(vehicle_id)
        queue = self._queues.get(vehicle_id)
        if session is None or queue is None or queue.loading:
            return
        window = self._config.window - self._reserved.get(vehicle_id, 0)
        now = now_ms()
        while queue.heap and len(queue.in_flight) < window:
            _, _, command_id = heapq.heappop(queue.heap)
            command = queue.commands.get(command_id)
            if command is None or command_id in queue.in_flight:
                continue  # terminal since it was queued, or a stale heap entry
            if command.expires_at_ms <= now:
                continue  # the timer sweep marks it EXPIRED / UNKNOWN
            if command_id in self._abandoning:
                continue  # its sender was told it was not accepted: never sent
            queue.in_flight.add(command_id)
            session.send_command(command, command.attempt + 1)
        if queue.floor is not None and not queue.refilling and queue.held <= self.max_held // 2:
            self._refill(vehicle_id, queue)  # half drained: load the next ones in time

    def _apply(self, command: t.Command) -> None:
        """Take in a recorded change: update memory, wake waiters, refill the window."""
        self._events.publish(command)
        if command.status in TERMINAL and not _refines_unknown(command):
            self._count(command.sender, -1)
        queue = self._queues.get(command.vehicle_id)
        if queue is None:
            return
        if command.status in TERMINAL:
            queue.commands.pop(command.command_id, None)
            queue.accepted_on_disk.discard(command.command_id)
            freed = command.command_id in queue.in_flight
            queue.in_flight.discard(command.command_id)
            if not queue.commands and not queue.loading and not queue.spilled:
                del self._queues[command.vehicle_id]
            elif freed or queue.floor is not None:
                self._pump(command.vehicle_id)
        elif command.command_id in queue.commands:
            queue.commands[command.command_id] = command

    def _record(self, write: asyncio.Future[Any]) -> None:
        """Apply the outcome of a store write when it commits, without blocking the caller."""

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                logger.error("recording a command event failed: %s", error)
                return
            outcome = future.result()
            for command in _as_list(outcome):
                self._apply(command)

        write.add_done_callback(done)


#: how soon a failed write recording abandoned commands is tried again
ABANDON_RETRY_S = 1.0
#: the status reason `lifecycle.result` gives a late result: the command was UNKNOWN,
#: terminal already, so it no longer counts as pending
LATE_RESULT_REASON = "result arrived after the result timeout"


def _refines_unknown(command: t.Command) -> bool:
    """A late result turned an UNKNOWN command (terminal already) into an outcome."""
    return command.status in (t.SUCCEEDED, t.FAILED) and command.status_reason == LATE_RESULT_REASON


def _as_list(outcome: Any) -> Iterable[Any]:
    if outcome is None:
        return ()
    if isinstance(outcome, list):
        return outcome
    return (outcome,)
