"""The command store: its lifecycle, indexes, timers and recovery, on LMDB and in memory.

The tests of what a store does run against both stores (the `backend` fixture), so the
in-memory store the domain's unit tests use is held to the LMDB store's behaviour,
property tests included. The tests of what only LMDB has (a folder reopened after a
stop, map growth, layout migrations, disk space, the payload table, the folder lock)
come last, under "LMDB only", and open the store with `open_store`.

Every test passes explicit `now_ms` values, so nothing here sleeps or reads the clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from broker.core import clock, lifecycle
from broker.core.errors import Conflict, FailedPrecondition, NotFound, StoreUnavailable
from broker.core.lifecycle import TERMINAL
from broker.core.store import Created, NewCommand, NotCommittedInTime, Store
from broker.storage.lmdb_store import RECLAIM_MIN_AGE_MS, SPACE_CHECK_INTERVAL_S, LmdbStore
from broker.storage.memory import MemoryStore
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker_ext import codec

T0 = 1_700_000_000_000
RETENTION_MS = 10_000
IDEMPOTENCY_WINDOW_MS = 60_000

OpenStore = Callable[..., Awaitable[LmdbStore]]


def new(
    vehicle_id: str = "car-1",
    *,
    name: str = "unlock",
    payload: bytes = b"{}",
    lane: int = t.CRITICAL,
    ttl_ms: int = 60_000,
    idempotency_key: str = "",
    coalesce_key: str = "",
    sender: str = "",
) -> NewCommand:
    return NewCommand(
        vehicle_id=vehicle_id,
        name=name,
        payload=payload,
        lane=lane,
        ttl_ms=ttl_ms,
        idempotency_key=idempotency_key,
        coalesce_key=coalesce_key,
        sender=sender,
    )


async def create_one(
    store: Store, item: NewCommand, *, now_ms: int, online: frozenset[str] = frozenset()
) -> Created:
    [result] = await store.create([item], online=online, now_ms=now_ms)
    assert isinstance(result, Created), result
    return result


async def create_id(
    store: Store, item: NewCommand, *, now_ms: int, online: Iterable[str] = ()
) -> str:
    result = await create_one(store, item, now_ms=now_ms, online=frozenset(online))
    return str(result.command.command_id)


async def status_of(store: Store, command_id: str) -> int:
    return int((await store.get(command_id)).status)


@dataclass
class Dump:
    """Every index of a store, decoded as LMDB keys them, read in one go."""

    commands: dict[str, Any] = field(default_factory=dict)
    timers: list[tuple[int, str]] = field(default_factory=list)
    by_vehicle: dict[bytes, str] = field(default_factory=dict)
    idem: dict[str, str] = field(default_factory=dict)
    coalesce: dict[bytes, str] = field(default_factory=dict)
    pending: dict[bytes, str] = field(default_factory=dict)
    pending_count: int = 0


async def dump(store: Store) -> Dump:
    # White-box on purpose: the invariants below are about the indexes themselves.
    if isinstance(store, MemoryStore):
        return _dump_memory(store)
    assert isinstance(store, LmdbStore)
    return await _dump_lmdb(store)


async def _dump_lmdb(store: LmdbStore) -> Dump:
    def op(txn: Any) -> Dump:  # in one transaction on the writer thread
        out = Dump()
        for key, value in txn.cursor(db=store._commands):
            out.commands[key.decode()] = t.Command.FromString(value)
        out.timers = [codec.split_timer_key(k) for k, _ in txn.cursor(db=store._timers)]
        out.by_vehicle = {k: v.decode() for k, v in txn.cursor(db=store._by_vehicle)}
        # keys are "scope 0x00 key"; these tests use the empty scope
        out.idem = {
            k.decode().split("\x00", 1)[1]: v.decode() for k, v in txn.cursor(db=store._idem)
        }
        out.coalesce = {k: v.decode() for k, v in txn.cursor(db=store._coalesce)}
        out.pending = {k: v.decode() for k, v in txn.cursor(db=store._pending)}
        out.pending_count = store.pending
        return out

    return await store.writer.submit(op)


def _dump_memory(store: MemoryStore) -> Dump:
    # Only the records and the two keyed indexes are held; the rest is derived from them.
    out = Dump()
    for command_id in sorted(store._commands):
        out.commands[command_id] = t.Command.FromString(
            store._commands[command_id].SerializeToString()
        )  # a copy: the store changes its records in place
    records = out.commands.items()
    out.timers = sorted((lifecycle.timer_at(c, store._retention_ms), cid) for cid, c in records)
    out.by_vehicle = {codec.vehicle_key(c.vehicle_id, c.seq): cid for cid, c in records}
    out.idem = {key: command_id for (_, key), command_id in store._idem.items()}
    out.coalesce = {
        codec.coalesce_key(v, f"{sender}\x00{key}"): cid
        for (v, sender, key), cid in store._coalesce.items()
    }
    out.pending = {
        codec.pending_key(c.vehicle_id, c.lane, c.seq): cid
        for cid, c in records
        if c.status not in TERMINAL
    }
    out.pending_count = store.pending
    return out


@dataclass(frozen=True)
class Backend:
    """One store implementation, as the shared tests open it."""

    name: str
    #: `start(folder, loop, retention_ms=..., idempotency_window_ms=...)`: a started store
    start: Callable[..., Store]
    #: a store opened again on the folder has what the last one wrote
    durable: bool


def _start_lmdb(folder: Path, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> Store:
    # fsync off: these tests are about semantics; the LMDB-only ones below keep it on.
    store = LmdbStore(folder, fsync=False, **kwargs)
    store.start(loop)
    return store


def _start_memory(folder: Path, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> Store:
    store = MemoryStore(**kwargs)
    store.start(loop)
    return store


BACKENDS = [Backend("lmdb", _start_lmdb, durable=True), Backend("memory", _start_memory, False)]


@pytest.fixture(params=BACKENDS, ids=[backend.name for backend in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each store implementation in turn."""
    result: Backend = request.param
    return result


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[Store]:
    """A started store of each implementation, closed at teardown."""
    started = backend.start(
        tmp_path / "db",
        asyncio.get_running_loop(),
        retention_ms=RETENTION_MS,
        idempotency_window_ms=IDEMPOTENCY_WINDOW_MS,
    )
    yield started
    await started.close()


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """LMDB only. `await open_store(**kwargs)`: a started LmdbStore in tmp_path; closed
    at teardown. Opening again closes the previous one first, so a test can reopen the
    same folder."""
    opened: list[LmdbStore] = []

    async def open_(**kwargs: Any) -> LmdbStore:
        if opened:
            await opened.pop().close()
        kwargs.setdefault("retention_ms", RETENTION_MS)
        kwargs.setdefault("idempotency_window_ms", IDEMPOTENCY_WINDOW_MS)
        store = LmdbStore(tmp_path / "db", **kwargs)
        store.start(asyncio.get_running_loop())
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


# -- create ------------------------------------------------------------------------------------


async def test_create_queues_offline_and_accepts_online(store: Store) -> None:
    results = await store.create(
        [new("car-1"), new("car-2", ttl_ms=5_000)], online={"car-2"}, now_ms=T0
    )
    offline, online = results
    assert isinstance(offline, Created) and isinstance(online, Created)
    assert offline.command.status == t.QUEUED
    assert online.command.status == t.ACCEPTED
    assert not offline.deduplicated and offline.superseded == ()
    assert online.command.expires_at_ms == T0 + 5_000
    assert online.command.created_at_ms == online.command.updated_at_ms == T0
    assert online.command.attempt == 0
    assert online.command.seq == offline.command.seq + 1
    stored = await store.get(online.command.command_id)
    assert stored == online.command


async def test_get_unknown_command_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get("nope")


async def test_a_new_store_is_empty_with_room_and_counts_its_operations(store: Store) -> None:
    assert store.pending == 0
    assert store.clock_reference == (0, 0, "")
    assert store.space_problem() is None and store.space_problem(critical=True) is None
    assert store.room_bytes >= store.reserve_bytes and store.space_refusals == 0
    before = store.operations
    cid = await create_id(store, new(), now_ms=T0)
    await store.get(cid)
    await store.list_vehicle("car-1", limit=1)
    assert store.operations == before + 3 and store.commits >= 1
    assert store.pending == 1


