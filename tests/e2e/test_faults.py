"""Faults an operations team meets on day one, each against a real broker and real LMDB:
lost streams, silent cars, clock steps, a stalled store, a full map, shutdown."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest

from broker.config import DEFAULT_COMMANDS, CommandPolicy
from broker.core import clock
from broker.core.errors import StoreUnavailable
from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.sdk.vehicle import succeed
from broker.v1 import types_pb2 as t
from broker.wire import pushback_ms
from tests.conftest import eventually, tmpfs
from tests.e2e.harness import RawCar, Running, status_reached

#: unlock with a 3 s result timeout, so a stale deadline would show within the test
QUICK_RESULTS = MappingProxyType(
    {**DEFAULT_COMMANDS, "unlock": CommandPolicy(t.CRITICAL, ttl_s=60, result_timeout_s=3.0)}
)


# -- a lost stream: re-queued, re-sent with a new deadline, run once ---------------------------


async def test_a_requeued_command_is_resent_when_its_car_returns_not_timed_out(
    start_broker: Callable[..., Any], cars: Any
) -> None:
    running = await start_broker(commands=QUICK_RESULTS, sweep_interval_s=0.05)
    client = running.client()
    raw = RawCar(running.target, "car-1")
    await raw.hello()
    reply = await client.send_command("car-1", "unlock")
    command_id = reply.command.command_id
    await status_reached(client, command_id, t.DELIVERED)
    await raw.close()  # the link is gone before the car read the command
    await status_reached(client, command_id, t.QUEUED)
    # Past the first attempt's 3 s result deadline, with 60 s of TTL left: still queued.
    await asyncio.sleep(3.5)  # a negative: the deadline must pass with nothing happening
    command = await client.get_command(command_id)
    assert (command.status, command.result_deadline_ms) == (t.QUEUED, 0)
    agent = await cars(running, "car-1")
    done = await status_reached(client, command_id, t.SUCCEEDED)
    assert done.attempt == 2
    assert agent.executed == [command_id]


# -- a silent car: its stream is closed by the heartbeat check ---------------------------------


async def test_a_car_that_goes_silent_is_seen_gone_and_one_that_heartbeats_is_not(
    start_broker: Callable[..., Any], cars: Any
) -> None:
    running = await start_broker(heartbeat_interval_s=0.25, liveness_timeout_s=2.0)
    client = running.client()
    # The raw car's connection stays up and answers HTTP/2 PINGs (as a proxy in front of
    # a dead car would), but it sends no frame: only the heartbeat check can tell.
    raw = RawCar(running.target, "car-silent")
    welcome = await raw.hello()
    assert (welcome.heartbeat_interval_ms, welcome.liveness_timeout_ms) == (250, 2000)
    # A car whose firmware predates heartbeats is left to the transport's keepalive.
    old_firmware = RawCar(running.target, "car-old")
    await old_firmware.hello(sends_heartbeats=False)
    agent = await cars(running, "car-alive")
    assert (await client.get_vehicle_state("car-silent")).connected
    await eventually(
        lambda: client.get_vehicle_state("car-silent"),
        lambda state: not state.connected,
        timeout_s=5,
        what="the silent car shown as disconnected",
    )
    assert running.broker.liveness.dead_links >= 1
    reply = await client.send_command("car-silent", "unlock")
    assert reply.command.status == t.QUEUED  # waits for the car, not for a dead stream
    # A negative: two liveness timeouts of an idle, heartbeating car pass without a drop.
    await asyncio.sleep(4.5)
    assert (await client.get_vehicle_state("car-alive")).connected
    assert agent.connects == 1
    assert (await client.get_vehicle_state("car-old")).connected
    await raw.close()
    await old_firmware.close()


# -- clock steps: deadlines keep to steady time ---------------------------------------------


class SteppedWall:
    """A wall clock the test can step, as NTP or an operator would."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns

    def step(self, seconds: float) -> None:
        self.offset_ns += int(seconds * 1e9)


@pytest.fixture
def wall() -> Any:
    stepped = SteppedWall()
    previous = clock.install(clock.Clock(wall_ns=stepped))
    yield stepped
    clock.install(previous)


async def test_a_wall_clock_step_back_does_not_make_a_command_run_late(
    wall: SteppedWall, start_broker: Callable[..., Any], cars: Any
) -> None:
    running = await start_broker(sweep_interval_s=0.05)
    client = running.client()
    reply = await client.send_command("car-1", "unlock", ttl_s=2)
    wall.step(-30)
    expired = await status_reached(client, reply.command.command_id, t.EXPIRED, timeout_s=5)
    assert expired.expires_at_ms - expired.created_at_ms == 2000
    assert expired.updated_at_ms - expired.created_at_ms < 3000  # by steady time
    agent = await cars(running, "car-1")
    await asyncio.sleep(0.3)  # a negative: no sign to wait for that it will never be sent
    assert agent.executed == []


