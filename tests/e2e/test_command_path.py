"""The command path end to end against a real server and real LMDB."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.config import DEFAULT_COMMANDS, CommandPolicy
from broker.sdk.client import BrokerRpcError, SyncBrokerClient, build_request
from broker.sdk.vehicle import VehicleAgent, succeed
from broker.v1 import types_pb2 as t
from tests.conftest import eventually
from tests.e2e.harness import Running, status_reached

FAST_TIMERS = {"sweep_interval_s": 0.05}


@pytest.fixture
def online(running: Running, cars: Callable[..., Any]) -> Callable[..., Any]:
    """`await online("car-1", handlers=...)`: a VehicleAgent connected to `running`."""

    async def connect(vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        agent: VehicleAgent = await cars(running, vehicle_id, **kwargs)
        return agent

    return connect


async def test_online_unlock_round_trip_succeeds(running: Running, online: Any) -> None:
    agent = await online("car-1")
    client = running.client()
    reply = await client.send_command("car-1", "unlock", wait="result", timeout_s=5)
    assert reply.command.status == t.SUCCEEDED
    assert reply.command.attempt == 1
    assert reply.command.lane == t.CRITICAL
    assert not reply.wait_timed_out
    assert agent.executed == [reply.command.command_id]
    stored = await client.get_command(reply.command.command_id)
    assert stored.status == t.SUCCEEDED


async def test_offline_car_gets_queued_command_on_connect(running: Running, online: Any) -> None:
    client = running.client()
    reply = await client.send_command("car-2", "unlock", wait="delivered", timeout_s=0.3)
    assert reply.command.status == t.QUEUED
    assert reply.wait_timed_out  # a sleeping car is an answer, not an error
    agent = await online("car-2")
    done = await status_reached(client, reply.command.command_id, t.SUCCEEDED)
    assert done.status == t.SUCCEEDED
    assert agent.executed == [reply.command.command_id]


async def test_ttl_passing_while_offline_expires_and_is_never_delivered(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(**FAST_TIMERS)
    client = running.client()
    reply = await client.send_command("car-3", "unlock", ttl_s=0.2)
    assert reply.command.status == t.QUEUED
    expired = await status_reached(client, reply.command.command_id, t.EXPIRED)
    assert expired.status == t.EXPIRED
    assert expired.attempt == 0
    agent = running.agent("car-3", handlers={"unlock": succeed})
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 5)
    await asyncio.sleep(0.3)  # a negative: no sign to wait for that it will never be sent
    assert agent.executed == []
    assert (await client.get_command(reply.command.command_id)).status == t.EXPIRED
    task.cancel()


async def test_wait_result_on_expiry_returns_expired(start_broker: Callable[..., Any]) -> None:
    running = await start_broker(**FAST_TIMERS)
    reply = await running.client().send_command(
        "car-4", "unlock", ttl_s=0.2, wait="result", timeout_s=5
    )
    assert reply.command.status == t.EXPIRED
    assert not reply.wait_timed_out


async def test_idempotent_resend_returns_the_first_command(running: Running) -> None:
    client = running.client()
    first = await client.send_command("car-5", "lock", idempotency_key="k-1")
    again = await client.send_command("car-5", "lock", idempotency_key="k-1")
    assert again.deduplicated and not first.deduplicated
    assert again.command.command_id == first.command.command_id
    assert len(await client.list_commands("car-5")) == 1
    with pytest.raises(BrokerRpcError) as info:
        await client.send_command("car-5", "unlock", idempotency_key="k-1")
    assert info.value.code == "ALREADY_EXISTS"


async def test_cancel_before_delivery(running: Running, online: Any) -> None:
    client = running.client()
    reply = await client.send_command("car-6", "climate")
    canceled = await client.cancel_command(reply.command.command_id)
    assert canceled.status == t.CANCELED
    agent = await online("car-6")
    await asyncio.sleep(0.2)  # a negative: no sign to wait for that it will never be sent
    assert agent.executed == []
    with pytest.raises(BrokerRpcError) as info:
        await client.cancel_command(reply.command.command_id)
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(BrokerRpcError) as info:
        await client.cancel_command("0000000000000000nosuchid")
    assert info.value.code == "NOT_FOUND"


async def test_coalescing_executes_only_the_last(running: Running, online: Any) -> None:
    client = running.client()
    sent = []
    for degrees in (18, 20, 23):
        payload = json.dumps({"temperature_c": degrees}).encode()
        reply = await client.send_command("car-7", "climate", payload, coalesce_key="climate")
        sent.append(reply.command.command_id)
    statuses = [(await client.get_command(cid)).status for cid in sent]
    assert statuses == [t.SUPERSEDED, t.SUPERSEDED, t.QUEUED]
    seen: list[bytes] = []

    async def climate(payload: bytes) -> bool:
        seen.append(payload)
        return True

    agent = await online("car-7", handlers={"climate": climate})
    assert (await status_reached(client, sent[-1], t.SUCCEEDED)).status == t.SUCCEEDED
    assert agent.executed == [sent[-1]]
    assert seen == [b'{"temperature_c": 23}']


async def test_priority_then_fifo_per_vehicle(start_broker: Callable[..., Any]) -> None:
    running = await start_broker(window=1)
    client = running.client()
    order = [("climate", None), ("data_request", None), ("unlock", None), ("climate", None)]
    ids = [(await client.send_command("car-8", name)).command.command_id for name, _ in order]
    agent = running.agent(
        "car-8", handlers={"climate": succeed, "data_request": succeed, "unlock": succeed}
    )
    task = asyncio.create_task(agent.run())
    for command_id in ids:
        await status_reached(client, command_id, t.SUCCEEDED)
    # critical first, then interactive in FIFO order, bulk last
    assert agent.executed == [ids[2], ids[0], ids[3], ids[1]]
    task.cancel()


async def test_second_connection_replaces_the_first(running: Running, online: Any) -> None:
    first = await online("car-9")
    first_session = first.session_id
    second = await online("car-9")
    assert second.session_id != first_session
    await eventually(lambda: first.last_error is not None, what="the first stream's end")
    assert first.last_error is not None
    assert first.last_error.code() == grpc.StatusCode.ABORTED
    assert "replaced" in (first.last_error.details() or "")
    await first.stop()  # stop the old one reconnecting and replacing in turn
    reply = await running.client().send_command("car-9", "unlock", wait="result", timeout_s=5)
    assert reply.command.status == t.SUCCEEDED
    assert reply.command.command_id in second.executed


async def test_no_result_before_result_timeout_is_unknown(
    start_broker: Callable[..., Any],
) -> None:
    commands = dict(DEFAULT_COMMANDS)
    commands["slow"] = CommandPolicy(t.INTERACTIVE, ttl_s=30, result_timeout_s=0.3)
    running = await start_broker(commands=commands, **FAST_TIMERS)
    release = asyncio.Event()

    async def slow(payload: bytes) -> bool:
        await release.wait()
        return True

    agent = running.agent("car-10", handlers={"slow": slow})
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 5)
    reply = await running.client().send_command("car-10", "slow", wait="result", timeout_s=5)
    assert reply.command.status == t.UNKNOWN
    assert "may have been executed" in reply.command.status_reason
    assert reply.command.attempt == 1  # never retried blindly
    release.set()  # a late result refines UNKNOWN into the truth
    late = await status_reached(running.client(), reply.command.command_id, t.SUCCEEDED)
    assert late.status == t.SUCCEEDED
    assert agent.executed == [reply.command.command_id]
    task.cancel()


async def test_unacked_commands_are_resent_with_next_attempt(running: Running, online: Any) -> None:
    """A car that drops the stream before acking gets the command again, attempt 2."""
    client = running.client()
    reply = await client.send_command("car-11", "unlock")
    agent = running.agent("car-11", handlers={"unlock": succeed})
    # Connect by hand, read the command, then vanish without acking.
    connect = agent._channel.stream_stream(
        "/broker.v1.VehicleLink/Connect",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    from broker.v1 import vehicle_link_pb2 as link

    call = connect(metadata=agent._stream_metadata())
    await call.write(link.VehicleFrame(hello=link.Hello()))
    frames = [link.BrokerFrame.FromString(await call.read()) for _ in range(2)]
    assert frames[1].command.command_id == reply.command.command_id
    assert frames[1].command.attempt == 1
    call.cancel()
    await status_reached(client, reply.command.command_id, t.QUEUED)  # the loss is seen
    agent_task = asyncio.create_task(agent.run())
    done = await status_reached(client, reply.command.command_id, t.SUCCEEDED)
    assert done.status == t.SUCCEEDED
    assert done.attempt == 2
    agent_task.cancel()


async def test_watch_commands_streams_every_status(running: Running, online: Any) -> None:
    client = running.client()
    seen: list[int] = []

    async def watch() -> None:
        async for command in client.watch_commands(vehicle_ids=["car-12"]):
            seen.append(command.status)
            if command.status in (t.SUCCEEDED, t.FAILED):
                return

    watcher = asyncio.create_task(watch())
    await eventually(lambda: running.broker.events.watcher_count, what="the watch registered")
    await online("car-12")
    await client.send_command("car-12", "unlock")
    await asyncio.wait_for(watcher, 5)
    # A connected car with a free slot: accepted and delivered in one durable write.
    assert seen[0] == t.DELIVERED
    assert seen[-1] == t.SUCCEEDED


async def test_car_acks_only_commands_whose_result_is_not_ready_at_once(
    running: Running, online: Any
) -> None:
    """A quick command's result is its ack (one frame, one write); a slow one is ACKED first."""
    client = running.client()
    release = asyncio.Event()

    async def slow(payload: bytes) -> bool:
        await release.wait()
        return True

    await online("car-16", handlers={"unlock": succeed, "climate": slow}, ack_delay_s=0.05)
    seen: dict[str, list[int]] = {}

    async def watch() -> None:
        async for command in client.watch_commands(vehicle_ids=["car-16"]):
            seen.setdefault(command.command_id, []).append(command.status)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: running.broker.events.watcher_count, what="the watch registered")
    quick = await client.send_command("car-16", "unlock", wait="result", timeout_s=5)
    slow_sent = await client.send_command("car-16", "climate")
    acked = await status_reached(client, slow_sent.command.command_id, t.ACKED)
    release.set()
    done = await status_reached(client, slow_sent.command.command_id, t.SUCCEEDED)
    await eventually(  # the watch stream may trail the store by a moment
        lambda: seen.get(slow_sent.command.command_id, [])[-1:] == [t.SUCCEEDED],
        what="the watch stream showing SUCCEEDED",
    )
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert quick.command.status == t.SUCCEEDED
    assert t.ACKED not in seen[quick.command.command_id]
    assert seen[quick.command.command_id][-2:] == [t.DELIVERED, t.SUCCEEDED]
    assert acked.status == t.ACKED and done.status == t.SUCCEEDED
    assert seen[slow_sent.command.command_id][-3:] == [t.DELIVERED, t.ACKED, t.SUCCEEDED]


