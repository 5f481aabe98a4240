"""Restarts of a real broker process: SIGTERM under an orchestrator, kill -9 under the SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.sdk.client import BrokerClient
from broker.testing import BrokerProcess
from broker.v1 import types_pb2 as t
from tests.conftest import eventually, session_keys

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sigterm_shows_not_serving_first_then_drains_and_exits_early(
    spawn: Callable[..., BrokerProcess],
) -> None:
    broker = spawn(env={"BROKER_DRAIN_DELAY_S": "3", "BROKER_GRACE_S": "20"})
    token = session_keys().service_token("send", "read", name="ops")
    async with (
        grpc.aio.insecure_channel(broker.target) as channel,
        BrokerClient(broker.target, token=token, max_retries=0) as client,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return int(reply.status)

        assert await status() == SERVING
        waiting = asyncio.create_task(
            client.send_command("car-parked", "unlock", wait="result", timeout_s=60)
        )
        await eventually(lambda: client.list_commands("car-parked"), what="a waiting call")
        started = time.monotonic()
        stopping = asyncio.create_task(broker.astop())
        await eventually(status, lambda s: s == NOT_SERVING, what="health NOT_SERVING")
        # Still serving while it says so: a load balancer has time to stop sending.
        served = await client.send_command("car-other", "lock")
        assert served.command.status == t.QUEUED
        reply = await waiting
        assert reply.command.command_id and reply.command.status == t.QUEUED
        assert reply.wait_timed_out
        await stopping
    assert broker.exit_code == 0
    # Drained as soon as nothing needed it: the drain delay, not the 20 s grace.
    assert time.monotonic() - started < 10, broker.logs()


async def test_sdk_retries_through_a_kill_9_and_never_duplicates_a_command(
    spawn: Callable[..., BrokerProcess],
) -> None:
    broker = spawn(env={"BROKER_CRITICAL_PER_MINUTE": "100000"})
    token = session_keys().service_token("send", "read", name="app")
    sends = 60
    async with BrokerClient(
        broker.target, token=token, timeout_s=60, reconnect_wait_s=45
    ) as client:
        replies: list[str] = []

        async def sender(first: int) -> None:
            for n in range(first, sends, 4):
                reply = await client.send_command(f"car-{n % 6}", "climate", {"n": n})
                replies.append(reply.command.command_id)
                await asyncio.sleep(0.02)  # pacing: sends keep coming across the kill

        senders = asyncio.gather(*(sender(i) for i in range(4)))
        await eventually(lambda: len(replies) >= 10, what="sends under way")
        await broker.akill()  # mid-flight: some sends are lost in transit
        await asyncio.sleep(0.5)  # deliberately down a while: the SDK must ride it out
        await broker.astart()  # same folder, same port
        await asyncio.wait_for(senders, 60)
        stored = [c for v in range(6) for c in await client.list_commands(f"car-{v}")]
    assert len(replies) == sends
    assert sorted(c.command_id for c in stored) == sorted(set(replies))
    assert len(stored) == sends  # one command per logical send, retries included
    assert client.retries >= 1
