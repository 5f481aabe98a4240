"""What e2e tests import: a started in-process broker (`Running`) and waits on its commands.

The fixtures that start brokers are in tests/e2e/conftest.py.
"""

from __future__ import annotations

from typing import Any

from broker.sdk.client import BrokerClient
from broker.sdk.simulator import SimulatedFleet
from broker.sdk.vehicle import VehicleAgent
from broker.server.broker import Broker
from broker.v1 import types_pb2 as t
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