async def test_vehicle_state_is_never_stale_as_current(running: Running, online: Any) -> None:
    agent = await online("car-13")
    await agent.report_state({"locked": True, "lat": 48.1})
    client = running.client()
    state = await eventually(
        lambda: client.get_vehicle_state("car-13"),
        lambda state: "locked" in state.fields and "lat" in state.fields,
        what="the reported state",
    )
    assert state.connected and state.connected_since_ms > 0
    assert state.fields["locked"].value.flag is True
    assert state.fields["lat"].reported_at_ms > 0
    await agent.stop()
    state = await eventually(
        lambda: client.get_vehicle_state("car-13"),
        lambda state: not state.connected,
        what="car-13 shown as disconnected",
    )
    assert not state.connected
    assert state.connected_since_ms == 0
    assert state.last_seen_ms > 0
    assert state.fields["lat"].value.number == pytest.approx(48.1)
    never = await client.get_vehicle_state("car-never")
    assert not never.connected and never.last_seen_ms == 0 and not never.fields


async def test_send_commands_batch_reports_each_item(running: Running) -> None:
    client = running.client()
    reply = await client.send_commands(
        [
            build_request("car-14", "unlock"),
            build_request("", "unlock"),
            build_request("car-15", "climate", {"temperature_c": 21}),
            build_request("car-14", "lock", wait="result"),
        ]
    )
    kinds = [item.WhichOneof("outcome") for item in reply.items]
    assert kinds == ["accepted", "error", "accepted", "error"]
    assert reply.items[1].error.code == "INVALID_ARGUMENT"
    assert reply.items[0].accepted.command.status == t.QUEUED
    listed = await client.list_commands("car-14")
    assert [c.name for c in listed] == ["unlock"]


async def test_sync_client_from_plain_code(running: Running) -> None:
    def use_sync() -> tuple[int, str]:
        with SyncBrokerClient(running.target, token=running.service_token()) as client:
            reply = client.send_command("car-16", "lock")
            again = client.get_command(reply.command.command_id)
            return again.status, again.command_id

    status, command_id = await asyncio.to_thread(use_sync)
    assert status == t.QUEUED and command_id


async def test_health_always_and_reflection_when_asked(
    running: Running, start_broker: Callable[..., Any], tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as off:  # production default: not listed
            async for _ in stub.ServerReflectionInfo(iter([listing])):
                pass
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    running = await start_broker(reflection="on", data_dir=tmp_path / "reflecting")
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="broker.v1.CommandService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for response in stub.ServerReflectionInfo(iter([listing])):
            names |= {s.name for s in response.list_services_response.service}
        assert {"broker.v1.CommandService", "broker.v1.VehicleLink"} <= names
