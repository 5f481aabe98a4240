"""The dispatcher without a server: per-car queues, the in-flight window, reconnects, timers.

A `MemoryStore`, a real `EventHub` (one that also keeps what it published) and
`SessionRegistry`, and `Session`s whose outboxes the tests empty the way a vehicle
stream's writer does (`write_out`). Broker time is a clock the tests move by hand, so
TTLs and result deadlines pass without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from broker.config import Config
from broker.core import clock
from broker.core.dispatch import Dispatcher
from broker.core.errors import BrokerError
from broker.core.events import EventHub
from broker.core.sessions import Outbox, Session, SessionRegistry
from broker.core.store import Created, NewCommand, NotCommittedInTime
from broker.storage.memory import MemoryStore
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually

T0 = 1_700_000_000_000


class ManualTime:
    """Broker time (ms) that moves only when a test says so."""

    def __init__(self, start_ms: int) -> None:
        self.ns = start_ms * 1_000_000

    def advance(self, ms: int) -> None:
        self.ns += ms * 1_000_000


@pytest.fixture(autouse=True)
def broker_time() -> Iterator[ManualTime]:
    manual = ManualTime(T0)
    previous = clock.install(clock.Clock(wall_ns=lambda: manual.ns, steady_ns=lambda: manual.ns))
    yield manual
    clock.install(previous)


class SlowDisk(MemoryStore):
    """Takes every command before its sender's deadline (`commit_by_s`), but has it
    durable only after that deadline, as a stalled disk would."""

    def create(
        self, items: Sequence[NewCommand], **kwargs: Any
    ) -> asyncio.Future[list[Created | BrokerError]]:
        return super().create([item._replace(commit_by_s=0.0) for item in items], **kwargs)


class RecordingHub(EventHub):
    """An EventHub that also keeps every change it published, oldest first."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[t.Command] = []

    def publish(self, command: t.Command) -> None:
        self.published.append(command)
        super().publish(command)


@dataclass
class Rig:
    store: MemoryStore
    events: RecordingHub
    dispatcher: Dispatcher


@pytest.fixture
def make_rig() -> Callable[..., Rig]:
    """`make_rig(window=2, store=None, **config)`: a dispatcher on a started MemoryStore."""

    def make(*, window: int = 2, store: MemoryStore | None = None, **config: Any) -> Rig:
        store = store or MemoryStore()
        store.start(asyncio.get_running_loop())
        events = RecordingHub()
        dispatcher = Dispatcher(store, SessionRegistry(), events, Config(window=window, **config))
        return Rig(store, events, dispatcher)

    return make


def command(
    vehicle_id: str = "car-1",
    *,
    name: str = "unlock",
    lane: int = t.CRITICAL,
    ttl_ms: int = 60_000,
    coalesce_key: str = "",
    commit_by_s: float = 0.0,
    sender: str = "",
    idempotency_key: str = "",
) -> NewCommand:
    return NewCommand(
        vehicle_id,
        name,
        b"{}",
        lane,
        ttl_ms,
        coalesce_key=coalesce_key,
        commit_by_s=commit_by_s,
        sender=sender,
        idempotency_key=idempotency_key,
    )


async def submit(rig: Rig, item: NewCommand) -> t.Command:
    [created] = await rig.dispatcher.submit([item])
    assert isinstance(created, Created), created
    return created.command


async def park(rig: Rig, *items: NewCommand) -> list[str]:
    """Commands for cars that are not connected: they wait in the store."""
    return [(await submit(rig, item)).command_id for item in items]


def connect(
    rig: Rig, vehicle_id: str = "car-1", recent_command_ids: Collection[str] = ()
) -> Session:
    """A car's stream is up (its Hello named `recent_command_ids`)."""
    session = Session(vehicle_id, now_ms=clock.now_ms())
    rig.dispatcher.connect(session, recent_command_ids)
    return session


