"""Shared fixtures: real brokers on loopback port 0 with real LMDB in a temp folder."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings

from broker.config import Config
from broker.sdk.client import BrokerClient
from broker.sdk.simulator import SimulatedFleet
from broker.sdk.vehicle import VehicleAgent
from broker.security.auth import issue_token
from broker.server.broker import Broker

# A 2-core CI machine running e2e brokers next to property tests: time per example is
# not what these tests check, so no per-example deadline.
settings.register_profile("broker", deadline=None)
settings.load_profile("broker")

SECRET = "test-secret-0123456789abcdef"
T = TypeVar("T")


def make_config(data_dir: Path, **overrides: Any) -> Config:
    base = Config(
        listen="127.0.0.1:0", data_dir=data_dir, auth_secret=SECRET, grace_s=0.5, drain_delay_s=0
    )
    config = dataclasses.replace(base, **overrides)
    config.validate()
    return config


class Running:
    """A started broker plus helpers to reach it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.target = f"127.0.0.1:{broker.port}"
        self._closers: list[Any] = []

    def service_token(self, *scopes: str) -> str:
        return issue_token(SECRET, service="tests", scopes=scopes or ("send", "read"))

    def client(self, *scopes: str, token: str | None = None) -> BrokerClient:
        client = BrokerClient(
            self.target, token=self.service_token(*scopes) if token is None else token
        )
        self._closers.append(client.close)
        return client

    def agent(self, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        kwargs.setdefault("token", issue_token(SECRET, vehicle=vehicle_id))
        kwargs.setdefault("backoff_base_s", 0.05)
        kwargs.setdefault("backoff_cap_s", 0.5)
        agent = VehicleAgent(self.target, vehicle_id, **kwargs)
        self._closers.append(agent.stop)
        return agent

    def fleet(self, vehicle_ids: list[str], **kwargs: Any) -> SimulatedFleet:
        fleet = SimulatedFleet(self.target, vehicle_ids, secret=SECRET, **kwargs)
        self._closers.append(fleet.stop)
        return fleet

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


@pytest.fixture
async def start_broker(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await start_broker(**config_overrides)`: a running broker, stopped at teardown."""
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        overrides.setdefault("data_dir", tmp_path / "data")
        broker = Broker(make_config(**overrides))
        await broker.start()
        running = Running(broker)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.close()
        await running.broker.stop(0.2)


async def _succeed(payload: bytes) -> bool:
    return True


@pytest.fixture
async def cars() -> AsyncIterator[Callable[..., Any]]:
    """`await cars(running, "car-1", **agent kwargs)`: a connected VehicleAgent (it
    succeeds at unlock, lock and climate unless given `handlers`), stopped at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def connect(on: Running, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        kwargs.setdefault("handlers", dict.fromkeys(("unlock", "lock", "climate"), _succeed))
        agent = on.agent(vehicle_id, **kwargs)
        tasks.append(asyncio.create_task(agent.run()))
        await asyncio.wait_for(agent.connected.wait(), 5)
        return agent

    yield connect
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def running(start_broker: Callable[..., Any]) -> Running:
    """A broker with token auth on a loopback port."""
    result: Running = await start_broker()
    return result


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], object] = bool,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    what: str = "the condition",
) -> T:
    """Poll `probe()` until `accept(value)` holds; fail loudly with the last value seen."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s}s; last seen: {value!r}")
        await asyncio.sleep(interval_s)
