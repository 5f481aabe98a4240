"""EventHub: waiters get the first matching change, watches see what they filter for, and
both end cleanly at shutdown or when a watcher falls behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from broker.core.errors import BrokerError, QuotaExceeded, Unavailable
from broker.core.events import EventHub
from broker.v1 import types_pb2 as t
from tests.conftest import eventually


def change(command_id: str, status: int, vehicle_id: str = "car-1") -> Any:
    return t.Command(command_id=command_id, vehicle_id=vehicle_id, status=status)


def done(command: Any) -> bool:
    return command.status in (t.SUCCEEDED, t.FAILED)


async def consume(stream: AsyncIterator[Any]) -> tuple[list[Any], BrokerError | None]:
    """Everything a watch yields, and the error that ended it (None: it just ended)."""
    got: list[Any] = []
    try:
        async for command in stream:
            got.append(command)
    except BrokerError as error:
        return got, error
    return got, None


async def watching(
    hub: EventHub, vehicle_ids: Sequence[str] = (), command_ids: Sequence[str] = ()
) -> asyncio.Task[tuple[list[Any], BrokerError | None]]:
    """A task consuming a new watch, returned once the hub counts the watch."""
    before = hub.watcher_count
    task = asyncio.create_task(consume(hub.watch(vehicle_ids, command_ids)))
    await eventually(lambda: hub.watcher_count > before or task.done(), what="the watch")
    assert not task.done(), task.result()
    return task


# -- waiters ------------------------------------------------------------------------------


async def test_a_waiter_resolves_on_the_first_matching_change_of_its_command() -> None:
    hub = EventHub()
    waiter = hub.waiter("c-1", done)
    hub.publish(change("c-1", t.DELIVERED))  # its command, not a match
    hub.publish(change("c-2", t.SUCCEEDED))  # a match, another command
    assert not waiter.done()
    succeeded = change("c-1", t.SUCCEEDED)
    hub.publish(succeeded)
    assert waiter.result() is succeeded
    hub.publish(change("c-1", t.FAILED))  # later changes leave the answer alone
    assert waiter.result() is succeeded


async def test_waiters_of_one_command_resolve_each_by_its_own_predicate() -> None:
    hub = EventHub()
    delivered = hub.waiter("c-1", lambda c: c.status == t.DELIVERED)
    finished = hub.waiter("c-1", done)
    first = change("c-1", t.DELIVERED)
    hub.publish(first)
    assert delivered.result() is first and not finished.done()
    last = change("c-1", t.SUCCEEDED)
    hub.publish(last)
    assert finished.result() is last


async def test_a_forgotten_waiter_is_never_answered_and_others_still_are() -> None:
    hub = EventHub()
    forgotten = hub.waiter("c-1", done)
    kept = hub.waiter("c-1", done)
    hub.forget("c-1", forgotten)
    hub.forget("c-1", forgotten)  # twice: nothing left to remove, no error
    hub.forget("never-waited", forgotten)
    hub.publish(change("c-1", t.SUCCEEDED))
    assert not forgotten.done()
    assert kept.done()


async def test_a_waiter_whose_caller_gave_up_is_skipped() -> None:
    hub = EventHub()
    abandoned = hub.waiter("c-1", done)
    abandoned.cancel()  # the caller's deadline passed
    still_waiting = hub.waiter("c-1", done)
    final = change("c-1", t.SUCCEEDED)
    hub.publish(final)  # no InvalidStateError from the cancelled future
    assert abandoned.cancelled()
    assert still_waiting.result() is final


async def test_status_counts_count_every_published_change_by_status() -> None:
    hub = EventHub()
    for status in (t.QUEUED, t.DELIVERED, t.SUCCEEDED, t.QUEUED):
        hub.publish(change("c-1", status))
    assert hub.status_counts == {t.QUEUED: 2, t.DELIVERED: 1, t.SUCCEEDED: 1}


# -- watches ------------------------------------------------------------------------------


async def test_watches_filter_by_vehicle_and_by_command_id() -> None:
    hub = EventHub()
    everything = await watching(hub)
    car_1 = await watching(hub, vehicle_ids=["car-1"])
    by_id = await watching(hub, command_ids=["c-3"])
    either = await watching(hub, vehicle_ids=["car-2"], command_ids=["c-1"])
    changes = [
        change("c-1", t.QUEUED, "car-1"),
        change("c-2", t.QUEUED, "car-2"),
        change("c-3", t.QUEUED, "car-3"),
        change("c-1", t.DELIVERED, "car-1"),
    ]
    for command in changes:
        hub.publish(command)
    hub.drain()
    results = await asyncio.wait_for(asyncio.gather(everything, car_1, by_id, either), 5)
    got = [[(c.command_id, c.status) for c in commands] for commands, _ in results]
    assert got == [
        [("c-1", t.QUEUED), ("c-2", t.QUEUED), ("c-3", t.QUEUED), ("c-1", t.DELIVERED)],
        [("c-1", t.QUEUED), ("c-1", t.DELIVERED)],
        [("c-3", t.QUEUED)],
        [("c-1", t.QUEUED), ("c-2", t.QUEUED), ("c-1", t.DELIVERED)],  # a vehicle or an id
    ]
    assert hub.watcher_count == 0


async def test_a_watcher_that_falls_behind_its_depth_ends_resource_exhausted() -> None:
    hub = EventHub(watcher_depth=2)
    slow = await watching(hub)
    for n in range(4):  # the watcher runs only after all four: two fit
        hub.publish(change(f"c-{n}", t.QUEUED))
    got, error = await asyncio.wait_for(slow, 5)
    assert [c.command_id for c in got] == ["c-0", "c-1"]  # what fitted, then the end
    assert isinstance(error, QuotaExceeded) and error.code == "RESOURCE_EXHAUSTED"
    assert "fell more than 2 changes behind" in error.message
    assert hub.watcher_count == 0


async def test_a_watcher_that_keeps_up_is_not_ended_by_another_falling_behind() -> None:
    hub = EventHub(watcher_depth=2)
    lagging = await watching(hub, vehicle_ids=["busy"])
    calm = await watching(hub, vehicle_ids=["calm"])
    for n in range(3):
        hub.publish(change(f"b-{n}", t.QUEUED, "busy"))
    hub.publish(change("quiet", t.QUEUED, "calm"))
    _, lagging_error = await asyncio.wait_for(lagging, 5)
    assert isinstance(lagging_error, QuotaExceeded)
    assert not calm.done()
    hub.drain()
    got, calm_error = await asyncio.wait_for(calm, 5)
    assert [c.command_id for c in got] == ["quiet"]
    assert isinstance(calm_error, Unavailable)


async def test_a_watch_whose_caller_goes_away_is_removed() -> None:
    hub = EventHub()
    task = await watching(hub)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.watcher_count == 0
    hub.publish(change("c-1", t.QUEUED))  # nobody to queue it for


# -- drain (shutdown) -----------------------------------------------------------------------


async def test_drain_answers_every_waiter_with_none_and_later_ones_at_once() -> None:
    hub = EventHub()
    waiters = [hub.waiter("c-1", done), hub.waiter("c-2", done)]
    hub.drain()
    assert [w.result() for w in waiters] == [None, None]
    late = hub.waiter("c-3", done)
    assert late.done() and late.result() is None
    hub.publish(change("c-1", t.SUCCEEDED))  # nothing left to answer
    assert [w.result() for w in waiters] == [None, None]


async def test_drain_ends_an_idle_watch_with_unavailable_and_a_retry_hint() -> None:
    hub = EventHub()
    idle = await watching(hub)  # waiting on an empty queue
    hub.drain()
    got, error = await asyncio.wait_for(idle, 5)
    assert got == []
    assert isinstance(error, Unavailable) and error.code == "UNAVAILABLE"
    assert error.retry_after_ms is not None and 1000 <= error.retry_after_ms <= 3000
    assert "shutting down" in error.message


async def test_drain_ends_a_watch_after_what_it_had_queued_even_when_full() -> None:
    hub = EventHub(watcher_depth=2)
    roomy = await watching(hub, vehicle_ids=["car-1"])
    full = await watching(hub, vehicle_ids=["car-2"])
    hub.publish(change("a", t.QUEUED, "car-1"))
    hub.publish(change("b", t.QUEUED, "car-2"))
    hub.publish(change("c", t.QUEUED, "car-2"))  # car-2's queue is now full
    hub.drain()
    for task, expected in ((roomy, ["a"]), (full, ["b", "c"])):
        got, error = await asyncio.wait_for(task, 5)
        assert [c.command_id for c in got] == expected
        assert isinstance(error, Unavailable)


async def test_a_watch_started_while_draining_is_refused() -> None:
    hub = EventHub()
    hub.drain()
    got, error = await consume(hub.watch([], []))
    assert got == []
    assert isinstance(error, Unavailable) and error.retry_after_ms is not None
    assert hub.watcher_count == 0