async def connect_idle(rig: Rig, vehicle_id: str = "car-1") -> Session:
    """Connect a car with nothing pending, and wait until its (empty) queue is loaded."""
    session = connect(rig, vehicle_id)
    await eventually(
        lambda: rig.dispatcher.queues_in_memory, lambda n: n == 0, what="the queue loaded"
    )
    return session


def command_in(item: object) -> Any:
    """The command an outbox item carries, in whatever shape the dispatcher queues it: a
    command record, something holding one in `.command` (a queued command and its
    attempt), or a BrokerFrame holding a CommandFrame; None for anything else (a control
    frame, CLOSE)."""
    if isinstance(item, link.BrokerFrame):
        return item.command if item.WhichOneof("kind") == "command" else None
    if isinstance(item, t.Command):
        return item
    inner = getattr(item, "command", None)
    return inner if isinstance(inner, t.Command) else None


def queued_ids(session: Session) -> list[str]:
    """Ids of the commands waiting in the outbox (left there)."""
    items = list(session.outbox._items)
    return [found.command_id for found in map(command_in, items) if found is not None]


async def write_out(rig: Rig, session: Session) -> list[tuple[str, int]]:
    """Do what the stream's writer does with what is queued now: record the deliveries
    not recorded yet (one store write), then `(command_id, attempt)` of each command it
    writes to the car."""
    if not len(session.outbox):
        return []
    batch = await session.outbox.take(len(session.outbox))
    carried = [(item, found) for item in batch if (found := command_in(item)) is not None]
    to_record = [item for item, _ in carried if not getattr(item, "recorded", False)]
    attempts: Mapping[str, int] = {}
    if to_record:
        attempts = await rig.dispatcher.deliver(session, to_record)
    written = []
    for item, found in carried:
        if getattr(item, "recorded", False):
            written.append((found.command_id, item.attempt))
        elif found.command_id in attempts:
            written.append((found.command_id, attempts[found.command_id]))
    return written


async def expect_written(rig: Rig, session: Session, count: int) -> list[tuple[str, int]]:
    """Play the stream's writer until `count` commands were written; those written."""
    written: list[tuple[str, int]] = []

    async def probe() -> list[tuple[str, int]]:
        written.extend(await write_out(rig, session))
        return written

    return await eventually(
        probe, lambda w: len(w) >= count, timeout_s=5, what=f"{count} commands written"
    )


async def status(rig: Rig, command_id: str) -> str:
    return t.CommandStatus.Name((await rig.store.get(command_id)).status)


async def published(rig: Rig, command_id: str, status_value: int) -> t.Command:
    """Wait until the dispatcher has taken in (and published) a change of the command to
    `status_value`; the latest such record."""

    def changes() -> list[t.Command]:
        return [
            c
            for c in rig.events.published
            if c.command_id == command_id and c.status == status_value
        ]

    name = t.CommandStatus.Name(status_value)
    found = await eventually(changes, timeout_s=5, what=f"{command_id} published {name}")
    return found[-1]


# -- order and the window ------------------------------------------------------------------


async def test_a_connecting_car_gets_the_highest_lane_first_and_fifo_within_a_lane(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=10)
    bulk_1, critical_1, interactive, critical_2, bulk_2 = await park(
        rig,
        command(lane=t.BULK, name="config"),
        command(lane=t.CRITICAL),
        command(lane=t.INTERACTIVE, name="climate"),
        command(lane=t.CRITICAL),
        command(lane=t.BULK, name="config"),
    )
    other_car = await park(rig, command("car-2"))
    session = connect(rig)
    written = await expect_written(rig, session, 5)
    assert written == [(c, 1) for c in (critical_1, critical_2, interactive, bulk_1, bulk_2)]
    assert await status(rig, other_car[0]) == "QUEUED"  # not connected: stays in the store