def _count_sweeps(running: Running) -> Callable[[], int]:
    """A probe of how many timer sweeps the broker finished since it was made."""
    dispatcher = running.broker.dispatcher
    fire_timers = dispatcher.fire_timers
    finished = [0]

    async def counting() -> int:
        changed = await fire_timers()
        finished[0] += 1
        return changed

    dispatcher.fire_timers = counting  # type: ignore[method-assign]
    return lambda: finished[0]


async def test_a_wall_clock_step_forward_expires_nothing_and_keeps_idempotency(
    wall: SteppedWall, start_broker: Callable[..., Any]
) -> None:
    running = await start_broker(sweep_interval_s=0.05)
    client = running.client()
    first = await client.send_command("car-1", "climate", ttl_s=60, idempotency_key="k-1")
    wall.step(25 * 3600)
    sweeps = _count_sweeps(running)  # each one counted starts after the step
    await eventually(sweeps, lambda n: n >= 10, what="ten timer sweeps after the step")
    assert (await client.get_command(first.command.command_id)).status == t.QUEUED
    again = await client.send_command("car-1", "climate", ttl_s=60, idempotency_key="k-1")
    assert again.deduplicated and again.command.command_id == first.command.command_id


async def test_after_a_restart_broker_time_never_goes_behind_what_is_stored(
    wall: SteppedWall, start_broker: Callable[..., Any], tmp_path: Any
) -> None:
    running = await start_broker(data_dir=tmp_path / "clock")
    reply = await running.client().send_command("car-1", "climate", ttl_s=60)
    await running.close()
    await running.broker.stop(0.1)
    stopped_at = clock.now_ms()
    wall.step(-3600)  # set back an hour while the broker was down
    await asyncio.sleep(0.5)  # down for a while: a duration the restart must count
    clock.install(clock.Clock(wall_ns=wall))  # as a new process would start
    restarted = await start_broker(data_dir=tmp_path / "clock")
    # Same boot: it goes on from the stored reference, the half second down counted.
    assert clock.now_ms() >= stopped_at + 500
    command = await restarted.client().get_command(reply.command.command_id)
    assert command.status == t.QUEUED  # 60 s of TTL did not become 61 minutes
    assert command.expires_at_ms - clock.now_ms() < 60_000


# -- a stalled store: nothing runs after its caller was told it failed ------------------------


def _count_creates(running: Running) -> Callable[[], Any]:
    """A probe of how many creates were handed to the writer (counted as submitted)."""
    store = running.broker.store
    submit_create = store.create
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        future = submit_create(*args, **kwargs)
        calls[0] += 1
        return future

    store.create = counting  # type: ignore[method-assign]
    return lambda: calls[0]


async def _stall(running: Running) -> tuple[threading.Event, Any]:
    """Block the LMDB thread until the event is set (as fsfreeze or a dying disk would);
    returns once it is blocked."""
    gate, started = threading.Event(), threading.Event()

    def block(txn: Any) -> None:
        started.set()
        gate.wait(10)

    blocked = running.broker.store.writer.submit(block)
    await asyncio.to_thread(started.wait, 5)
    return gate, blocked


async def test_a_command_whose_caller_gave_up_during_a_stall_is_never_written(
    running: Running, cars: Any
) -> None:
    agent = await cars(running, "car-1")
    impatient = BrokerClient(running.target, token=running.service_token(), timeout_s=0.5)
    gate, blocked = await _stall(running)
    with pytest.raises(BrokerRpcError) as refused:
        await impatient.send_command("car-1", "unlock")
    assert refused.value.code == "DEADLINE_EXCEEDED"
    gate.set()
    await blocked
    await asyncio.sleep(0.3)  # a negative: no sign to wait for that it is never written
    assert await running.client().list_commands("car-1") == []
    assert agent.executed == []
    await impatient.close()


async def test_a_command_committed_after_its_callers_deadline_is_abandoned_unsent(
    running: Running, cars: Any
) -> None:
    agent = await cars(running, "car-1")
    impatient = BrokerClient(running.target, token=running.service_token(), timeout_s=0.6)
    gate, blocked = await _stall(running)
    creates = _count_creates(running)
    sending = asyncio.create_task(impatient.send_command("car-1", "unlock"))
    await eventually(creates, what="the create queued behind the stall")
    # Committed in one group with a slow operation queued after it: its commit lands
    # after the caller's deadline although its write ran before it.
    slow = running.broker.store.writer.submit(lambda txn: time.sleep(1.0))
    gate.set()
    with pytest.raises(BrokerRpcError) as refused:
        await sending
    assert refused.value.code == "DEADLINE_EXCEEDED"
    await blocked
    await slow
    client = running.client()
    [command] = await eventually(
        lambda: client.list_commands("car-1"),
        lambda found: [c.status for c in found] == [t.CANCELED],
        what="the late command abandoned",
    )
    assert "never sent" in command.status_reason
    assert running.broker.dispatcher.abandoned == 1  # counted for metrics
    await asyncio.sleep(0.3)  # a negative: no sign to wait for that it is never sent
    assert agent.executed == []
    await impatient.close()


