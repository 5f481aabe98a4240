"""The Prometheus endpoint reports what the broker did."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import eventually
from tests.e2e.harness import scrape


async def test_metrics_count_outcomes_queue_depth_and_streams(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(metrics_listen="127.0.0.1:0")
    port = running.broker.metrics_port
    assert port > 0
    client = running.client()
    for vehicle in ("m-1", "m-2", "m-3"):
        await client.send_command(vehicle, "climate")
    agent = running.agent("m-4")
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 5)
    samples = await scrape(port)
    assert samples[("broker_durable_queue_depth", ())] == 3
    assert samples[("broker_vehicle_streams", ())] == 1
    # m-4's (empty) queue is in memory only while it loads; the parked cars' never are.
    await eventually(
        lambda: running.broker.dispatcher.queues_in_memory == 0,
        interval_s=0.01,
        what="m-4's loaded (empty) queue gone from memory",
    )
    samples = await scrape(port)
    assert samples[("broker_durable_queue_in_memory_vehicles", ())] == 0
    assert samples[("broker_command_status_changes_total", (("status", "QUEUED"),))] == 3
    assert samples[("broker_store_operations_total", ())] >= 3
    assert samples[("broker_store_room_bytes", ())] > samples[("broker_store_reserve_bytes", ())]
    for counter in (
        "broker_store_space_refusals_total",
        "broker_commands_abandoned_total",
        "broker_vehicle_streams_dead_total",
    ):
        assert samples[(counter, ())] == 0
    assert abs(samples[("broker_clock_wall_offset_ms", ())]) < 60_000
    await client.cancel_command((await client.list_commands("m-1"))[0].command_id)
    samples = await scrape(port)
    assert samples[("broker_durable_queue_depth", ())] == 2
    assert samples[("broker_command_status_changes_total", (("status", "CANCELED"),))] == 1
    task.cancel()