async def test_the_window_bounds_what_is_in_flight_and_a_result_frees_a_slot(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2)
    first, second, third = await park(rig, command(), command(), command())
    session = connect(rig)
    assert await expect_written(rig, session, 2) == [(first, 1), (second, 1)]
    assert queued_ids(session) == []  # the third waits for a slot
    rig.dispatcher.acked("car-1", first)
    await published(rig, first, t.ACKED)
    assert queued_ids(session) == []  # acked is still in flight: awaiting its result
    rig.dispatcher.result("car-1", first, success=True, message="", detail=b"")
    assert await expect_written(rig, session, 1) == [(third, 1)]
    assert await status(rig, first) == "SUCCEEDED"


async def test_a_command_for_a_connected_car_with_a_free_slot_is_created_delivered(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=1)
    session = await connect_idle(rig)
    writes_before = rig.store.operations
    created = await submit(rig, command())
    assert (t.CommandStatus.Name(created.status), created.attempt) == ("DELIVERED", 1)
    assert await write_out(rig, session) == [(created.command_id, 1)]
    assert rig.store.operations == writes_before + 1  # its delivery was in the create
    # The window is full now: the next one is created ACCEPTED and waits.
    waiting = await submit(rig, command())
    assert t.CommandStatus.Name(waiting.status) == "ACCEPTED"
    assert queued_ids(session) == []
    rig.dispatcher.result("car-1", created.command_id, success=True, message="", detail=b"")
    assert await expect_written(rig, session, 1) == [(waiting.command_id, 1)]


# -- streams ending and coming back -------------------------------------------------------


async def sent_and_dropped(rig: Rig) -> tuple[str, str]:
    """Two commands delivered on a stream that then ends, one of them acked first:
    `(unacked id, acked id)`."""
    session = await connect_idle(rig)
    unacked = (await submit(rig, command())).command_id
    acked = (await submit(rig, command())).command_id
    assert await write_out(rig, session) == [(unacked, 1), (acked, 1)]
    rig.dispatcher.acked("car-1", acked)
    await published(rig, acked, t.ACKED)
    assert rig.dispatcher.disconnect(session)
    return unacked, acked


async def test_a_disconnect_requeues_what_was_sent_but_not_acked(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2)
    unacked, acked = await sent_and_dropped(rig)
    requeued = await published(rig, unacked, t.QUEUED)
    assert (requeued.attempt, requeued.result_deadline_ms) == (1, 0)
    assert await status(rig, acked) == "ACKED"  # the car has it: its result may still come
    assert rig.dispatcher.queues_in_memory == 0  # a parked car's queue leaves memory


async def test_a_reconnect_resends_what_was_not_acked_with_the_next_attempt(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2)
    unacked, acked = await sent_and_dropped(rig)
    await published(rig, unacked, t.QUEUED)
    session = connect(rig)
    assert await expect_written(rig, session, 1) == [(unacked, 2)]
    assert queued_ids(session) == []  # the acked one is not sent again
    assert (await rig.store.get(unacked)).attempt == 2
    assert (await rig.store.get(acked)).attempt == 1


async def test_commands_the_car_says_it_has_are_marked_acked_instead_of_resent(
    make_rig: Callable[..., Rig], broker_time: ManualTime
) -> None:
    rig = make_rig(window=1)
    session = await connect_idle(rig)
    had = (await submit(rig, command())).command_id
    later = (await submit(rig, command())).command_id
    assert await write_out(rig, session) == [(had, 1)]
    rig.dispatcher.disconnect(session)
    await published(rig, had, t.QUEUED)
    broker_time.advance(1_000)
    session = connect(rig, recent_command_ids=[had])  # its Hello
    acked = await published(rig, had, t.ACKED)
    assert acked.attempt == 1  # not sent again
    assert acked.result_deadline_ms == clock.now_ms() + 30_000  # unlock's result timeout
    assert queued_ids(session) == []  # it holds the one slot until its result
    rig.dispatcher.result("car-1", had, success=True, message="", detail=b"")
    assert await expect_written(rig, session, 1) == [(later, 1)]


# -- cancel, supersede, expiry, abandonment ----------------------------------------------


