"""The per-car outbox and session: order, batching, waking the one writer, closing."""

from __future__ import annotations

import asyncio

import pytest

from broker.core.errors import Unavailable
from broker.core.quotas import Refusals
from broker.core.sessions import CLOSE, Outbox, Session, StreamDeferred, StreamGate


async def test_outbox_hands_out_in_order_and_in_bounded_batches() -> None:
    outbox = Outbox()
    for n in range(5):
        outbox.put(n)
    assert len(outbox) == 5
    assert await outbox.take(3) == [0, 1, 2]
    assert await outbox.take(3) == [3, 4]
    assert len(outbox) == 0


async def test_outbox_wakes_a_waiting_writer() -> None:
    outbox = Outbox()
    taker = asyncio.create_task(outbox.take(10))
    await asyncio.sleep(0)
    assert not taker.done()
    outbox.put("a")
    outbox.put("b")  # both arrive before the writer runs: one batch
    assert await asyncio.wait_for(taker, 1) == ["a", "b"]


async def test_outbox_survives_a_cancelled_writer() -> None:
    outbox = Outbox()
    taker = asyncio.create_task(outbox.take(1))
    await asyncio.sleep(0)
    taker.cancel()
    await asyncio.gather(taker, return_exceptions=True)
    outbox.put("x")  # no waiter left to wake; nothing raises
    assert await outbox.take(1) == ["x"]


async def test_session_close_ends_with_close_and_drops_later_frames() -> None:
    session = Session("car-1", now_ms=1)
    session.send("frame")
    session.close()
    session.send("too late")
    session.close()  # idempotent
    assert await session.outbox.take(10) == ["frame", CLOSE]


def test_a_car_reconnecting_in_a_loop_is_deferred_on_its_own_budget() -> None:
    refusals = Refusals()
    gate = StreamGate(1000, 1000, vehicle_rate_per_s=0.5, vehicle_burst=3, refusals=refusals)
    for _ in range(3):
        gate.admit("car-loop")
    for _ in range(50):
        with pytest.raises(StreamDeferred) as deferred:
            gate.admit("car-loop")
    error = deferred.value
    assert isinstance(error, Unavailable) and error.code == "UNAVAILABLE"
    assert error.reason == "stream_budget_vehicle"
    assert error.retry_after_ms is not None and 2000 <= error.retry_after_ms <= 3100
    gate.admit("car-other")  # the fleet's budget was not spent by the loop
    assert (gate.admitted, gate.deferred, gate.deferred_vehicle) == (4, 0, 50)
    assert refusals["stream_budget_vehicle"] == 50 and refusals["stream_budget"] == 0


def test_a_car_the_fleet_budget_defers_keeps_its_own_token() -> None:
    gate = StreamGate(0.001, 1, vehicle_rate_per_s=0.001, vehicle_burst=1)
    gate.admit("car-1")
    with pytest.raises(StreamDeferred) as deferred:
        gate.admit("car-2")
    assert deferred.value.reason == "stream_budget"
    assert gate.refusals["stream_budget"] == 1
    gate._tokens = 1  # the fleet's bucket refilled
    gate.admit("car-2")  # its own token was given back when the fleet deferred it


def test_the_cars_stream_buckets_are_bounded() -> None:
    gate = StreamGate(1e9, 1e9, max_vehicles=100)
    for i in range(1000):
        gate.admit(f"car-{i}")
    assert gate.vehicle_buckets == 100
    gate.admit()  # without a car id: the fleet's budget only
