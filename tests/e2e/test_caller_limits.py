"""Per-caller limits on a real broker, with two services holding tokens of their own: one
caller over its queue share, its rate, its critical quota for a car or its watch cap is
refused RESOURCE_EXHAUSTED and the other is untouched; a car that never reads costs the
outbox cap, not its queue; a car credential reconnecting in a loop defers no other car.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from broker.sdk.client import BrokerClient, BrokerRpcError, build_request
from broker.sdk.vehicle import succeed
from tests.conftest import eventually
from tests.e2e.harness import RawCar, Running, scrape


def service(running: Running, name: str) -> BrokerClient:
    """A client of service `name` (its own token, send and read), failing at once."""
    token = running.service_token("send", "read", name=name)
    client = BrokerClient(running.target, token=token, max_retries=0)
    running._closers.append(client.close)
    return client


async def outcome(call: Any) -> str:
    try:
        await call
    except BrokerRpcError as error:
        return error.code
    return "OK"


async def test_a_caller_holding_its_queue_share_is_refused_and_the_other_is_not(
    start_broker: Callable[..., Any],
) -> None:
    # A share of 0.2 x 100: 20 interactive commands not yet finished, 16 bulk.
    running: Running = await start_broker(durable_queue_budget=100, caller_queue_share=0.2)
    rogue, app = service(running, "rogue"), service(running, "fleet-app")
    for n in range(20):
        await rogue.send_command(f"parked-{n}", "climate")
    with pytest.raises(BrokerRpcError) as refused:
        await rogue.send_command("parked-x", "climate")
    error = refused.value
    assert error.code == "RESOURCE_EXHAUSTED" and error.retry_after_ms is not None
    assert "service:rogue" in error.message and "share of the durable queue" in error.message
    assert await outcome(rogue.send_command("parked-x", "unlock")) == "OK"  # critical goes
    for n in range(20):  # the other caller's sends are accepted
        await app.send_command(f"parked-{n}", "climate")
    assert running.broker.dispatcher.pending_of("service:fleet-app") == 20
    assert running.broker.refusals["caller_queue_share"] == 1
    # Once some of the rogue's commands finish, it may send again (its unlock counts too).
    for vehicle_id in ("parked-0", "parked-1"):
        for command in await rogue.list_commands(vehicle_id):
            await rogue.cancel_command(command.command_id)

    async def send_again() -> str:
        return await outcome(rogue.send_command("parked-y", "climate"))

    await eventually(send_again, lambda code: code == "OK", what="a send after a cancel")


async def test_a_caller_over_its_rate_is_refused_and_the_other_is_not(
    start_broker: Callable[..., Any],
) -> None:
    running: Running = await start_broker(caller_rate_per_s=1, caller_burst=10)
    rogue, app = service(running, "rogue"), service(running, "fleet-app")
    codes = [await outcome(rogue.send_command("rate-car", "climate")) for _ in range(15)]
    assert codes.count("OK") in (10, 11) and set(codes[11:]) == {"RESOURCE_EXHAUSTED"}
    with pytest.raises(BrokerRpcError) as refused:
        await rogue.send_command("rate-car", "climate")
    assert "send rate" in refused.value.message
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms <= 1000
    assert [await outcome(app.send_command("rate-car", "climate")) for _ in range(10)] == [
        "OK"
    ] * 10
    assert await outcome(rogue.send_command("rate-car", "unlock")) == "OK"  # its own bucket
    assert running.broker.refusals["caller_rate"] >= 4


async def test_a_batch_the_rate_cannot_pay_for_is_refused_whole(
    start_broker: Callable[..., Any],
) -> None:
    running: Running = await start_broker(caller_rate_per_s=1, caller_burst=10)
    rogue, app = service(running, "rogue"), service(running, "fleet-app")
    reply = await rogue.send_commands([build_request("b-car", "climate") for _ in range(6)])
    assert all(item.HasField("accepted") for item in reply.items)
    with pytest.raises(BrokerRpcError) as refused:
        await rogue.send_commands([build_request("b-car", "climate") for _ in range(6)])
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "batch of 6" in refused.value.message
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 1000
    assert running.broker.dispatcher.pending_of("service:rogue") == 6  # nothing of it taken
    reply = await app.send_commands([build_request("b-car", "climate") for _ in range(10)])
    assert all(item.HasField("accepted") for item in reply.items)


async def test_the_critical_quota_is_per_caller_and_car_and_repeats_do_not_spend_it(
    running: Running,
) -> None:
    """The attack: ten deduplicated repeats of one lock spent the car's quota, and the
    owner's lock was refused."""
    rogue, app = service(running, "rogue"), service(running, "fleet-app")
    repeats = [
        await outcome(rogue.send_command("quota-car", "lock", idempotency_key="same"))
        for _ in range(10)
    ]
    assert repeats == ["OK"] * 10
    # One token spent by the ten: nine more new locks, then the rogue's quota is gone.
    flood = [await outcome(rogue.send_command("quota-car", "lock")) for _ in range(10)]
    assert flood == ["OK"] * 9 + ["RESOURCE_EXHAUSTED"]
    assert await outcome(app.send_command("quota-car", "lock")) == "OK"  # the owner's own
    assert running.broker.refusals["vehicle_critical_quota"] == 1


