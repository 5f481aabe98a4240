"""Live vehicle state: reports land in memory; the store gets them spread over the persist
interval (the in-memory store: the LMDB one passes the same store tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker.core.sessions import SessionRegistry
from broker.core.state import VehicleStates
from broker.storage.memory import MemoryStore
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link


def _signal(name: str, value: float, at_ms: int) -> link.Signal:
    return link.Signal(name=name, value=t.Value(number=value), reported_at_ms=at_ms)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    store.start(asyncio.get_running_loop())
    yield store
    await store.close()


async def test_flush_persists_the_oldest_changes_first_a_share_at_a_time(
    store: MemoryStore,
) -> None:
    states = VehicleStates(store, SessionRegistry(), max_fields=16)
    cars = [f"car-{i}" for i in range(10)]
    for n, vehicle_id in enumerate(cars):
        await states.attach(vehicle_id)
        states.report(vehicle_id, [_signal("soc", n, 1_000 + n)], 1_000 + n)
    await states.flush(share=0.3)  # 3 of 10, the oldest changes
    stored = [await store.get_state(v) for v in cars]
    assert [s is not None for s in stored] == [True] * 3 + [False] * 7
    assert stored[0] is not None and stored[0].fields["soc"].value.number == 0
    # Anything changed before the cut-off goes too, whatever the share.
    await states.flush(share=0.0, changed_before_ms=1_008)
    assert [await store.get_state(v) is not None for v in cars] == [True] * 8 + [False] * 2
    await states.flush()  # everything (shutdown)
    assert all([await store.get_state(v) is not None for v in cars])


async def test_reads_see_reports_at_once_and_a_departing_car_is_persisted(
    store: MemoryStore,
) -> None:
    states = VehicleStates(store, SessionRegistry(), max_fields=16)
    await states.attach("car-1")
    states.report("car-1", [_signal("speed", 10, 2_000)], 2_000)
    states.report("car-1", [_signal("speed", 5, 1_500)], 2_001)  # older: ignored
    states.report("car-1", [_signal("speed", 12, 2_002)], 2_002)
    assert (await states.get("car-1")).fields["speed"].value.number == 12
    assert await store.get_state("car-1") is None  # not yet persisted
    await states.detach("car-1")
    stored = await store.get_state("car-1")
    assert stored is not None and stored.fields["speed"].value.number == 12
    assert stored.fields["speed"].reported_at_ms == 2_002


async def test_what_the_hello_said_is_kept_with_the_state(store: MemoryStore) -> None:
    states = VehicleStates(store, SessionRegistry(), max_fields=16)
    await states.attach("car-1")
    states.hello("car-1", "2.4.1", ["unlock", "lock"])
    state = await states.get("car-1")
    assert (state.firmware, list(state.capabilities)) == ("2.4.1", ["unlock", "lock"])
    await states.detach("car-1")
    stored = await store.get_state("car-1")
    assert stored is not None and stored.firmware == "2.4.1"
    await states.attach("car-1")
    states.hello("car-1", "2.5.0", [])  # an update replaces both
    state = await states.get("car-1")
    assert (state.firmware, list(state.capabilities)) == ("2.5.0", [])