async def test_operations_complete_in_submission_order_each_seeing_the_ones_before(
    store: Store,
) -> None:
    cid = await create_id(store, new(), now_ms=T0)
    submitted = {
        "get": store.get(cid),
        "cancel": store.cancel(cid, now_ms=T0 + 1),
        "get again": store.get(cid),
        "cancel unknown": store.cancel("nope", now_ms=T0 + 1),
        "list": store.list_vehicle("car-1", limit=10),
    }
    completed: list[str] = []
    for name, future in submitted.items():
        future.add_done_callback(lambda _, name=name: completed.append(name))
    first, _, again, unknown, listed = await asyncio.gather(
        *submitted.values(), return_exceptions=True
    )
    assert completed == list(submitted)
    assert first.status == t.QUEUED and again.status == t.CANCELED
    assert isinstance(unknown, NotFound)
    assert [c.status for c in listed] == [t.CANCELED]


async def test_records_handed_out_are_copies(store: Store) -> None:
    created = await create_one(store, new(), now_ms=T0)
    created.command.status = t.SUCCEEDED
    fetched = await store.get(created.command.command_id)
    fetched.payload = b"changed"
    again = await store.get(created.command.command_id)
    assert (again.status, again.payload) == (t.QUEUED, b"{}")


async def test_a_closed_store_refuses_work(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get(cid)


# -- delivery, ack, result ---------------------------------------------------------------------


async def test_mark_delivered_counts_attempts_and_sets_the_result_deadline(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0, online={"car-1"})
    [first] = await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 10)
    assert first.status == t.DELIVERED
    assert first.attempt == 1
    assert first.delivered_at_ms == T0 + 10
    assert first.result_deadline_ms == T0 + 10 + 30_000
    [again] = await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 500)
    assert again.attempt == 2
    assert again.delivered_at_ms == T0 + 10  # the first delivery is kept
    assert again.result_deadline_ms == T0 + 500 + 30_000
    assert (await store.get(cid)) == again


async def test_mark_delivered_ignores_unknown_and_terminal_commands(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0)
    await store.cancel(cid, now_ms=T0 + 1)
    assert await store.mark_delivered([(cid, 1_000), ("nope", 1_000)], now_ms=T0 + 2) == []
    command = await store.get(cid)
    assert command.status == t.CANCELED and command.attempt == 0


async def test_mark_acked(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0, online={"car-1"})
    assert (
        await store.mark_acked(cid, now_ms=T0 + 1, result_timeout_ms=30_000) is None
    )  # never sent: ignored
    assert await status_of(store, cid) == t.ACCEPTED
    await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 2)
    acked = await store.mark_acked(cid, now_ms=T0 + 3, result_timeout_ms=30_000)
    assert acked.status == t.ACKED and acked.updated_at_ms == T0 + 3
    assert (
        await store.mark_acked(cid, now_ms=T0 + 4, result_timeout_ms=30_000) is None
    )  # a duplicate ack
    assert await store.mark_acked("nope", now_ms=T0 + 4, result_timeout_ms=30_000) is None


@pytest.mark.parametrize(("success", "expected"), [(True, t.SUCCEEDED), (False, t.FAILED)])
async def test_record_result(store: Store, success: bool, expected: int) -> None:
    cid = await create_id(store, new(), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 1)
    await store.mark_acked(cid, now_ms=T0 + 2, result_timeout_ms=30_000)
    done = await store.record_result(
        cid, vehicle_id="car-1", success=success, message="ok?", detail=b"\x01", now_ms=T0 + 3
    )
    assert done.status == expected
    assert (done.result_message, done.result_detail) == ("ok?", b"\x01")
    assert await store.get(cid) == done
    # Final: a second result changes nothing.
    late = await store.record_result(
        cid, vehicle_id="car-1", success=not success, message="", detail=b"", now_ms=T0 + 4
    )
    assert late is None
    assert await store.get(cid) == done


async def test_result_from_another_vehicle_is_ignored(store: Store) -> None:
    cid = await create_id(store, new("car-1"), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 1)
    forged = await store.record_result(
        cid, vehicle_id="car-2", success=True, message="", detail=b"", now_ms=T0 + 2
    )
    assert forged is None
    assert await status_of(store, cid) == t.DELIVERED


async def test_result_for_a_command_never_sent_is_ignored(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0)
    result = await store.record_result(
        cid, vehicle_id="car-1", success=True, message="", detail=b"", now_ms=T0 + 1
    )
    assert result is None
    assert await status_of(store, cid) == t.QUEUED
    unknown = await store.record_result(
        "nope", vehicle_id="car-1", success=True, message="", detail=b"", now_ms=T0 + 1
    )
    assert unknown is None


async def test_late_result_refines_unknown(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 1_000)], now_ms=T0 + 1)
    changed, due = await store.fire_timers(now_ms=T0 + 1_001)
    assert [c.command_id for c in changed] == [cid] and due == 1
    assert changed[0].status == t.UNKNOWN
    assert "may have been executed" in changed[0].status_reason
    refined = await store.record_result(
        cid, vehicle_id="car-1", success=True, message="done", detail=b"", now_ms=T0 + 5_000
    )
    assert refined.status == t.SUCCEEDED
    assert "after the result timeout" in refined.status_reason
    assert await store.get(cid) == refined


# -- requeue and cancel ------------------------------------------------------------------------


async def test_requeue_keeps_the_attempt_count(store: Store) -> None:
    accepted = await create_id(store, new(), now_ms=T0, online={"car-1"})
    delivered = await create_id(store, new(), now_ms=T0, online={"car-1"})
    acked = await create_id(store, new(), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(delivered, 30_000), (acked, 30_000)], now_ms=T0 + 1)
    await store.mark_acked(acked, now_ms=T0 + 2, result_timeout_ms=30_000)
    changed = await store.requeue([accepted, delivered, acked, "nope"], now_ms=T0 + 3)
    assert [c.command_id for c in changed] == [accepted, delivered]
    assert all(c.status == t.QUEUED for c in changed)
    assert changed[1].attempt == 1
    assert await status_of(store, acked) == t.ACKED  # acked: the car has it, wait for the result
    [redelivered] = await store.mark_delivered([(delivered, 30_000)], now_ms=T0 + 4)
    assert redelivered.attempt == 2


async def test_cancel_before_delivery(store: Store) -> None:
    queued = await create_id(store, new("car-1"), now_ms=T0)
    accepted = await create_id(store, new("car-2"), now_ms=T0, online={"car-2"})
    for cid in (queued, accepted):
        canceled = await store.cancel(cid, now_ms=T0 + 1)
        assert canceled.status == t.CANCELED
        assert canceled.status_reason == "canceled by request"
        assert await status_of(store, cid) == t.CANCELED


async def test_cancel_after_delivery_is_a_failed_precondition(store: Store) -> None:
    delivered = await create_id(store, new(), now_ms=T0, online={"car-1"})
    acked = await create_id(store, new(), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(delivered, 30_000), (acked, 30_000)], now_ms=T0 + 1)
    await store.mark_acked(acked, now_ms=T0 + 2, result_timeout_ms=30_000)
    for cid, status in ((delivered, t.DELIVERED), (acked, t.ACKED)):
        with pytest.raises(FailedPrecondition, match="only a command not yet delivered"):
            await store.cancel(cid, now_ms=T0 + 3)
        assert await status_of(store, cid) == status


async def test_cancel_after_delivery_and_requeue_is_a_failed_precondition(store: Store) -> None:
    # Requeued after a disconnect: QUEUED again, but the car may already have run it.
    cid = await create_id(store, new(), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 1)
    await store.requeue([cid], now_ms=T0 + 2)
    with pytest.raises(FailedPrecondition):
        await store.cancel(cid, now_ms=T0 + 3)
    command = await store.get(cid)
    assert (command.status, command.attempt) == (t.QUEUED, 1)


async def test_cancel_terminal_or_unknown(store: Store) -> None:
    cid = await create_id(store, new(), now_ms=T0)
    await store.cancel(cid, now_ms=T0 + 1)
    with pytest.raises(FailedPrecondition, match="CANCELED"):
        await store.cancel(cid, now_ms=T0 + 2)
    with pytest.raises(NotFound):
        await store.cancel("nope", now_ms=T0 + 2)


# -- timers ------------------------------------------------------------------------------------


async def test_never_delivered_command_expires_at_its_deadline(store: Store) -> None:
    cid = await create_id(store, new(ttl_ms=5_000), now_ms=T0)
    assert await store.fire_timers(now_ms=T0 + 4_999) == ([], 0)
    changed, due = await store.fire_timers(now_ms=T0 + 5_000)
    assert [(c.command_id, c.status) for c in changed] == [(cid, t.EXPIRED)]
    assert changed[0].status_reason == "expired before delivery"
    assert due == 1
    # Hard not-after: a delivery or ack recorded after the expiry changes nothing.
    assert await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 5_001) == []
    assert await store.mark_acked(cid, now_ms=T0 + 5_001, result_timeout_ms=30_000) is None
    command = await store.get(cid)
    assert (command.status, command.attempt) == (t.EXPIRED, 0)