async def test_cancel_before_delivery_frees_the_window(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=1)
    first, second = await park(rig, command(), command())
    session = connect(rig)
    await eventually(lambda: queued_ids(session), lambda ids: ids == [first])
    canceled = await rig.dispatcher.cancel(first)  # queued for the car, not yet written
    assert t.CommandStatus.Name(canceled.status) == "CANCELED"
    assert await expect_written(rig, session, 1) == [(second, 1)]  # the first is dropped
    assert await status(rig, first) == "CANCELED"


async def test_a_superseded_command_frees_the_window(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=1)
    older, other = await park(rig, command(name="climate", coalesce_key="temp"), command())
    session = connect(rig)
    await eventually(lambda: queued_ids(session), lambda ids: ids == [older])
    newer = await submit(rig, command(name="climate", coalesce_key="temp"))
    assert await status(rig, older) == "SUPERSEDED"
    assert await expect_written(rig, session, 1) == [(other, 1)]
    rig.dispatcher.result("car-1", other, success=True, message="", detail=b"")
    assert await expect_written(rig, session, 1) == [(newer.command_id, 1)]


async def test_a_command_waiting_for_a_slot_expires_at_the_timer_sweep(
    make_rig: Callable[..., Rig], broker_time: ManualTime
) -> None:
    rig = make_rig(window=1)
    session = await connect_idle(rig)
    sent = (await submit(rig, command())).command_id
    waiting = (await submit(rig, command(ttl_ms=5_000))).command_id
    assert await write_out(rig, session) == [(sent, 1)]
    broker_time.advance(4_999)
    assert await rig.dispatcher.fire_timers() == 0
    broker_time.advance(1)
    assert await rig.dispatcher.fire_timers() == 1
    expired = await published(rig, waiting, t.EXPIRED)
    assert expired.status_reason == "expired before delivery"
    rig.dispatcher.result("car-1", sent, success=True, message="", detail=b"")
    await published(rig, sent, t.SUCCEEDED)
    assert queued_ids(session) == []  # the slot is free, but the expired one never goes
    assert rig.dispatcher.queues_in_memory == 0


async def test_a_command_whose_car_never_answers_is_unknown_at_its_result_deadline(
    make_rig: Callable[..., Rig], broker_time: ManualTime
) -> None:
    rig = make_rig()
    session = await connect_idle(rig)
    sent = (await submit(rig, command())).command_id
    assert await write_out(rig, session) == [(sent, 1)]
    broker_time.advance(30_000)  # unlock's result timeout
    assert await rig.dispatcher.fire_timers() == 1
    unknown = await published(rig, sent, t.UNKNOWN)
    assert "it may have been executed" in unknown.status_reason


async def test_a_command_durable_only_after_its_senders_deadline_is_abandoned_unsent(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=1, store=SlowDisk())
    session = await connect_idle(rig)
    [refused] = await rig.dispatcher.submit([command(commit_by_s=time.monotonic() - 1)])
    assert isinstance(refused, NotCommittedInTime)
    assert "canceled, never sent" in refused.message
    [late_id] = [c.command_id for c in await rig.store.list_vehicle("car-1", limit=10)]
    abandoned = await published(rig, late_id, t.CANCELED)
    assert "never sent" in abandoned.status_reason
    assert rig.dispatcher.abandoned == 1
    assert queued_ids(session) == []
    # Its window slot was never taken: the next command goes at once.
    created = await submit(rig, command())
    assert await write_out(rig, session) == [(created.command_id, 1)]


# -- a bounded queue in memory per connected car ------------------------------------------


def bulk(vehicle_id: str = "car-1", **kwargs: Any) -> NewCommand:
    return command(vehicle_id, name="config", lane=t.BULK, ttl_ms=3_600_000, **kwargs)


async def finish(rig: Rig, session: Session, command_id: str) -> None:
    """The car reports a result for a command it was written; wait until it is taken in."""
    rig.dispatcher.result(session.vehicle_id, command_id, success=True, message="", detail=b"")
    await eventually(
        lambda: any(
            c.command_id == command_id and c.status == t.SUCCEEDED for c in rig.events.published
        ),
        interval_s=0.001,
        what=f"{command_id} SUCCEEDED",
    )


