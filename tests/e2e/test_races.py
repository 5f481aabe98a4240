"""Races the review found: each once let a command or a state value go wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from broker.core.clock import now_ms
from broker.core.store import NewCommand
from broker.sdk.client import BrokerRpcError, build_request
from broker.sdk.vehicle import VehicleAgent
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually
from tests.e2e.harness import Running, settled


async def _agent(running: Running, vehicle_id: str, **handlers: Any) -> VehicleAgent:
    agent = running.agent(vehicle_id, handlers=handlers)
    asyncio.create_task(agent.run())  # noqa: RUF006 - stopped by the fixture's closers
    await asyncio.wait_for(agent.connected.wait(), 5)
    return agent


async def test_a_canceled_command_never_reaches_the_car(running: Running) -> None:
    """Cancel right behind the send: either CANCELED and never run, or refused and run."""

    async def climate(payload: bytes) -> bool:
        return True

    agent = await _agent(running, "race-cancel", climate=climate)
    client = running.client()
    canceled = []
    for _ in range(25):
        reply = await client.send_command("race-cancel", "climate")
        command_id = reply.command.command_id
        try:
            await client.cancel_command(command_id)
            canceled.append(command_id)
        except BrokerRpcError as exc:
            assert exc.code == "FAILED_PRECONDITION"
            assert (await settled(client, command_id)).status == t.SUCCEEDED
    await asyncio.sleep(0.3)  # a negative: no sign to wait for that a canceled one never runs
    assert not set(canceled) & set(agent.executed)
    for command_id in canceled:
        assert (await client.get_command(command_id)).status == t.CANCELED


async def test_a_caller_cancelled_during_the_write_does_not_strand_its_command(
    running: Running,
) -> None:
    item = NewCommand("race-strand", "climate", b"", t.INTERACTIVE, 60_000, sender="service:tests")
    dispatcher = running.broker.dispatcher
    task = asyncio.create_task(dispatcher.submit([item]))
    await asyncio.sleep(0)  # the write is queued; the caller goes away before it commits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    client = running.client()
    (command,) = await eventually(
        lambda: client.list_commands("race-strand"), what="the command committed"
    )
    assert dispatcher.pending_total == 1  # on disk, where a parked car's queue lives
    agent = await _agent(running, "race-strand", climate=lambda payload: _true())
    assert (await settled(client, command.command_id)).status == t.SUCCEEDED
    assert agent.executed == [command.command_id]


async def _true() -> bool:
    return True


async def test_state_survives_a_fast_reconnect(running: Running) -> None:
    first = await _agent(running, "race-state")
    second = await _agent(running, "race-state")  # replaces the first
    await first.stop()
    await second.report_state({"odometer": 1234})
    client = running.client()
    state = await eventually(
        lambda: client.get_vehicle_state("race-state"),
        lambda state: "odometer" in state.fields,
        what="the reported odometer",
    )
    assert state.connected
    assert state.fields["odometer"].value.number == 1234


async def test_unstamped_values_keep_updating(running: Running) -> None:
    agent = await _agent(running, "race-stamp")
    for value in (1, 2, 3):
        await agent._send(
            link.VehicleFrame(
                state=link.StateReport(
                    fields=[link.Signal(name="gear", value=t.Value(number=value))]
                )
            )
        )
        await asyncio.sleep(0.01)  # pacing: each value arrives at a later broker time
    client = running.client()
    state = await eventually(
        lambda: client.get_vehicle_state("race-stamp"),
        lambda state: state.fields["gear"].value.number == 3,
        what="the last gear value stored",
    )
    assert state.fields["gear"].value.number == 3
    assert 0 < state.fields["gear"].reported_at_ms <= now_ms()


async def test_a_too_long_key_fails_alone(running: Running) -> None:
    client = running.client()
    emoji_key = "\U0001f511" * 128  # 128 characters, 512 bytes
    results = await asyncio.gather(
        client.send_command("race-key", "climate", idempotency_key=emoji_key),
        client.send_command("race-key", "climate"),
        return_exceptions=True,
    )
    assert isinstance(results[0], BrokerRpcError) and results[0].code == "INVALID_ARGUMENT"
    assert not isinstance(results[1], BaseException)
    assert results[1].command.status == t.QUEUED


async def test_a_result_with_a_bad_command_id_is_invalid_argument(running: Running) -> None:
    agent = await _agent(running, "race-badid")
    await agent._send(link.VehicleFrame(result=link.CommandResult(command_id="", success=True)))
    await eventually(lambda: agent.last_error is not None, what="the stream's end")
    assert agent.last_error is not None
    assert agent.last_error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_sdk_executes_in_wire_order(start_broker: Callable[..., Any]) -> None:
    running = await start_broker(window=4)
    order: list[str] = []

    async def unlock(payload: bytes) -> bool:
        await asyncio.sleep(0.2)  # a slow actuator
        order.append("unlock")
        return True

    async def lock(payload: bytes) -> bool:
        order.append("lock")
        return True

    await _agent(running, "race-order", unlock=unlock, lock=lock)
    client = running.client()
    first = await client.send_command("race-order", "unlock")
    second = await client.send_command("race-order", "lock")
    for command_id in (first.command.command_id, second.command.command_id):
        assert (await settled(client, command_id)).status == t.SUCCEEDED
    assert order == ["unlock", "lock"]  # the car ends locked


async def test_the_car_keeps_reconnecting_when_its_call_dies_before_the_hello() -> None:
    """A call that failed before the Hello write got the write lock must not end run()."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    agent = VehicleAgent(f"127.0.0.1:{port}", "race-dead", backoff_base_s=0.01, backoff_cap_s=0.05)
    await agent._write_lock.acquire()
    runner = asyncio.create_task(agent.run())
    # The call waits for a listener (wait_for_ready), so end it by hand while the Hello
    # write waits for the lock: the call is dead before its first write.
    dead = await eventually(
        lambda: agent._call, lambda call: call is not None, what="the first call opened"
    )
    dead.cancel()
    agent._write_lock.release()
    await eventually(
        lambda: (agent._call is not None and agent._call is not dead) or runner.done(),
        what="a second call opened",
    )
    assert not runner.done(), runner.exception() if runner.done() else None
    await agent.stop()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_parked_cars_hold_no_memory_and_connecting_ones_get_everything_once(
    running: Running,
) -> None:
    """A parked car's queue lives on disk only; it is loaded when the car connects, and
    commands sent while that load is under way are neither lost nor doubled."""
    client = running.client()
    dispatcher = running.broker.dispatcher
    cars = [f"parked-{i}" for i in range(60)]
    before = [build_request(v, "climate", {"n": n}) for n in range(2) for v in cars]
    reply = await client.send_commands(before)
    first_ids = [item.accepted.command.command_id for item in reply.items]
    assert len(first_ids) == 120 and dispatcher.pending_total == 120
    assert dispatcher.queues_in_memory == 0

    agents = [running.agent(v, handlers={"climate": lambda payload: _true()}) for v in cars]
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    # One more command each while the cars connect (and their queues load).
    during = await asyncio.gather(*(client.send_command(v, "climate", {"n": 2}) for v in cars))
    ids = set(first_ids) | {r.command.command_id for r in during}
    for command_id in ids:
        assert (await settled(client, command_id)).status == t.SUCCEEDED
    runs = {agent.vehicle_id: agent.executed for agent in agents}
    assert sorted(c for ran in runs.values() for c in ran) == sorted(ids)  # each exactly once
    for vehicle_id, first, second in zip(cars, first_ids[:60], first_ids[60:], strict=True):
        assert runs[vehicle_id].index(first) < runs[vehicle_id].index(second)  # FIFO
    assert dispatcher.pending_total == 0
    for agent in agents:
        await agent.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert dispatcher.queues_in_memory == 0