async def test_delivered_command_without_result_becomes_unknown(store: Store) -> None:
    cid = await create_id(store, new(ttl_ms=5_000), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 20_000)], now_ms=T0 + 100)
    # The expiry no longer applies once delivered; the result deadline does.
    assert await store.fire_timers(now_ms=T0 + 20_099) == ([], 0)
    changed, _ = await store.fire_timers(now_ms=T0 + 20_100)
    assert [(c.command_id, c.status) for c in changed] == [(cid, t.UNKNOWN)]


async def test_fire_timers_respects_its_limit(store: Store) -> None:
    ids = [await create_id(store, new(ttl_ms=1_000 + i), now_ms=T0) for i in range(5)]
    first, _ = await store.fire_timers(now_ms=T0 + 10_000, limit=3)
    second, _ = await store.fire_timers(now_ms=T0 + 10_000, limit=3)
    assert [c.command_id for c in first + second] == ids  # soonest deadline first


async def test_terminal_commands_are_purged_after_retention(store: Store) -> None:
    item = new(idempotency_key="idem-1", coalesce_key="climate", ttl_ms=1_000)
    cid = await create_id(store, item, now_ms=T0)
    await store.cancel(cid, now_ms=T0 + 1)
    assert await store.fire_timers(now_ms=T0 + 1 + RETENTION_MS - 1) == ([], 0)
    assert await store.get(cid)  # still queryable within retention
    assert await store.fire_timers(now_ms=T0 + 1 + RETENTION_MS) == ([], 1)
    with pytest.raises(NotFound):
        await store.get(cid)
    assert await store.list_vehicle("car-1", limit=10) == []
    state = await dump(store)
    assert state == Dump()  # no command, timer, or index entry is left behind
    # The keys are free again: a new command neither deduplicates nor conflicts.
    again = await create_one(
        store,
        new(idempotency_key="idem-1", coalesce_key="climate", payload=b"x"),
        now_ms=T0 + 2 + RETENTION_MS,
    )
    assert not again.deduplicated and again.superseded == ()


async def test_purge_keeps_index_entries_that_moved_to_a_newer_command(store: Store) -> None:
    old = await create_id(store, new(coalesce_key="climate", payload=b"1"), now_ms=T0)
    newer = await create_one(store, new(coalesce_key="climate", payload=b"2"), now_ms=T0 + 1)
    assert [c.command_id for c in newer.superseded] == [old]
    assert await store.fire_timers(now_ms=T0 + 1 + RETENTION_MS) == ([], 1)
    state = await dump(store)
    assert list(state.commands) == [newer.command.command_id]
    assert state.coalesce == {b"car-1\x00\x00climate": newer.command.command_id}


# -- idempotency -------------------------------------------------------------------------------


async def test_same_idempotency_key_and_request_returns_the_first_command(store: Store) -> None:
    first = await create_one(store, new(idempotency_key="k"), now_ms=T0)
    again = await create_one(store, new(idempotency_key="k"), now_ms=T0 + 1_000)
    assert again.deduplicated
    assert again.command.command_id == first.command.command_id
    assert len(await store.list_vehicle("car-1", limit=10)) == 1


async def test_same_idempotency_key_in_one_batch(store: Store) -> None:
    first, second = await store.create(
        [new(idempotency_key="k"), new(idempotency_key="k")], online=(), now_ms=T0
    )
    assert isinstance(first, Created) and isinstance(second, Created)
    assert second.deduplicated and second.command.command_id == first.command.command_id


@pytest.mark.parametrize(
    "different",
    [new(idempotency_key="k", payload=b"other"), new("car-2", idempotency_key="k")],
    ids=["payload", "vehicle"],
)
async def test_same_idempotency_key_for_another_request_conflicts(
    store: Store, different: NewCommand
) -> None:
    first = await create_one(store, new(idempotency_key="k"), now_ms=T0)
    ok, conflict = await store.create(
        [new("car-3"), different], online=(), now_ms=T0 + 1
    )  # a per-item error leaves the rest of the batch alone
    assert isinstance(ok, Created)
    assert isinstance(conflict, Conflict)
    assert first.command.command_id in conflict.message
    # Nothing was written for the conflicting item.
    assert await store.list_vehicle("car-1", limit=10) == [first.command]
    assert await store.list_vehicle("car-2", limit=10) == []


async def test_idempotency_key_outside_its_window_makes_a_new_command(store: Store) -> None:
    first = await create_one(store, new(idempotency_key="k"), now_ms=T0)
    later = T0 + IDEMPOTENCY_WINDOW_MS
    second = await create_one(store, new(idempotency_key="k", payload=b"new"), now_ms=later)
    assert not second.deduplicated
    assert second.command.command_id != first.command.command_id
    # The key now names the newer command.
    third = await create_one(store, new(idempotency_key="k", payload=b"new"), now_ms=later + 1)
    assert third.deduplicated and third.command.command_id == second.command.command_id


async def test_idempotency_keys_are_per_caller(store: Store) -> None:
    def item(scope: str) -> NewCommand:
        return NewCommand("car-1", "unlock", b"{}", t.CRITICAL, 60_000, "k", scope)

    (first,) = await store.create([item("service:app")], online=(), now_ms=T0)
    (other,) = await store.create([item("service:fleet-ops")], online=(), now_ms=T0)
    (again,) = await store.create([item("service:app")], online=(), now_ms=T0)
    assert isinstance(first, Created) and isinstance(other, Created)
    assert isinstance(again, Created)
    assert other.command.command_id != first.command.command_id and not other.deduplicated
    assert again.command.command_id == first.command.command_id and again.deduplicated


# -- coalescing --------------------------------------------------------------------------------


async def test_coalesce_supersedes_an_older_command_not_yet_sent(store: Store) -> None:
    older = await create_id(store, new(name="climate", coalesce_key="temp"), now_ms=T0)
    other_car = await create_id(store, new("car-2", name="climate", coalesce_key="temp"), now_ms=T0)
    newer = await create_one(store, new(name="climate", coalesce_key="temp"), now_ms=T0 + 1)
    assert [(c.command_id, c.status) for c in newer.superseded] == [(older, t.SUPERSEDED)]
    stored = await store.get(older)
    assert stored.status == t.SUPERSEDED
    assert stored.status_reason == f"superseded by {newer.command.command_id}"
    assert await status_of(store, other_car) == t.QUEUED


async def test_coalesce_keys_are_the_senders_own(store: Store) -> None:
    mine = await create_id(store, new(coalesce_key="door", sender="service:app"), now_ms=T0)
    theirs = await create_one(store, new(coalesce_key="door", sender="service:rogue"), now_ms=T0)
    assert theirs.superseded == ()
    assert await status_of(store, mine) == t.QUEUED
    again = await create_one(store, new(coalesce_key="door", sender="service:app"), now_ms=T0 + 1)
    assert [c.command_id for c in again.superseded] == [mine]
    assert await status_of(store, theirs.command.command_id) == t.QUEUED


async def test_a_vehicle_listing_can_be_limited_to_one_sender(store: Store) -> None:
    mine = [await create_id(store, new(sender="service:app"), now_ms=T0 + i) for i in range(3)]
    await create_id(store, new(sender="service:other"), now_ms=T0 + 5)
    listed = await store.list_vehicle("car-1", limit=2, sender="service:app")
    assert [c.command_id for c in listed] == [mine[2], mine[1]]
    assert len(await store.list_vehicle("car-1", limit=10)) == 4


def signed_item(
    command_id: str, *, signature: bytes = b"s", sender: str = "service:app"
) -> NewCommand:
    envelope = t.SignedCommand(body=b"body-" + command_id.encode(), signature=signature)
    return new(sender=sender)._replace(
        command_id=command_id, signed=envelope, expires_at_ms=T0 + 30_000
    )


async def test_a_signed_command_keeps_its_id_envelope_and_expiry(store: Store) -> None:
    created = await create_one(store, signed_item("c0ffee"), now_ms=T0)
    stored = await store.get("c0ffee")
    assert created.command.command_id == "c0ffee" and not created.deduplicated
    assert (stored.expires_at_ms, stored.signed) == (T0 + 30_000, signed_item("c0ffee").signed)