async def test_a_car_that_does_not_read_costs_the_cap_and_later_gets_everything_in_order(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2, max_outbox_per_car=4)
    parked = await park(rig, *(bulk() for _ in range(30)))
    session = connect(rig)
    first = await expect_written(rig, session, 2)
    created = [(await submit(rig, bulk())).command_id for _ in range(30)]
    dispatcher = rig.dispatcher
    # Two on the wire, four queued in memory: the other 54 wait on disk only.
    assert dispatcher.commands_in_memory <= 4 + 2
    assert dispatcher.spilled_queues == 1
    statuses = {c.command_id: c.status for c in await rig.store.list_vehicle("car-1", limit=100)}
    assert {statuses[c] for c in created} == {t.QUEUED}  # past the cap: not about to be sent
    written = [command_id for command_id, _ in first]
    finished: set[str] = set()

    async def finish_written() -> None:
        for command_id in written:
            if command_id not in finished:
                finished.add(command_id)
                await finish(rig, session, command_id)

    while len(written) < 60:
        await finish_written()
        written += [c for c, _ in await expect_written(rig, session, 1)]
        assert dispatcher.commands_in_memory <= 4 + 2
    assert written == parked + created  # FIFO, each once
    await finish_written()
    await eventually(lambda: dispatcher.queues_in_memory, lambda n: n == 0, what="drained")
    assert dispatcher.refills > 0 and dispatcher.spills > 0


async def test_a_new_critical_command_goes_before_queued_bulk_even_past_the_cap(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=1, max_outbox_per_car=3)
    session = await connect_idle(rig)
    bulks = [(await submit(rig, bulk())).command_id for _ in range(10)]
    assert await write_out(rig, session) == [(bulks[0], 1)]
    unlock = (await submit(rig, command())).command_id  # critical, while 3 bulk are held
    assert rig.dispatcher.commands_in_memory <= 3 + 1
    order = []
    current = bulks[0]
    for _ in range(10):
        await finish(rig, session, current)
        [(current, _)] = await expect_written(rig, session, 1)
        order.append(current)
    assert order == [unlock, *bulks[1:]]


async def test_commands_past_the_cap_are_queued_again_when_the_car_goes(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=1, max_outbox_per_car=2)
    session = await connect_idle(rig)
    ids = [(await submit(rig, bulk())).command_id for _ in range(4)]
    unlocks = [(await submit(rig, command())).command_id for _ in range(3)]  # push bulk out
    assert rig.dispatcher.commands_in_memory <= 2 + 1
    assert await write_out(rig, session) == [(ids[0], 1)]
    assert rig.dispatcher.disconnect(session)

    def statuses() -> Any:
        return rig.store.list_vehicle("car-1", limit=100)

    stored = await eventually(
        statuses, lambda cs: all(c.status == t.QUEUED for c in cs), what="all QUEUED again"
    )
    assert len(stored) == 7
    session = connect(rig)
    written = [c for c, _ in await expect_written(rig, session, 1)]
    for _ in range(6):
        await finish(rig, session, written[-1])
        written += [c for c, _ in await expect_written(rig, session, 1)]
    assert written == [*unlocks, *ids]  # critical first; the bulk one sent before, again


