"""Durability across `kill -9`: a real `broker serve` subprocess, real LMDB, token auth.

Every command the broker acknowledged before it was killed must come back after a
restart on the same data folder, and end the way the design says: delivered and executed
exactly once, or EXPIRED if its TTL passed while the broker was down — never run late.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from broker.core.lifecycle import TERMINAL
from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.sdk.vehicle import VehicleAgent
from broker.testing import BrokerProcess
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually, session_keys

# -- helpers ------------------------------------------------------------------------------------


def service_client(target: str) -> BrokerClient:
    return BrokerClient(
        target, token=session_keys().service_token("send", "read", name="crash-test")
    )


class Cars:
    """VehicleAgents on one channel, with handlers that record each payload they run."""

    def __init__(self, target: str, vehicle_ids: Iterable[str], names: Iterable[str]) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.ran: list[tuple[str, int]] = []  # (vehicle_id, payload["n"]) per execution
        self.agents = {
            vid: VehicleAgent(
                target,
                vid,
                token=session_keys().vehicle_token(vid),
                channel=self.channel,
                handlers={n: self._handler(vid) for n in names},
                backoff_base_s=0.05,
                backoff_cap_s=0.3,
            )
            for vid in vehicle_ids
        }
        self.tasks: list[asyncio.Task[None]] = []

    def _handler(self, vehicle_id: str) -> Any:
        async def handle(payload: bytes) -> bool:
            self.ran.append((vehicle_id, json.loads(payload)["n"]))
            return True

        return handle

    async def connect(self, timeout_s: float = 15.0) -> None:
        self.tasks = [asyncio.create_task(a.run()) for a in self.agents.values()]
        waits = [a.connected.wait() for a in self.agents.values()]
        await asyncio.wait_for(asyncio.gather(*waits), timeout_s)

    def executed(self) -> collections.Counter[str]:
        return collections.Counter(cid for a in self.agents.values() for cid in a.executed)

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        for task in self.tasks:
            task.cancel()  # stop() alone does not end a run() stuck in a broken call's read
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)
        await self.channel.close()


@contextlib.asynccontextmanager
async def cars(
    target: str, vehicle_ids: Iterable[str], names: Iterable[str]
) -> AsyncIterator[Cars]:
    fleet = Cars(target, vehicle_ids, names)
    try:
        yield fleet
    finally:
        await fleet.close()


async def commands_of(client: BrokerClient, vehicle_ids: Iterable[str]) -> dict[str, Any]:
    """Every stored command of these vehicles, by id."""
    lists = await asyncio.gather(*(client.list_commands(v, limit=1000) for v in vehicle_ids))
    return {c.command_id: c for commands in lists for c in commands}


async def wait_terminal(
    client: BrokerClient, vehicle_ids: Iterable[str], ids: Iterable[str], timeout_s: float
) -> dict[str, Any]:
    """Every stored command of these vehicles, once each of `ids` is terminal."""
    vehicle_ids, wanted = list(vehicle_ids), set(ids)

    def all_terminal(stored: dict[str, Any]) -> bool:
        done = all(cid in stored and stored[cid].status in TERMINAL for cid in wanted)
        assert done, status_counts(stored, wanted)  # what `eventually` shows if it times out
        return done

    return await eventually(
        lambda: commands_of(client, vehicle_ids),
        all_terminal,
        timeout_s=timeout_s,
        interval_s=0.1,
        what=f"{len(wanted)} commands terminal",
    )


def status_counts(stored: Mapping[str, Any], ids: Iterable[str]) -> dict[str, int]:
    """How many of `ids` are in each status ("MISSING" when not stored at all)."""
    return dict(
        collections.Counter(
            t.CommandStatus.Name(stored[c].status) if c in stored else "MISSING" for c in ids
        )
    )


async def _counts_of(
    client: BrokerClient, vehicle_ids: Iterable[str], ids: Iterable[str]
) -> dict[str, int]:
    return status_counts(await commands_of(client, vehicle_ids), ids)


# -- the tests ------------------------------------------------------------------------------------

N_COMMANDS = 1000
N_VEHICLES = 50
IN_FLIGHT = 64
NAMES = ("unlock", "lock", "climate", "horn")


async def test_every_acknowledged_command_survives_kill_9_and_runs_exactly_once(
    spawn: Callable[..., BrokerProcess],
) -> None:
    # 20 commands a car, half critical: past the per-car critical quota, which is not
    # what this test is about.
    env = {"BROKER_CRITICAL_PER_MINUTE": "1000"}
    first = spawn(env=env)
    vehicles = [f"crash-{i}" for i in range(N_VEHICLES)]
    acked: dict[str, int] = {}  # command_id -> n, for every SendCommand that answered
    numbers = itertools.count()
    killed = False

    async def sender(client: BrokerClient) -> None:
        nonlocal killed
        while not killed:
            n = next(numbers)
            try:
                reply = await client.send_command(
                    vehicles[n % N_VEHICLES], NAMES[n % len(NAMES)], {"n": n}, ttl_s=3600
                )
            except BrokerRpcError as exc:
                assert killed, f"send failed before the kill: {exc}"
                return
            assert reply.command.status == t.QUEUED  # acknowledged == durable
            acked[reply.command.command_id] = n
            if len(acked) >= N_COMMANDS and not killed:
                killed = True
                os.kill(first.pid, signal.SIGKILL)  # right after the ack, others in flight

    async with service_client(first.target) as client:
        await asyncio.wait_for(asyncio.gather(*(sender(client) for _ in range(IN_FLIGHT))), 60)
    first.kill()
    assert len(acked) >= N_COMMANDS
    sent = next(numbers)  # every n the test used is below this

    second = spawn(env=env)
    async with service_client(second.target) as client:
        recovered = await commands_of(client, vehicles)
        lost = set(acked) - set(recovered)
        assert not lost, f"{len(lost)} acknowledged commands lost after kill -9"
        for command_id, n in acked.items():
            command = recovered[command_id]
            assert (command.status, command.attempt) == (t.QUEUED, 0), command
            assert json.loads(command.payload) == {"n": n}
            assert command.vehicle_id == vehicles[n % N_VEHICLES]
            assert command.name == NAMES[n % len(NAMES)]
        # Anything else recovered was accepted but its answer was cut by the kill: fine,
        # but it must be a command the test sent.
        assert all(json.loads(c.payload)["n"] < sent for c in recovered.values())

        async with cars(second.target, vehicles, NAMES) as fleet:
            await fleet.connect()
            final = await wait_terminal(client, vehicles, recovered, timeout_s=30)
            executed = fleet.executed()
            ran = list(fleet.ran)

    assert status_counts(final, recovered) == {"SUCCEEDED": len(recovered)}
    assert all(final[cid].attempt == 1 for cid in recovered)
    twice = {cid: k for cid, k in executed.items() if k > 1}
    assert not twice, f"executed more than once: {twice}"
    assert set(executed) == set(recovered)
    assert sorted(ran) == sorted(
        (c.vehicle_id, json.loads(c.payload)["n"]) for c in recovered.values()
    )
    # Recovery keeps each car's queue order: higher lane first, then FIFO.
    for agent in fleet.agents.values():
        order = [recovered[cid] for cid in agent.executed]
        assert order == sorted(order, key=lambda c: (-c.lane, c.seq)), agent.vehicle_id


async def test_commands_whose_ttl_passes_while_down_expire_and_never_run(
    spawn: Callable[..., BrokerProcess],
) -> None:
    first = spawn()
    vehicles = [f"ttl-{i}" for i in range(5)]
    async with service_client(first.target) as client:
        short = [
            await client.send_command(v, "unlock", {"n": i}, ttl_s=1.0)
            for i, v in enumerate(vehicles * 4)
        ]
        long = [await client.send_command(v, "unlock", {"n": -1}, ttl_s=3600) for v in vehicles]
    first.kill()
    short_ids = {r.command.command_id for r in short}
    long_ids = {r.command.command_id for r in long}
    latest_expiry_s = max(r.command.expires_at_ms for r in short) / 1000
    # The TTLs must pass while no broker runs: a duration, with nothing to observe meanwhile.
    await asyncio.sleep(max(0.0, latest_expiry_s - time.time()) + 0.2)

    second = spawn()
    async with service_client(second.target) as client:
        recovered = await commands_of(client, vehicles)
        assert status_counts(recovered, short_ids) == {"EXPIRED": len(short_ids)}
        assert all(recovered[c].status_reason == "expired before delivery" for c in short_ids)
        assert status_counts(recovered, long_ids) == {"QUEUED": len(long_ids)}

        async with cars(second.target, vehicles, ["unlock"]) as fleet:
            await fleet.connect()
            final = await wait_terminal(client, vehicles, long_ids, timeout_s=15)
            executed = fleet.executed()

    assert status_counts(final, long_ids) == {"SUCCEEDED": len(long_ids)}
    assert status_counts(final, short_ids) == {"EXPIRED": len(short_ids)}
    assert not short_ids & set(executed), "an expired command reached a car"
    assert executed == collections.Counter(long_ids)


async def test_commands_delivered_but_unacked_at_kill_9_are_resent_with_next_attempt(
    spawn: Callable[..., BrokerProcess],
) -> None:
    first = spawn()
    vehicles = [f"unacked-{i}" for i in range(3)]
    async with (
        service_client(first.target) as client,
        grpc.aio.insecure_channel(first.target) as channel,
    ):
        sent = [
            await client.send_command(v, "unlock", {"n": i}, ttl_s=3600)
            for i, v in enumerate(vehicles)
        ]
        ids = {r.command.command_id for r in sent}
        streams = []
        for vehicle_id in vehicles:  # a car that receives its command and dies before acking
            stream = channel.stream_stream(
                "/broker.v1.VehicleLink/Connect",
                request_serializer=link.VehicleFrame.SerializeToString,
                response_deserializer=link.BrokerFrame.FromString,
            )(metadata=[("authorization", f"Bearer {session_keys().vehicle_token(vehicle_id)}")])
            streams.append(stream)
            await stream.write(link.VehicleFrame(hello=link.Hello(firmware="raw")))
            assert (await asyncio.wait_for(stream.read(), 5)).HasField("welcome")
            frame = await asyncio.wait_for(stream.read(), 5)
            assert (frame.command.command_id in ids, frame.command.attempt) == (True, 1)
        await eventually(
            lambda: _counts_of(client, vehicles, ids),
            lambda counts: counts == {"DELIVERED": len(ids)},
            what="every delivery recorded",
        )
        first.kill()
        for stream in streams:
            stream.cancel()

    second = spawn()
    async with service_client(second.target) as client:
        assert status_counts(await commands_of(client, vehicles), ids) == {"QUEUED": len(ids)}
        async with cars(second.target, vehicles, ["unlock"]) as fleet:
            await fleet.connect()
            final = await wait_terminal(client, vehicles, ids, timeout_s=15)
            executed = fleet.executed()

    assert status_counts(final, ids) == {"SUCCEEDED": len(ids)}
    assert {final[cid].attempt for cid in ids} == {2}
    assert executed == collections.Counter(ids)


async def test_commands_in_flight_at_kill_9_finish_once_after_restart(
    spawn: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    # A short result timeout so the failure mode (UNKNOWN) shows quickly.
    config = tmp_path / "broker.toml"
    config.write_text("[commands.unlock]\nresult_timeout_s = 5\n")
    first = spawn(args=["--config", str(config)])
    vehicles = [f"flight-{i}" for i in range(5)]
    release = asyncio.Event()

    async def slow_unlock(payload: bytes) -> bool:
        await release.wait()
        return True

    async with service_client(first.target) as client, cars(first.target, vehicles, []) as fleet:
        for agent in fleet.agents.values():
            agent.handlers["unlock"] = slow_unlock
        await fleet.connect()
        sent = [await client.send_command(v, "unlock", ttl_s=3600) for v in vehicles]
        ids = {r.command.command_id for r in sent}
        await eventually(
            lambda: _counts_of(client, vehicles, ids),
            lambda counts: counts == {"ACKED": len(ids)},
            what="every car's ack recorded",
        )
        first.kill()  # delivered and acked, result not yet recorded
        release.set()  # the cars finish; their results have no stream to go to
        second = spawn(port=first.port, args=["--config", str(config)])
        async with service_client(second.target) as client2:
            final = await wait_terminal(client2, vehicles, ids, timeout_s=15)
        executed = fleet.executed()
        reconnected = all(a.connects >= 2 for a in fleet.agents.values())

    assert reconnected
    assert executed == collections.Counter(ids), "a command ran twice, or not at all"
    assert status_counts(final, ids) == {"SUCCEEDED": len(ids)}