async def test_a_resent_envelope_is_deduplicated_and_a_taken_id_conflicts(store: Store) -> None:
    await create_one(store, signed_item("c0ffee"), now_ms=T0)
    again = await create_one(store, signed_item("c0ffee"), now_ms=T0 + 1)
    assert again.deduplicated and again.command.command_id == "c0ffee"
    for other in (signed_item("c0ffee", signature=b"t"), signed_item("c0ffee", sender="x")):
        (result,) = await store.create([other], online=(), now_ms=T0 + 2)
        assert isinstance(result, Conflict)
    assert store.pending == 1


async def test_coalesce_leaves_a_delivered_command_alone(store: Store) -> None:
    older = await create_id(store, new(coalesce_key="temp"), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(older, 30_000)], now_ms=T0 + 1)
    newer = await create_one(store, new(coalesce_key="temp"), now_ms=T0 + 2)
    assert newer.superseded == ()
    assert await status_of(store, older) == t.DELIVERED


async def test_coalesce_leaves_a_requeued_delivered_command_alone(store: Store) -> None:
    # QUEUED again after a disconnect, but it was on the wire: the car may have run it.
    older = await create_id(store, new(coalesce_key="temp"), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(older, 30_000)], now_ms=T0 + 1)
    await store.requeue([older], now_ms=T0 + 2)
    newer = await create_one(store, new(coalesce_key="temp"), now_ms=T0 + 3)
    assert newer.superseded == ()
    assert await status_of(store, older) == t.QUEUED


# -- listing and loading -----------------------------------------------------------------------


async def test_list_vehicle_newest_first_limited_and_per_vehicle(store: Store) -> None:
    ids: dict[str, list[str]] = {"car-1": [], "car-10": [], "car-0": []}
    for i in range(4):
        for vehicle_id in ("car-10", "car-1", "car-0"):
            ids[vehicle_id].append(await create_id(store, new(vehicle_id), now_ms=T0 + i))
    for vehicle_id, created in ids.items():
        listed = await store.list_vehicle(vehicle_id, limit=10)
        assert [c.command_id for c in listed] == created[::-1], vehicle_id
        limited = await store.list_vehicle(vehicle_id, limit=2)
        assert [c.command_id for c in limited] == created[::-1][:2]
    for absent in ("car-", "car-2", "car", "a", "car-100"):
        assert await store.list_vehicle(absent, limit=10) == []
    assert await store.list_vehicle("car-1", limit=0) == []


async def test_recover_on_an_empty_store(store: Store) -> None:
    assert await store.recover(now_ms=T0) == 0 == store.pending


async def test_load_pending_gives_dispatch_order_and_nothing_terminal(store: Store) -> None:
    bulk = await create_id(store, new(lane=t.BULK), now_ms=T0)
    first = await create_id(store, new(lane=t.CRITICAL), now_ms=T0)
    middle = await create_id(store, new(lane=t.INTERACTIVE), now_ms=T0)
    second = await create_id(store, new(lane=t.CRITICAL), now_ms=T0)
    done = await create_id(store, new(lane=t.CRITICAL), now_ms=T0)
    other = await create_id(store, new("car-10"), now_ms=T0)
    await store.cancel(done, now_ms=T0 + 1)
    assert store.pending == 5
    loaded = await store.load_pending(["car-1", "car-10"])
    assert [c.command_id for c in loaded["car-1"]] == [first, second, middle, bulk]
    assert [c.command_id for c in loaded["car-10"]] == [other]


# -- vehicle state -----------------------------------------------------------------------------


async def test_vehicle_state_put_and_get(store: Store) -> None:
    assert await store.get_state("car-1") is None
    state = svc.VehicleState(vehicle_id="car-1", last_seen_ms=T0)
    state.fields["soc"].value.number = 81.5
    state.fields["soc"].reported_at_ms = T0 - 10
    other = svc.VehicleState(vehicle_id="car-10", last_seen_ms=T0 + 1)
    write = store.put_states([state, other])
    state.fields["later"].value.flag = True  # after the put: not written
    await write
    del state.fields["later"]
    assert await store.get_state("car-1") == state
    assert await store.get_state("car-10") == other
    state.fields["locked"].value.flag = True
    await store.put_states([state])
    assert await store.get_state("car-1") == state
    assert await store.get_state("car-2") is None


# -- faults: re-queued deadlines, late commits, clock ------------------------------------------


async def test_create_can_record_delivery_in_the_same_write(store: Store) -> None:
    (created,) = await store.create(
        [new(ttl_ms=60_000)], online={"car-1"}, now_ms=T0, deliver={0: 5_000}
    )
    assert isinstance(created, Created)
    command = created.command
    assert (command.status, command.attempt) == (t.DELIVERED, 1)
    assert (command.delivered_at_ms, command.result_deadline_ms) == (T0, T0 + 5_000)
    state = await dump(store)
    assert state.timers == [(T0 + 5_000, command.command_id)]  # the result deadline
    assert list(state.pending.values()) == [command.command_id]
    # No result before the deadline: UNKNOWN, as for any delivered command.
    changed, _ = await store.fire_timers(now_ms=T0 + 5_000)
    assert [(c.command_id, c.status) for c in changed] == [(command.command_id, t.UNKNOWN)]


async def test_a_requeued_command_waits_for_its_expiry_not_its_old_result_deadline(
    store: Store,
) -> None:
    cid = await create_id(store, new(ttl_ms=60_000), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 1)
    [requeued] = await store.requeue([cid], now_ms=T0 + 5_000)
    assert (requeued.status, requeued.result_deadline_ms) == (t.QUEUED, 0)
    # The first attempt's deadline (T0 + 10_001) passes: nothing happens, TTL is left.
    assert await store.fire_timers(now_ms=T0 + 30_000) == ([], 0)
    # Back on the wire: a fresh result deadline from the new delivery.
    [again] = await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 40_000)
    assert (again.attempt, again.result_deadline_ms) == (2, T0 + 50_000)
    assert await store.fire_timers(now_ms=T0 + 49_999) == ([], 0)
    changed, _ = await store.fire_timers(now_ms=T0 + 50_000)
    assert [(c.command_id, c.status) for c in changed] == [(cid, t.UNKNOWN)]


async def test_a_requeued_command_whose_car_never_returns_is_unknown_at_its_expiry(
    store: Store,
) -> None:
    cid = await create_id(store, new(ttl_ms=60_000), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 1)
    await store.requeue([cid], now_ms=T0 + 2)
    assert await store.fire_timers(now_ms=T0 + 59_999) == ([], 0)
    changed, _ = await store.fire_timers(now_ms=T0 + 60_000)
    assert [(c.command_id, c.status) for c in changed] == [(cid, t.UNKNOWN)]
    assert "expired before the car was back" in changed[0].status_reason
    # Never re-sent after its expiry; a late result (the car did run it) still refines it.
    assert await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 60_001) == []
    refined = await store.record_result(
        cid, vehicle_id="car-1", success=True, message="", detail=b"", now_ms=T0 + 61_000
    )
    assert refined is not None and refined.status == t.SUCCEEDED


async def test_a_requeued_command_the_car_has_gets_a_new_deadline_when_acked(
    store: Store,
) -> None:
    cid = await create_id(store, new(ttl_ms=60_000), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 1)
    await store.requeue([cid], now_ms=T0 + 2)
    acked = await store.mark_acked(cid, now_ms=T0 + 20_000, result_timeout_ms=10_000)
    assert acked is not None and acked.result_deadline_ms == T0 + 30_000
    assert await store.fire_timers(now_ms=T0 + 29_999) == ([], 0)


async def test_a_command_past_its_commit_deadline_is_not_written(store: Store) -> None:
    late = new("car-1", idempotency_key="k")._replace(commit_by_s=time.monotonic() - 1)
    on_time = new("car-2")._replace(commit_by_s=time.monotonic() + 60)
    refused, created = await store.create([late, on_time], online=(), now_ms=T0)
    assert isinstance(refused, NotCommittedInTime)
    assert refused.retry_after_ms is not None and "nothing was written" in refused.message
    assert isinstance(created, Created)
    state = await dump(store)
    assert list(state.commands) == [created.command.command_id]
    assert state.idem == {}


