"""Telemetry through a real broker: the guard tells, coalesces and sheds; the SDK obeys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from broker.core.clock import now_ms
from broker.sdk.vehicle import VehicleAgent, signals, succeed
from broker.v1 import types_pb2 as t
from tests.conftest import eventually


async def _connected(running: Any, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
    agent: VehicleAgent = running.agent(vehicle_id, handlers={"unlock": succeed}, **kwargs)
    asyncio.create_task(agent.run())  # noqa: RUF006 - stopped by the fixture's closers
    await asyncio.wait_for(agent.connected.wait(), 5)
    return agent


async def test_a_flooding_car_is_told_and_shed_while_others_are_unharmed(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(state_flush_interval_s=0.1)
    rogue = await _connected(running, "rogue", obey_policy=False)
    calm = await _connected(running, "calm")
    assert rogue.telemetry_policy.interval_ms == 1000  # the Welcome carried the policy
    for index in range(300):
        await rogue.send_telemetry(signals({"speed": index, "diag": "x" * 200}, now_ms()))
    await eventually(lambda: rogue.policy_changes, what="the rogue told a new policy")
    assert rogue.policy_changes >= 1
    assert rogue.telemetry_policy.interval_ms > 1000
    counters = running.broker.telemetry.counters
    assert counters.sampled_out_msgs + counters.shed_msgs > 0
    # Still flooding after being told: the broker stops reading that stream for a while,
    # so most of the flood waits in flow control instead of costing broker CPU.
    assert counters.shed_msgs >= 1 and counters.offered_msgs < 300
    await calm.send_telemetry(signals({"speed": 42}, now_ms()))
    client = running.client()
    reply = await client.send_command("calm", "unlock", wait="result", timeout_s=5)
    assert reply.command.status == t.SUCCEEDED
    await eventually(
        lambda: client.get_vehicle_state("calm"),
        lambda state: state.fields["speed"].value.number == 42,
        what="the calm car's speed stored",
    )
    # The rogue's latest value still lands (coalesced or admitted), never a stale one.
    await eventually(
        lambda: client.get_vehicle_state("rogue"),
        lambda state: state.fields["speed"].value.number > 0,
        what="the rogue's latest speed stored",
    )


async def test_the_sdk_sends_at_most_one_batch_per_interval_and_keeps_the_latest(
    start_broker: Callable[..., Any],
) -> None:
    running = await start_broker(state_flush_interval_s=0.1)
    agent = await _connected(running, "polite")
    sent = 0
    for index in range(50):
        sent += await agent.send_telemetry(signals({"speed": index}, now_ms()))
    assert sent == 1  # the first; the rest wait for the policy's interval
    # Deliberately let the interval pass: what is tested is that the SDK sends once it has.
    await asyncio.sleep(agent.telemetry_policy.interval_ms / 1000 + 0.05)
    assert await agent.send_telemetry(signals({"odometer": 7}, now_ms()))
    client = running.client()
    state = await eventually(
        lambda: client.get_vehicle_state("polite"),
        lambda state: "odometer" in state.fields,
        what="the second batch stored",
    )
    assert state.fields["speed"].value.number == 49  # coalesced: the latest value went out
    assert state.fields["odometer"].value.number == 7
    assert running.broker.telemetry.counters.offered_msgs == 2