async def test_commands_delivered_at_creation_keep_the_window_and_fifo(running: Running) -> None:
    """Commands to a connected car are created DELIVERED while its window has room (one
    durable write); a burst still never exceeds the window and runs in enqueue order."""
    client = running.client()
    dispatcher = running.broker.dispatcher
    window = running.broker.config.window

    async def slow(payload: bytes) -> bool:
        await asyncio.sleep(0.01)
        return True

    agent = await _agent(running, "race-window", climate=slow)
    await eventually(
        lambda: "race-window" not in dispatcher._queues,
        interval_s=0.005,
        what="its (empty) queue loaded and gone from memory",
    )
    most_in_flight = 0
    sampling = True

    async def sample() -> None:
        nonlocal most_in_flight
        while sampling:
            queue = dispatcher._queues.get("race-window")
            if queue is not None:
                most_in_flight = max(most_in_flight, len(queue.in_flight))
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    replies = await asyncio.gather(
        *(client.send_command("race-window", "climate", {"n": n}) for n in range(12))
    )
    by_seq = [r.command.command_id for r in sorted(replies, key=lambda r: r.command.seq)]
    for command_id in by_seq:
        assert (await settled(client, command_id)).status == t.SUCCEEDED
    sampling = False
    await sampler
    assert agent.executed == by_seq  # FIFO, each once
    assert 0 < most_in_flight <= window
    first = min((r.command for r in replies), key=lambda c: c.seq)
    assert first.status == t.DELIVERED and first.attempt == 1  # created delivered
    assert any(r.command.status == t.ACCEPTED for r in replies)  # the rest queued first