async def test_abandon_cancels_unsent_and_frees_the_idempotency_key(store: Store) -> None:
    first = await create_one(store, new(idempotency_key="k"), now_ms=T0, online={"car-1"})
    [abandoned] = await store.abandon([first.command.command_id], now_ms=T0 + 1)
    assert abandoned.status == t.CANCELED and "never sent" in abandoned.status_reason
    retry = await create_one(store, new(idempotency_key="k"), now_ms=T0 + 2)
    assert not retry.deduplicated
    assert retry.command.command_id != first.command.command_id
    assert await store.abandon([first.command.command_id], now_ms=T0 + 3) == []  # terminal


async def test_the_clock_reference_is_the_highest_time_written(store: Store) -> None:
    future = clock.now_ms() + 3_600_000  # a time ahead of the clock, as a stored one may be
    cid = await create_id(store, new(), now_ms=future)
    stored_ms, steady_ns, boot_id = store.clock_reference
    assert (stored_ms, boot_id) == (future, clock.BOOT_ID) and steady_ns > 0
    await store.get(cid)  # a read writes no time
    await store.cancel(cid, now_ms=future - 1)  # nor does an older one move it back
    assert store.clock_reference == (stored_ms, steady_ns, boot_id)


# -- properties: random operation sequences against a model ------------------------------------


VEHICLES = ("car-1", "car-10", "car-2")
PROP_RETENTION_MS = 3_000
PROP_IDEMPOTENCY_WINDOW_MS = 2_000

# Every status change the lifecycle allows, whatever the operation.
ALLOWED = {
    t.ACCEPTED: {t.QUEUED, t.DELIVERED, t.EXPIRED, t.CANCELED, t.SUPERSEDED},
    t.QUEUED: {
        *(t.DELIVERED, t.ACKED, t.SUCCEEDED, t.FAILED),
        *(t.EXPIRED, t.UNKNOWN, t.CANCELED, t.SUPERSEDED),
    },
    t.DELIVERED: {t.DELIVERED, t.ACKED, t.QUEUED, t.SUCCEEDED, t.FAILED, t.UNKNOWN},
    t.ACKED: {t.SUCCEEDED, t.FAILED, t.UNKNOWN},
    t.UNKNOWN: {t.SUCCEEDED, t.FAILED},
}
NEVER_SENT_ONLY = {t.EXPIRED, t.CANCELED, t.SUPERSEDED}  # reachable only with attempt == 0
SENT_ONLY = {t.ACKED, t.SUCCEEDED, t.FAILED, t.UNKNOWN}  # reachable only with attempt > 0


@dataclass
class Expected:
    """The model's view of one command."""

    command_id: str
    vehicle_id: str
    payload: bytes
    seq: int
    created_at_ms: int
    expires_at_ms: int
    status: int
    updated_at_ms: int
    idempotency_key: str
    coalesce_key: str
    attempt: int = 0
    delivered_at_ms: int = 0
    result_deadline_ms: int = 0

    def timer_at(self) -> int:
        if self.status in TERMINAL:
            return self.updated_at_ms + PROP_RETENTION_MS
        if self.status in (t.DELIVERED, t.ACKED):
            return self.result_deadline_ms
        return self.expires_at_ms  # waiting in the queue, sent before or not

    def move(self, status: int, now_ms: int) -> None:
        self.status = status
        self.updated_at_ms = now_ms


item_specs = st.tuples(
    st.sampled_from(VEHICLES),
    st.sampled_from((b"a", b"b")),
    st.integers(min_value=0, max_value=4_000),
    st.sampled_from(("", "k1", "k2")),
    st.sampled_from(("", "c1")),
)
picks = st.integers(min_value=0, max_value=7)  # counted back from the newest id
UNKNOWN_ID = "000000000000ffffffffffff"