async def test_a_retry_that_finds_an_abandoned_command_is_refused_then_sent_afresh(
    running: Running, cars: Any
) -> None:
    agent = await cars(running, "car-1")
    impatient = BrokerClient(running.target, token=running.service_token(), timeout_s=0.6)
    patient = running.client()
    writer = running.broker.store.writer
    gate, blocked = await _stall(running)
    creates = _count_creates(running)
    first = asyncio.create_task(impatient.send_command("car-1", "unlock", idempotency_key="k"))
    await eventually(creates, what="the first try queued")
    retry = asyncio.create_task(patient.send_command("car-1", "unlock", idempotency_key="k"))
    await eventually(creates, lambda n: n >= 2, what="the retry queued")
    slow = writer.submit(lambda txn: time.sleep(1.0))  # the group commits past 0.6 s
    gate.set()
    with pytest.raises(BrokerRpcError):
        await first
    reply = await retry  # refused while the first is abandoned, then sent afresh
    await asyncio.gather(blocked, slow)
    assert patient.retries >= 1
    listed = await patient.list_commands("car-1")
    statuses = {c.command_id: c.status for c in listed}
    [abandoned] = [cid for cid, status in statuses.items() if status == t.CANCELED]
    assert reply.command.command_id != abandoned and len(statuses) == 2
    await status_reached(patient, reply.command.command_id, t.SUCCEEDED)
    assert agent.executed == [reply.command.command_id]
    await impatient.close()