@pytest.mark.parametrize("seed", range(8))
async def test_the_queue_held_is_always_the_head_of_the_cars_queue(
    make_rig: Callable[..., Rig], seed: int
) -> None:
    """Random lanes arriving while a car takes one command at a time: each command put
    in its outbox is, of those the dispatcher knows of and has not sent, the first in
    dispatch order (lane, then FIFO); every one is sent once; memory stays within the cap."""
    rng = random.Random(seed)
    rig = make_rig(window=1, max_outbox_per_car=3)
    names = {t.CRITICAL: "unlock", t.INTERACTIVE: "climate", t.BULK: "config"}
    put: list[str] = []
    not_the_head: list[str] = []

    class Judge(Outbox):
        def put(self, item: Any) -> None:
            found = command_in(item)
            if found is not None:
                known = {c.command_id: (-c.lane, c.seq) for c in rig.events.published}
                unsent = [key for cid, key in known.items() if cid not in put]
                if known[found.command_id] != min(unsent):
                    not_the_head.append(found.command_id)
                put.append(found.command_id)
            super().put(item)

    async def create() -> None:
        lane = rng.choice(list(names))
        await submit(rig, command(name=names[lane], lane=lane, ttl_ms=3_600_000))

    for _ in range(rng.randrange(0, 12)):
        await create()
    session = Session("car-1", now_ms=clock.now_ms())
    session.outbox = Judge()
    rig.dispatcher.connect(session)
    for _ in range(60):
        for _ in range(rng.choice((0, 0, 1, 2, 4))):
            await create()
        written = await write_out(rig, session)
        for command_id, _ in written:
            await finish(rig, session, command_id)
        assert rig.dispatcher.commands_in_memory <= 3 + 1
    created = {c.command_id for c in rig.events.published}
    while len(put) < len(created):
        for command_id, _ in await expect_written(rig, session, 1):
            await finish(rig, session, command_id)
    assert not_the_head == []
    assert sorted(put) == sorted(created)  # each once


# -- pending commands per sender ------------------------------------------------------------


async def test_pending_is_counted_per_sender_until_terminal(
    make_rig: Callable[..., Rig], broker_time: ManualTime
) -> None:
    rig = make_rig(window=1)
    dispatcher = rig.dispatcher
    a = [
        (await submit(rig, command(sender="a", idempotency_key=f"k{n}"))).command_id
        for n in range(3)
    ]
    await submit(rig, command("car-2", sender="b", ttl_ms=3_600_000))
    assert (dispatcher.pending_of("a"), dispatcher.pending_of("b")) == (3, 1)
    [repeat] = await dispatcher.submit([command(sender="a", idempotency_key="k0")])
    assert isinstance(repeat, Created) and repeat.deduplicated
    assert dispatcher.pending_of("a") == 3  # a deduplicated repeat adds nothing
    await dispatcher.cancel(a[0])
    await published(rig, a[0], t.CANCELED)
    assert dispatcher.pending_of("a") == 2
    # One sent and never answered: UNKNOWN at its deadline, then a late result.
    session = connect(rig)
    [(sent, _)] = await expect_written(rig, session, 1)
    broker_time.advance(30_000)
    await dispatcher.fire_timers()
    await published(rig, sent, t.UNKNOWN)
    assert dispatcher.pending_of("a") == 1
    dispatcher.result("car-1", sent, success=True, message="", detail=b"")
    await published(rig, sent, t.SUCCEEDED)
    assert dispatcher.pending_of("a") == 1  # UNKNOWN was terminal already
    broker_time.advance(60_000)  # the last one expires unsent
    await dispatcher.fire_timers()
    await eventually(lambda: dispatcher.pending_of("a"), lambda n: n == 0, what="a at 0")
    assert dispatcher.pending_by_sender == {"b": 1}


async def test_pending_per_sender_survives_a_restart(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    for sender, n in (("a", 3), ("b", 2)):
        for _ in range(n):
            await submit(rig, command(sender=sender))
    restarted = Dispatcher(rig.store, SessionRegistry(), RecordingHub(), Config())
    assert await restarted.recover() == 5
    assert restarted.pending_by_sender == {"a": 3, "b": 2}


async def test_a_failed_or_refused_write_counts_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(store=SlowDisk())
    [late] = await rig.dispatcher.submit([command(sender="a", commit_by_s=time.monotonic() - 1)])
    assert isinstance(late, NotCommittedInTime)
    await eventually(lambda: rig.dispatcher.pending_of("a"), lambda n: n == 0, what="a at 0")
    assert rig.dispatcher.refusals["commit_deadline"] == 1