class StoreMachine(RuleBasedStateMachine):
    """Drives a store on its own event loop (and temp folder), mirrored by a model."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.folder = Path(tempfile.mkdtemp(prefix="store-prop-"))
        self.loop = asyncio.new_event_loop()
        self.store = self._open()
        self.now = T0
        self.model: dict[str, Expected] = {}
        # Every id ever created, purged ones included, plus one that never existed.
        self.ids: list[str] = [UNKNOWN_ID]
        self.idem: dict[str, str] = {}
        self.coalesce: dict[tuple[str, str], str] = {}
        self.seq = 0
        self.expired_unsent: set[str] = set()
        self.last_seen: dict[str, Any] = {}

    def _open(self) -> Store:
        return self.backend.start(
            self.folder,
            self.loop,
            retention_ms=PROP_RETENTION_MS,
            idempotency_window_ms=PROP_IDEMPOTENCY_WINDOW_MS,
        )

    def run(self, future: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(future)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
            self.loop.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def pick(self, index: int) -> str:
        return self.ids[-1 - index % len(self.ids)]

    def _purge(self, command_id: str) -> None:
        command = self.model.pop(command_id)
        if self.idem.get(command.idempotency_key) == command_id:
            del self.idem[command.idempotency_key]
        ckey = (command.vehicle_id, command.coalesce_key)
        if self.coalesce.get(ckey) == command_id:
            del self.coalesce[ckey]

    # -- rules ----------------------------------------------------------------------------------

    @rule(
        specs=st.lists(item_specs, min_size=1, max_size=3),
        online=st.sets(st.sampled_from(VEHICLES)),
    )
    def create(self, specs: list[tuple[str, bytes, int, str, str]], online: set[str]) -> None:
        items = [
            new(v, payload=p, ttl_ms=ttl, idempotency_key=ik, coalesce_key=ck)
            for v, p, ttl, ik, ck in specs
        ]
        results = self.run(self.store.create(items, online=online, now_ms=self.now))
        assert len(results) == len(items)
        for item, result in zip(items, results, strict=True):
            earlier = self.model.get(self.idem.get(item.idempotency_key, ""))
            if (
                item.idempotency_key
                and earlier is not None
                and earlier.created_at_ms + PROP_IDEMPOTENCY_WINDOW_MS > self.now
            ):
                if (earlier.vehicle_id, earlier.payload) != (item.vehicle_id, item.payload):
                    assert isinstance(result, Conflict)
                else:
                    assert isinstance(result, Created) and result.deduplicated
                    assert result.command.command_id == earlier.command_id
                continue
            assert isinstance(result, Created) and not result.deduplicated
            self.seq += 1
            command_id = result.command.command_id
            status = t.ACCEPTED if item.vehicle_id in online else t.QUEUED
            superseded = []
            if item.coalesce_key:
                ckey = (item.vehicle_id, item.coalesce_key)
                older = self.model.get(self.coalesce.get(ckey, ""))
                never_sent = older is not None and older.attempt == 0
                if older is not None and never_sent and older.status in (t.ACCEPTED, t.QUEUED):
                    older.move(t.SUPERSEDED, self.now)
                    superseded.append(older.command_id)
                self.coalesce[ckey] = command_id
            if item.idempotency_key:
                self.idem[item.idempotency_key] = command_id
            assert [c.command_id for c in result.superseded] == superseded
            self.model[command_id] = Expected(
                command_id=command_id,
                vehicle_id=item.vehicle_id,
                payload=item.payload,
                seq=self.seq,
                created_at_ms=self.now,
                expires_at_ms=self.now + item.ttl_ms,
                status=status,
                updated_at_ms=self.now,
                idempotency_key=item.idempotency_key,
                coalesce_key=item.coalesce_key,
            )
            self.ids.append(command_id)

    @rule(index=picks, result_timeout_ms=st.integers(min_value=1, max_value=4_000))
    def deliver(self, index: int, result_timeout_ms: int) -> None:
        command_id = self.pick(index)
        command = self.model.get(command_id)
        live = command is not None and command.status not in TERMINAL
        if live and self.now >= command.expires_at_ms:
            return  # the dispatcher never puts a command on the wire after expires_at
        changed = self.run(
            self.store.mark_delivered([(command_id, result_timeout_ms)], now_ms=self.now)
        )
        if command is not None and command.status in (t.ACCEPTED, t.QUEUED, t.DELIVERED):
            command.move(t.DELIVERED, self.now)
            command.attempt += 1
            command.delivered_at_ms = command.delivered_at_ms or self.now
            command.result_deadline_ms = self.now + result_timeout_ms
            assert [c.command_id for c in changed] == [command_id]
        else:
            assert changed == []

    @rule(index=picks, result_timeout_ms=st.integers(min_value=1, max_value=4_000))
    def ack(self, index: int, result_timeout_ms: int) -> None:
        command_id = self.pick(index)
        command = self.model.get(command_id)
        acked = self.run(
            self.store.mark_acked(command_id, now_ms=self.now, result_timeout_ms=result_timeout_ms)
        )
        if command is not None and command.status in (t.DELIVERED, t.QUEUED) and command.attempt:
            # Re-queued (no deadline): the car says it has it, so it is on the wire again.
            if command.status == t.QUEUED:
                command.result_deadline_ms = self.now + result_timeout_ms
            command.move(t.ACKED, self.now)
            assert acked is not None and acked.command_id == command_id
        else:
            assert acked is None

    @rule(index=picks, success=st.booleans(), right_vehicle=st.booleans())
    def result(self, index: int, success: bool, right_vehicle: bool) -> None:
        command_id = self.pick(index)
        command = self.model.get(command_id)
        vehicle_id = command.vehicle_id if command and right_vehicle else "car-other"
        recorded = self.run(
            self.store.record_result(
                command_id,
                vehicle_id=vehicle_id,
                success=success,
                message="",
                detail=b"",
                now_ms=self.now,
            )
        )
        if (
            command is not None
            and right_vehicle
            and command.attempt > 0
            and (command.status not in TERMINAL or command.status == t.UNKNOWN)
        ):
            command.move(t.SUCCEEDED if success else t.FAILED, self.now)
            assert recorded is not None and recorded.status == command.status
        else:
            assert recorded is None

    @rule(indexes=st.lists(picks, min_size=1, max_size=3, unique=True))
    def requeue(self, indexes: list[int]) -> None:
        command_ids = list(dict.fromkeys(self.pick(i) for i in indexes))
        changed = self.run(self.store.requeue(command_ids, now_ms=self.now))
        expected = []
        for command_id in command_ids:
            command = self.model.get(command_id)
            if command is not None and command.status in (t.ACCEPTED, t.DELIVERED):
                command.move(t.QUEUED, self.now)
                command.result_deadline_ms = 0  # a new one when it is on the wire again
                expected.append(command_id)
        assert [c.command_id for c in changed] == expected

    @rule(index=picks)
    def cancel(self, index: int) -> None:
        command_id = self.pick(index)
        command = self.model.get(command_id)
        expected: type[Exception] | None
        if command is None:
            expected = NotFound
        elif command.status in (t.ACCEPTED, t.QUEUED) and command.attempt == 0:
            expected = None
        else:
            expected = FailedPrecondition
        try:
            canceled = self.run(self.store.cancel(command_id, now_ms=self.now))
        except (NotFound, FailedPrecondition) as exc:
            assert type(exc) is expected
            return
        assert expected is None and command is not None
        command.move(t.CANCELED, self.now)
        assert canceled.status == t.CANCELED

    @rule(delta_ms=st.integers(min_value=0, max_value=2_500))
    def advance_and_fire_timers(self, delta_ms: int) -> None:
        self.now += delta_ms
        changed, due_count = self.run(self.store.fire_timers(now_ms=self.now))
        due = sorted((c.timer_at(), c.command_id) for c in self.model.values())
        expected_changed, expected_due = [], 0
        for at_ms, command_id in due:
            if at_ms > self.now:
                break
            expected_due += 1
            command = self.model[command_id]
            if command.status in TERMINAL:
                self._purge(command_id)
            elif command.status in (t.ACCEPTED, t.QUEUED) and command.attempt == 0:
                command.move(t.EXPIRED, self.now)
                expected_changed.append(command_id)
            else:  # on the wire past its result deadline, or sent once and expired since
                command.move(t.UNKNOWN, self.now)
                expected_changed.append(command_id)
        assert [c.command_id for c in changed] == expected_changed
        assert due_count == expected_due

    @rule()
    def reopen_and_recover(self) -> None:
        # A restart. Only a durable store is reopened: a memory store keeps its records
        # (a real restart would lose them all) and recovers in place.
        if self.backend.durable:
            self.run(self.store.close())
            self.store = self._open()
        count = self.run(self.store.recover(now_ms=self.now))
        loaded = self.run(self.store.load_pending(VEHICLES))
        pending = [c.command_id for commands in loaded.values() for c in commands]
        expected = {cid for cid, c in self.model.items() if c.status not in TERMINAL}
        assert set(pending) == expected
        assert count == len(pending) == len(expected)
        for command_id in expected:
            command = self.model[command_id]
            if command.status in (t.ACCEPTED, t.DELIVERED):
                command.move(t.QUEUED, self.now)
                command.result_deadline_ms = 0

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        async def read_all() -> tuple[Dump, list[list[Any]]]:
            # Submitted together, so the writer reads them all in one group.
            listings = [self.store.list_vehicle(v, limit=1_000) for v in VEHICLES]
            return await dump(self.store), list(await asyncio.gather(*listings))

        state, listings = self.run(read_all())
        self._check_matches_model(state)
        self._check_transitions(state)
        self._check_expired_never_delivered(state)
        self._check_listing(listings)
        self.last_seen = state.commands

    def _check_matches_model(self, state: Dump) -> None:
        assert set(state.commands) == set(self.model)
        fields = (
            "status",
            "attempt",
            "updated_at_ms",
            "delivered_at_ms",
            "result_deadline_ms",
            "expires_at_ms",
            "created_at_ms",
            "seq",
            "vehicle_id",
            "payload",
        )
        for command_id, expected in self.model.items():
            actual = state.commands[command_id]
            for name in fields:
                assert getattr(actual, name) == getattr(expected, name), (command_id, name)
        # Exactly one timer per command, at the deadline its record implies.
        assert state.timers == sorted((c.timer_at(), cid) for cid, c in self.model.items())
        assert state.by_vehicle == {
            codec.vehicle_key(c.vehicle_id, c.seq): cid for cid, c in self.model.items()
        }
        assert state.idem == self.idem
        # The pending index holds exactly the non-terminal commands, in dispatch order.
        assert state.pending == {
            codec.pending_key(c.vehicle_id, state.commands[cid].lane, c.seq): cid
            for cid, c in self.model.items()
            if c.status not in TERMINAL
        }
        assert state.pending_count == len(state.pending)
        assert state.coalesce == {
            codec.coalesce_key(vehicle_id, f"\x00{key}"): cid  # one sender, ""
            for (vehicle_id, key), cid in self.coalesce.items()
        }

    def _check_transitions(self, state: Dump) -> None:
        for command_id, command in state.commands.items():
            before = self.last_seen.get(command_id)
            if before is None or before == command:
                continue
            assert before.status not in TERMINAL or before.status == t.UNKNOWN, (
                f"terminal {t.CommandStatus.Name(before.status)} command changed"
            )
            assert command.status in ALLOWED[before.status], (
                t.CommandStatus.Name(before.status),
                t.CommandStatus.Name(command.status),
            )
            assert command.attempt >= before.attempt
        for command in state.commands.values():
            if command.status in NEVER_SENT_ONLY:
                assert command.attempt == 0, t.CommandStatus.Name(command.status)
            if command.status in SENT_ONLY:
                assert command.attempt > 0, t.CommandStatus.Name(command.status)

    def _check_expired_never_delivered(self, state: Dump) -> None:
        for command_id, command in state.commands.items():
            if command.attempt == 0 and self.now >= command.expires_at_ms:
                self.expired_unsent.add(command_id)
        for command_id in self.expired_unsent & set(state.commands):
            command = state.commands[command_id]
            assert command.status != t.DELIVERED and command.attempt == 0

    def _check_listing(self, listings: list[list[Any]]) -> None:
        for vehicle_id, listed in zip(VEHICLES, listings, strict=True):
            expected = sorted(
                (c for c in self.model.values() if c.vehicle_id == vehicle_id),
                key=lambda c: -c.seq,
            )
            assert [c.command_id for c in listed] == [c.command_id for c in expected]


PROPERTY_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_operation_sequences_match_the_model(backend: Backend) -> None:
    run_state_machine_as_test(lambda: StoreMachine(backend), settings=PROPERTY_SETTINGS)


# -- LMDB only: reopening a folder -------------------------------------------------------------


async def test_recover_after_reopen_returns_pending_commands(open_store: OpenStore) -> None:
    store = await open_store()
    ids = {}
    for status in ("queued", "accepted", "delivered", "acked", "requeued"):
        ids[status] = await create_id(store, new(), now_ms=T0, online={"car-1"})
    ids["queued_offline"] = await create_id(store, new("car-2"), now_ms=T0)
    for status in ("canceled", "succeeded", "expired"):
        ids[status] = await create_id(store, new(ttl_ms=1_000), now_ms=T0, online={"car-1"})
    sent = ["delivered", "acked", "requeued", "succeeded"]
    await store.mark_delivered([(ids[s], 60_000) for s in sent], now_ms=T0 + 1)
    await store.mark_acked(ids["acked"], now_ms=T0 + 2, result_timeout_ms=30_000)
    await store.requeue([ids["requeued"]], now_ms=T0 + 2)
    await store.record_result(
        ids["succeeded"], vehicle_id="car-1", success=True, message="", detail=b"", now_ms=T0 + 3
    )
    await store.cancel(ids["canceled"], now_ms=T0 + 3)
    await store.requeue([ids["queued"]], now_ms=T0 + 3)
    changed, _ = await store.fire_timers(now_ms=T0 + 1_000)
    assert [c.command_id for c in changed] == [ids["expired"]]
    last_seq = (await store.get(ids["expired"])).seq

    store = await open_store()
    assert await store.recover(now_ms=T0 + 5_000) == store.pending == 6
    loaded = await store.load_pending(["car-1", "car-2", "car-3"])
    assert loaded["car-3"] == []
    pending = {c.command_id: c for commands in loaded.values() for c in commands}
    expected_pending = ("queued", "accepted", "delivered", "acked", "requeued", "queued_offline")
    assert set(pending) == {ids[s] for s in expected_pending}
    assert {name: t.CommandStatus.Name(pending[ids[name]].status) for name in expected_pending} == {
        "queued": "QUEUED",
        "accepted": "QUEUED",  # was about to be sent: sessions did not survive
        "delivered": "QUEUED",
        "acked": "ACKED",  # the car has it; its result may still come
        "requeued": "QUEUED",
        "queued_offline": "QUEUED",
    }
    assert pending[ids["delivered"]].attempt == 1
    for cid, command in pending.items():
        assert await store.get(cid) == command
    assert await status_of(store, ids["succeeded"]) == t.SUCCEEDED
    # The sequence survives the restart: new commands still list newest first.
    fresh = await create_one(store, new(), now_ms=T0 + 6_000)
    assert fresh.command.seq > last_seq
    listed = await store.list_vehicle("car-1", limit=1)
    assert [c.command_id for c in listed] == [fresh.command.command_id]


async def test_recovery_clears_result_deadlines_of_what_was_on_the_wire(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    cid = await create_id(store, new(ttl_ms=60_000), now_ms=T0, online={"car-1"})
    await store.mark_delivered([(cid, 10_000)], now_ms=T0 + 1)
    store = await open_store()
    await store.recover(now_ms=T0 + 5_000)
    command = await store.get(cid)
    assert (command.status, command.result_deadline_ms, command.attempt) == (t.QUEUED, 0, 1)
    assert await store.fire_timers(now_ms=T0 + 30_000) == ([], 0)  # not UNKNOWN at 10 s


async def test_vehicle_state_survives_reopen(open_store: OpenStore) -> None:
    store = await open_store()
    state = svc.VehicleState(vehicle_id="car-1", last_seen_ms=T0)
    state.fields["soc"].value.number = 81.5
    other = svc.VehicleState(vehicle_id="car-10", last_seen_ms=T0 + 1)
    await store.put_states([state, other])
    store = await open_store()
    assert await store.get_state("car-1") == state
    assert await store.get_state("car-10") == other
    assert await store.get_state("car-2") is None


async def test_the_highest_time_written_survives_a_reopen(open_store: OpenStore) -> None:
    store = await open_store()
    future = clock.now_ms() + 3_600_000
    await create_id(store, new(), now_ms=future)
    store = await open_store()
    stored_ms, steady_ns, boot_id = store.clock_reference
    assert (stored_ms, boot_id) == (future, clock.BOOT_ID) and steady_ns > 0


# -- LMDB only: layout and the folder lock -----------------------------------------------------


async def test_a_folder_from_before_the_pending_index_gets_it_on_open(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    queued = await create_id(store, new(), now_ms=T0)
    finished = await create_id(store, new(), now_ms=T0)
    await store.cancel(finished, now_ms=T0 + 1)

    def downgrade(txn: Any) -> None:  # what a schema-1 folder looks like
        txn.drop(store._pending, delete=False)
        txn.delete(b"schema", db=store._meta)

    await store.writer.submit(downgrade)
    store = await open_store()
    assert store.pending == 1
    assert [c.command_id for c in (await store.load_pending(["car-1"]))["car-1"]] == [queued]


async def test_an_older_folder_larger_than_the_configured_map_still_opens(
    open_store: OpenStore,
) -> None:
    sizes = {"map_size": 64 << 10, "map_size_max": 64 << 20, "fsync": False}
    store = await open_store(**sizes)
    for batch in range(10):
        items = [new(f"car-{i % 7}", payload=bytes(300)) for i in range(50)]
        await store.create(items, online=(), now_ms=T0 + batch)

    def downgrade(txn: Any) -> None:  # a schema-1 folder: no pending index yet
        txn.drop(store._pending, delete=False)
        txn.delete(b"schema", db=store._meta)

    await store.writer.submit(downgrade)
    store = await open_store(**sizes)  # the index no longer fits the configured 64 KiB
    assert store.pending == 500


async def test_a_store_from_a_newer_layout_is_refused_and_released(
    open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    await store.writer.submit(
        lambda txn: txn.put(b"schema", (99).to_bytes(2, "big"), db=store._meta)
    )
    await store.close()
    with pytest.raises(StoreUnavailable, match="newer broker"):
        LmdbStore(tmp_path / "db")
    # The folder lock was released: fixing the version (here: the layout) opens it.
    probe = lmdb.open(str(tmp_path / "db"), max_dbs=9)
    with probe.begin(write=True) as txn:
        txn.put(b"schema", (3).to_bytes(2, "big"), db=probe.open_db(b"meta", txn=txn))
    probe.close()
    LmdbStore(tmp_path / "db")._lock_file.close()


async def test_coalesce_keys_of_an_older_folder_move_under_their_sender(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    older = await create_id(store, new(coalesce_key="door", sender="service:app"), now_ms=T0)

    def downgrade(txn: Any) -> None:  # schema 3: coalesce keys without the sender
        txn.drop(store._coalesce, delete=False)
        txn.put(codec.coalesce_key("car-1", "door"), older.encode(), db=store._coalesce)
        txn.put(b"schema", (3).to_bytes(2, "big"), db=store._meta)

    await store.writer.submit(downgrade)
    store = await open_store()
    newer = await create_one(store, new(coalesce_key="door", sender="service:app"), now_ms=T0 + 1)
    assert [c.command_id for c in newer.superseded] == [older]
    assert list((await dump(store)).coalesce) == [
        codec.coalesce_key("car-1", "service:app\x00door")
    ]


async def test_a_second_broker_cannot_open_the_same_folder(tmp_path: Path) -> None:
    first = LmdbStore(tmp_path / "data")
    with pytest.raises(StoreUnavailable, match="in use by another broker"):
        LmdbStore(tmp_path / "data")
    first.start(asyncio.get_running_loop())
    await first.close()
    second = LmdbStore(tmp_path / "data")  # the lock went with the first
    second.start(asyncio.get_running_loop())
    await second.close()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreUnavailable, match="data folder"):
        LmdbStore(tmp_path / "file")


async def test_the_data_folder_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """0700 folder, 0600 files under umask 022, and a folder written looser (an older
    version, another umask) is tightened on open: no other user reads an unlock payload
    or takes the folder lock."""
    old_umask = os.umask(0o022)
    try:
        store = LmdbStore(tmp_path / "data")
        store.start(asyncio.get_running_loop())
        await store.create([NewCommand("car-1", "unlock", b'{"pin":"4711"}', t.CRITICAL, 60_000)],
                           online=(), now_ms=clock.now_ms())  # fmt: skip
        await store.close()
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "data").iterdir()}
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert modes == {"data.mdb": 0o600, "lock.mdb": 0o600, "broker.lock": 0o600}
        (tmp_path / "data").chmod(0o755)
        for name in modes:
            (tmp_path / "data" / name).chmod(0o644)
        LmdbStore(tmp_path / "data")._lock_file.close()
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / "data").iterdir()} == {0o600}
    finally:
        os.umask(old_umask)


# -- LMDB only: the payload table and timer keys -----------------------------------------------


async def test_a_large_payload_is_written_once_and_status_changes_rewrite_only_the_record(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    payload = bytes(range(256)) * 64  # 16 KiB
    cid = await create_id(store, new(payload=payload), now_ms=T0, online={"car-1"})
    [delivered] = await store.mark_delivered([(cid, 30_000)], now_ms=T0 + 1)
    assert delivered.payload == payload

    def sizes(txn: Any) -> tuple[int, int]:
        record = txn.get(cid.encode(), db=store._commands)
        kept = txn.get(cid.encode(), db=store._payloads)
        return len(record), len(kept)

    record_bytes, kept_bytes = await store.writer.submit(sizes)
    assert record_bytes < 300 and kept_bytes == len(payload)
    store = await open_store()
    await store.recover(now_ms=T0 + 2)
    [loaded] = (await store.load_pending(["car-1"]))["car-1"]
    assert loaded.payload == payload and (await store.get(cid)).payload == payload
    await store.record_result(
        cid, vehicle_id="car-1", success=True, message="", detail=b"", now_ms=T0 + 3
    )
    await store.fire_timers(now_ms=T0 + 3 + RETENTION_MS)  # purged with its payload
    assert await store.writer.submit(lambda txn: txn.get(cid.encode(), db=store._payloads)) is None


async def test_a_large_payload_stored_inline_by_an_older_version_survives_a_status_change(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    payload = bytes(4000)
    cid = await create_id(store, new(payload=payload), now_ms=T0)

    def as_before(txn: Any) -> None:  # the record as the previous layout wrote it
        command = t.Command.FromString(txn.get(cid.encode(), db=store._commands))
        command.payload = payload
        txn.put(cid.encode(), command.SerializeToString(), db=store._commands)
        txn.delete(cid.encode(), db=store._payloads)

    await store.writer.submit(as_before)
    await store.cancel(cid, now_ms=T0 + 1)
    assert (await store.get(cid)).payload == payload


async def test_timer_keys_that_match_no_record_are_dropped_not_swept_forever(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    # Orphans (a record gone) and stale keys (an older version's timer rule) ahead of
    # a real expiry, more of them than one sweep takes.
    real = await create_id(store, new(ttl_ms=1_000), now_ms=T0)

    def litter(txn: Any) -> None:
        for n in range(1_500):
            orphan = codec.timer_key(T0 + 500, f"{n:024x}")
            txn.put(orphan, b"", db=store._timers)
        txn.put(codec.timer_key(T0 + 600, real), b"", db=store._timers)  # stale

    await store.writer.submit(litter)
    changed, due = await store.fire_timers(now_ms=T0 + 2_000, limit=1_000)
    assert due == 1_000 and changed == []
    changed, due = await store.fire_timers(now_ms=T0 + 2_000, limit=1_000)
    assert [c.command_id for c in changed] == [real] and due < 1_000
    state = await dump(store)
    assert state.timers == [(T0 + 2_000 + RETENTION_MS, real)]  # its own timer only


# -- LMDB only: map growth and disk space ------------------------------------------------------


async def test_map_grows_under_many_writes(
    open_store: OpenStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.storage.writer")
    store = await open_store(map_size=64 << 10, map_size_max=64 << 20, fsync=False)
    created = []
    for batch in range(20):
        items = [new(f"car-{i % 7}", payload=bytes(300)) for i in range(50)]
        results = await store.create(items, online=(), now_ms=T0 + batch)
        assert all(isinstance(r, Created) for r in results)
        created += [r.command.command_id for r in results if isinstance(r, Created)]
    assert (tmp_path / "db" / "data.mdb").stat().st_size > 64 << 10
    assert any("grew map_size" in r.getMessage() for r in caplog.records)
    assert await store.recover(now_ms=T0 + 100) == len(created) == 1_000


async def test_store_full_refuses_clearly_and_keeps_what_it_accepted(
    open_store: OpenStore,
) -> None:
    sizes = {"map_size": 32 << 10, "map_size_max": 256 << 10, "fsync": False}
    store = await open_store(**sizes)
    accepted: list[str] = []
    error: StoreUnavailable | None = None
    for batch in range(1_000):
        try:
            results = await store.create(
                [new(f"car-{i}", payload=bytes(200)) for i in range(10)],
                online=(),
                now_ms=T0 + batch,
            )
        except StoreUnavailable as exc:
            error = exc
            break
        accepted += [r.command.command_id for r in results if isinstance(r, Created)]
    assert error is not None, "the store never filled up"
    assert "full" in error.message and "map_size_max" in error.message
    assert len(accepted) > 100
    # Reads still work, and a refused write changed nothing.
    assert await status_of(store, accepted[-1]) == t.QUEUED
    store = await open_store(**sizes)
    assert await store.recover(now_ms=T0 + 10_000) == len(accepted)
    loaded = await store.load_pending([f"car-{i}" for i in range(10)])
    assert sorted(c.command_id for cs in loaded.values() for c in cs) == sorted(accepted)
    for cid in (accepted[0], accepted[-1]):
        assert await status_of(store, cid) == t.QUEUED


async def test_short_of_room_new_work_is_refused_and_terminal_commands_are_reclaimed(
    open_store: OpenStore,
) -> None:
    # A 1 MiB map with 512 KiB kept in reserve: fill it past the reserve with queued
    # commands, finish them, and the sweep purges them ahead of their retention.
    store = await open_store(
        map_size=1 << 20, map_size_max=1 << 20, fsync=False, reserve_bytes=512 << 10,
        retention_ms=86_400_000,
    )  # fmt: skip
    assert store.space_problem() is None
    ids: list[str] = []
    while store.space_problem() is None:
        results = await store.create(
            # one overflow page each: LMDB reuses freed single pages reliably
            [new(f"car-{i}", payload=bytes(3000)) for i in range(8)],
            online=(),
            now_ms=T0,
        )
        ids += [r.command.command_id for r in results if isinstance(r, Created)]
        await asyncio.sleep(SPACE_CHECK_INTERVAL_S)  # the room is measured after commits
    assert "map" in (store.space_problem() or "")
    assert store.space_problem(critical=True) is None  # critical may use half the reserve
    for cid in ids:
        await store.cancel(cid, now_ms=T0 + 1)
    for _ in range(100):
        if store.space_problem() is None:
            break
        changed, _ = await store.fire_timers(now_ms=T0 + 1 + RECLAIM_MIN_AGE_MS)
        assert changed == []
        await asyncio.sleep(SPACE_CHECK_INTERVAL_S)
    assert store.space_problem() is None, "reclaiming never made room"
    remaining = await dump(store)
    assert len(remaining.commands) < len(ids)  # purged ahead of the day's retention


async def test_a_failed_commit_fails_only_the_writes_that_do_not_fit(
    open_store: OpenStore,
) -> None:
    store = await open_store(map_size=64 << 10, map_size_max=64 << 10, fsync=False)
    kept = await create_id(store, new(), now_ms=T0)
    with pytest.raises(StoreUnavailable):
        for _ in range(1_000):
            await store.create(
                [new(f"car-{i}", payload=bytes(3000)) for i in range(4)], online=(), now_ms=T0
            )
    # A write that cannot fit and reads in the same group: the reads are answered.
    too_big = store.create([new(payload=bytes(60_000))], online=(), now_ms=T0)
    read = store.get(kept)
    loaded = store.load_pending(["car-1"])
    results = await asyncio.gather(too_big, read, loaded, return_exceptions=True)
    assert isinstance(results[0], StoreUnavailable)
    assert "map" in results[0].message and results[0].retry_after_ms is not None
    assert results[1].command_id == kept
    assert kept in {c.command_id for c in results[2]["car-1"]}


async def test_reclaim_reaches_terminal_commands_behind_many_pending_ones(
    open_store: OpenStore,
) -> None:
    # A reserve larger than any map: the store is always "short of room".
    store = await open_store(
        retention_ms=86_400_000,
        idempotency_window_ms=3_600_000,
        reserve_bytes=1 << 50,
        fsync=False,
    )
    pending = [new(f"car-{n % 50}", ttl_ms=600_000) for n in range(1_500)]
    await store.create(pending, online=(), now_ms=T0)
    done = [await create_id(store, new(ttl_ms=600_000), now_ms=T0) for _ in range(5)]
    keyed = await create_id(store, new(idempotency_key="k"), now_ms=T0)
    for command_id in [*done, keyed]:
        await store.cancel(command_id, now_ms=T0 + 1)
    await store.fire_timers(now_ms=T0 + 2)
    assert set(done) <= set((await dump(store)).commands)  # too recently finished
    for _ in range(5):  # a few sweeps walk every timer
        await store.fire_timers(now_ms=T0 + 1 + RECLAIM_MIN_AGE_MS)
    state = await dump(store)
    assert not set(done) & set(state.commands)  # purged ahead of the day's retention
    assert keyed in state.commands  # its idempotency key is still in its window
    assert len(state.commands) == 1_501