async def test_a_critical_command_stuck_behind_a_stall_is_refused_and_retried_once(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(critical_commit_wait_s=0.3)
    client = running.client()
    gate, blocked = await _stall(running)
    # The stall must outlast the 0.3 s commit bound: a duration (the refusal comes only
    # when the stalled write ends, so it cannot be waited for first).
    threading.Timer(1.0, gate.set).start()
    reply = await client.send_command("car-1", "unlock")  # the SDK retries the refusal
    await blocked
    assert client.retries >= 1
    listed = await client.list_commands("car-1")
    assert [c.command_id for c in listed] == [reply.command.command_id]


# -- a full map or disk: refuse early, keep serving what was accepted, recover in place ------


async def test_a_full_map_refuses_new_work_drains_what_it_has_and_recovers_without_restart(
    start_broker: Callable[..., Any], cars: Any
) -> None:
    running = await start_broker(
        map_size_mb=1,
        map_size_max_mb=2,
        store_reserve_mb=1,
        sweep_interval_s=0.05,
        retention_s=3,  # finished commands make room; ahead of retention: test_store.py
        idempotency_window_s=2,
    )
    await _fill_drain_recover(running, cars, cause="map", make_room=None)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs mounted for the test (root only), unmounted after it."""
    with tmpfs(tmp_path, "24m") as mount:
        yield mount


async def test_a_full_disk_refuses_new_work_drains_what_it_has_and_recovers_when_freed(
    start_broker: Callable[..., Any], cars: Any, small_disk: Path
) -> None:
    running = await start_broker(
        data_dir=small_disk / "data", map_size_mb=1, store_reserve_mb=4, sweep_interval_s=0.05
    )
    # Leave 6 MiB free: 2 MiB past the reserve.
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(free.f_bavail * free.f_frsize - (6 << 20)))
    await _fill_drain_recover(running, cars, cause="disk", make_room=filler.unlink)


async def _fill_drain_recover(
    running: Running, cars: Any, *, cause: str, make_room: Callable[[], None] | None
) -> None:
    strict = BrokerClient(running.target, token=running.service_token(), max_retries=0)
    accepted: list[str] = []
    refusal = None
    for index in range(20_000):
        try:
            # the largest payload allowed: each status change must still fit while draining
            reply = await strict.send_command(f"car-{index % 10}", "config", bytes(16384))
        except BrokerRpcError as exc:
            refusal = exc
            break
        accepted.append(reply.command.command_id)
    assert refusal is not None, "the store never filled"
    assert refusal.code == "UNAVAILABLE" and refusal.retry_after_ms is not None
    assert cause in refusal.message and "nothing accepted is lost" in refusal.message
    assert running.broker.store.space_refusals >= 1  # counted for metrics
    assert len(accepted) > 20
    # Parked cars connect to the full store: their queues load and drain completely.
    agents = [await cars(running, f"car-{i}", handlers={"config": succeed}) for i in range(10)]

    async def executed() -> list[str]:
        return [command_id for agent in agents for command_id in agent.executed]

    ran = await eventually(
        executed, lambda ids: len(ids) >= len(accepted), timeout_s=30, what="the drain"
    )
    assert sorted(ran) == sorted(accepted)  # every one, once
    if make_room is not None:
        make_room()
    recovered = await eventually(
        lambda: _try_send(strict, "car-0"),
        timeout_s=30,
        interval_s=0.2,
        what="a new command accepted again",
    )
    assert recovered.command.status in (t.DELIVERED, t.SUCCEEDED, t.ACCEPTED)
    await strict.close()


async def _try_send(client: BrokerClient, vehicle_id: str) -> Any:
    try:
        return await client.send_command(vehicle_id, "config", bytes(400))
    except BrokerRpcError:
        return None


# -- shutdown: waiting calls answered with their status ----------------------------------------


async def test_shutdown_answers_waiting_calls_with_their_commands_status(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(drain_delay_s=0.3, grace_s=10)
    client = running.client()
    waiting = asyncio.create_task(
        client.send_command("car-parked", "unlock", wait="result", timeout_s=60)
    )
    await eventually(lambda: client.list_commands("car-parked"), what="the waiting call's command")
    started = time.monotonic()
    await running.broker.stop()
    reply = await waiting
    assert reply.command.command_id and reply.command.status == t.QUEUED
    assert reply.wait_timed_out
    assert time.monotonic() - started < 5  # done when drained, not after the 10 s grace


async def test_a_car_whose_queue_cannot_be_loaded_is_told_when_to_come_back(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = running.broker.store

    def failing_load(vehicle_ids: Any, **_: Any) -> asyncio.Future[Any]:
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(StoreUnavailable("the disk is failing"))
        return failed

    monkeypatch.setattr(store, "load_pending", failing_load)
    raw = RawCar(running.target, "car-1")
    await raw.hello()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await raw.call.read()
            if raw.call.done():
                await raw.call  # raises with the stream's status
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    hint = pushback_ms(ended.value.trailing_metadata())
    assert hint is not None and hint >= 2000  # not a tight reconnect loop
    await raw.close()


class LoopDisk:
    """A small ext4 filesystem on a loop device, mounted for one test (root only), that
    the test can freeze as `fsfreeze` does: every write and fsync on it blocks."""

    def __init__(self, folder: Path) -> None:
        self.image = folder / "disk.img"
        self.mount = folder / "disk"
        self.frozen = False

    def __enter__(self) -> LoopDisk:
        self.mount.mkdir()
        subprocess.run(["truncate", "-s", "64M", str(self.image)], check=True)
        for argv in (
            ["mkfs.ext4", "-q", "-F", str(self.image)],
            ["mount", "-o", "loop", str(self.image), str(self.mount)],
        ):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"{argv[0]}: {done.stderr.strip()}")
        return self

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", str(self.mount)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", str(self.mount)], check=True)
            self.frozen = False

    def __exit__(self, *exc: object) -> None:
        self.thaw()
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted filesystem needs root")
    missing = [tool for tool in ("mkfs.ext4", "fsfreeze") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (e2fsprogs, util-linux)")
    with LoopDisk(tmp_path) as disk:
        yield disk


async def test_unlocks_answered_deadline_exceeded_during_an_fsfreeze_never_run(
    start_broker: Callable[..., Any], cars: Any, loop_disk: LoopDisk
) -> None:
    running = await start_broker(data_dir=loop_disk.mount / "data")
    agent = await cars(running, "car-1")
    impatient = BrokerClient(running.target, token=running.service_token(), timeout_s=0.5)
    loop_disk.freeze()
    try:
        sends = [impatient.send_command("car-1", "unlock") for _ in range(5)]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        await asyncio.sleep(1.5)  # a duration: frozen well past every caller's deadline
    finally:
        loop_disk.thaw()
    assert all(isinstance(o, BrokerRpcError) and o.code == "DEADLINE_EXCEEDED" for o in outcomes), (
        outcomes
    )
    client = running.client()
    # The store caught up after the thaw: a no-op behind every queued write has committed
    # (from then on each late command is listed, and `eventually` waits for its abandon).
    await running.broker.store.writer.submit(lambda txn: None)
    listed = await eventually(
        lambda: client.list_commands("car-1"),
        lambda found: all(c.status == t.CANCELED for c in found),
        what="every late command abandoned",
    )
    assert len(listed) <= 5
    assert agent.executed == []  # nothing ran after its caller was told it failed
    await impatient.close()