async def test_what_each_caller_holds_is_counted_again_after_a_restart(
    start_broker: Callable[..., Any],
) -> None:
    first: Running = await start_broker()
    for name, count in (("a", 3), ("b", 2)):
        client = service(first, name)
        for n in range(count):
            await client.send_command(f"parked-{n}", "climate")
    await first.close()
    await first.broker.stop(0.2)
    again: Running = await start_broker()  # the same data folder: recovery counts them
    assert again.broker.dispatcher.pending_by_sender == {"service:a": 3, "service:b": 2}


async def test_a_car_that_never_reads_costs_the_outbox_cap_and_gets_everything_later(
    start_broker: Callable[..., Any], cars: Callable[..., Any]
) -> None:
    running: Running = await start_broker(max_outbox_per_car=16)
    raw = RawCar(running.target, "deaf-car")
    await raw.hello(sends_heartbeats=False)
    client = service(running, "fleet-app")
    payload = bytes(16384)
    sent: list[str] = []
    for _ in range(6):  # a message holds at most 1 MiB: 50 of them
        batch = [build_request("deaf-car", "config", payload) for _ in range(50)]
        reply = await client.send_commands(batch)
        sent += [item.accepted.command.command_id for item in reply.items]
    assert len(sent) == 300
    dispatcher = running.broker.dispatcher
    window = running.broker.config.window
    await eventually(lambda: dispatcher.spilled_queues, lambda n: n == 1, what="spilled")
    assert dispatcher.commands_in_memory <= 16 + window  # not 300 x 16 KB
    assert dispatcher.pending_total == 300  # every one durable
    await raw.close()
    agent = await cars(running, "deaf-car", handlers={"config": succeed})
    await eventually(
        lambda: len(agent.executed), lambda n: n >= 300, timeout_s=60, what="all 300 run"
    )
    assert agent.executed == sent  # each once, in order
    await eventually(lambda: dispatcher.pending_total, lambda n: n == 0, what="all finished")


async def test_a_car_reconnecting_in_a_loop_does_not_defer_another_car(
    start_broker: Callable[..., Any], cars: Callable[..., Any]
) -> None:
    running: Running = await start_broker(
        new_streams_per_s=5,
        new_streams_burst=5,
        new_streams_per_vehicle_per_s=0.2,
        new_streams_per_vehicle_burst=3,
    )
    codes = []
    for _ in range(30):
        raw = RawCar(running.target, "looping-car")
        try:
            await raw.hello(sends_heartbeats=False)
            codes.append("OK")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
        finally:
            await raw.close()
    assert codes[:3] == ["OK"] * 3 and set(codes[3:]) == {"UNAVAILABLE"}
    gate = running.broker.stream_gate
    assert gate.deferred == 0 and gate.deferred_vehicle == 27
    started = time.monotonic()
    await cars(running, "other-car")  # at once: the fleet's budget is untouched
    assert time.monotonic() - started < 2
    assert running.broker.refusals["stream_budget_vehicle"] == 27


async def test_watches_are_capped_per_caller(start_broker: Callable[..., Any]) -> None:
    running: Running = await start_broker(max_watches_per_caller=3)
    rogue, app = service(running, "rogue"), service(running, "fleet-app")
    started = asyncio.Event()
    watches = [asyncio.create_task(_watch(rogue, f"w-{n}", started)) for n in range(3)]
    await eventually(lambda: running.broker.callers.watches("service:rogue"), lambda n: n == 3)
    with pytest.raises(BrokerRpcError) as refused:
        await _watch(rogue, "w-4", started)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert "WatchCommands streams open" in refused.value.message
    other = asyncio.create_task(_watch(app, "w-app", started))
    await eventually(lambda: running.broker.callers.watches("service:fleet-app"), lambda n: n == 1)
    watches[0].cancel()
    await asyncio.gather(watches[0], return_exceptions=True)
    await eventually(lambda: running.broker.callers.watches("service:rogue"), lambda n: n == 2)
    again = asyncio.create_task(_watch(rogue, "w-5", started))
    await eventually(lambda: running.broker.callers.watches("service:rogue"), lambda n: n == 3)
    for task in (*watches[1:], other, again):
        task.cancel()
    await asyncio.gather(*watches[1:], other, again, return_exceptions=True)
    assert running.broker.refusals["watch_cap"] == 1


async def _watch(client: BrokerClient, vehicle_id: str, started: asyncio.Event) -> None:
    async for _ in client.watch_commands([vehicle_id]):
        started.set()


async def test_refusals_are_one_metric_family_by_reason(
    start_broker: Callable[..., Any],
) -> None:
    running: Running = await start_broker(
        metrics_listen="127.0.0.1:0", caller_burst=1, caller_rate_per_s=0.01
    )
    rogue = service(running, "rogue")
    await rogue.send_command("m-car", "climate")
    assert await outcome(rogue.send_command("m-car", "climate")) == "RESOURCE_EXHAUSTED"
    samples = await scrape(running.broker.metrics_port)
    assert samples[("broker_refusals_total", (("reason", "caller_rate"),))] == 1
    assert samples[("broker_refusals_total", (("reason", "queue_budget"),))] == 0
    assert samples[("broker_caller_pending_commands", (("caller", "service:rogue"),))] == 1
    assert samples[("broker_dispatch_commands_in_memory", ())] == 0
