"""What e2e tests import: a started in-process broker (`Running`) and waits on its commands.

The fixtures that start brokers are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.sdk.client import BrokerClient
from broker.sdk.simulator import SimulatedFleet
from broker.sdk.vehicle import VehicleAgent
from broker.server.broker import Broker
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually, session_keys

#: statuses a command passes through on its way to an outcome
IN_PROGRESS = frozenset({t.ACCEPTED, t.QUEUED, t.DELIVERED, t.ACKED})


class Running:
    """A started broker plus helpers to reach it; what they open is closed by `close()`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.target = f"127.0.0.1:{broker.port}"
        self._closers: list[Any] = []

    def service_token(self, *scopes: str, **kwargs: Any) -> str:
        """A token of service "tests" with `scopes` (default: send, read); `issue_token`
        keywords (`ttl_s`, `token_id`, ...) apply."""
        return session_keys().service_token(*scopes, **kwargs)

    def client(self, *scopes: str, token: str | None = None) -> BrokerClient:
        client = BrokerClient(
            self.target, token=self.service_token(*scopes) if token is None else token
        )
        self._closers.append(client.close)
        return client

    def agent(self, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        kwargs.setdefault("token", session_keys().vehicle_token(vehicle_id))
        kwargs.setdefault("backoff_base_s", 0.05)
        kwargs.setdefault("backoff_cap_s", 0.5)
        agent = VehicleAgent(self.target, vehicle_id, **kwargs)
        self._closers.append(agent.stop)
        return agent

    def fleet(self, vehicle_ids: list[str], **kwargs: Any) -> SimulatedFleet:
        fleet = SimulatedFleet(
            self.target, vehicle_ids, vehicle_key=session_keys().vehicle_key, **kwargs
        )
        self._closers.append(fleet.stop)
        return fleet

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


async def status_reached(client: BrokerClient, command_id: str, wanted: int, **kwargs: Any) -> Any:
    """The command once its stored status is `wanted` (`eventually` keywords apply)."""
    return await eventually(
        lambda: client.get_command(command_id),
        lambda command: command.status == wanted,
        what=f"{command_id} reaching {t.CommandStatus.Name(wanted)}",
        **kwargs,
    )


async def settled(client: BrokerClient, command_id: str, **kwargs: Any) -> Any:
    """The command once its stored status is an outcome (`eventually` keywords apply)."""
    return await eventually(
        lambda: client.get_command(command_id),
        lambda command: command.status not in IN_PROGRESS,
        what=f"{command_id} reaching an outcome",
        **kwargs,
    )


class RawCar:
    """A car written against the bare protocol: Hello, Welcome, then nothing unless told.

    It reads no frame after the Welcome, so a command the broker writes to it is on the
    wire but never reaches the car's logic: what a link that died mid-frame leaves, or a
    car that does not read."""

    def __init__(self, target: str, vehicle_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        token = session_keys().vehicle_token(vehicle_id)
        self.call: Any = self.channel.stream_stream(
            "/broker.v1.VehicleLink/Connect",
            request_serializer=link.VehicleFrame.SerializeToString,
            response_deserializer=link.BrokerFrame.FromString,
        )(metadata=(("authorization", f"Bearer {token}"),))

    async def hello(self, *, sends_heartbeats: bool = True) -> Any:
        hello = link.Hello(firmware="raw", sends_heartbeats=sends_heartbeats)
        await self.call.write(link.VehicleFrame(hello=hello))
        frame = await self.call.read()
        if frame is grpc.aio.EOF:
            await self.call  # raises with the stream's status
        assert frame.WhichOneof("kind") == "welcome"
        return frame.welcome

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The broker's /metrics on `port`: (sample name, sorted labels) -> value."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
