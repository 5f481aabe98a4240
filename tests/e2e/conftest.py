"""Fixtures that start real servers: in-process brokers on loopback port 0 with real LMDB in
a temp folder (`start_broker`, `running`, `cars`), and broker subprocesses (`spawn`)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.sdk.vehicle import VehicleAgent, succeed
from broker.server.broker import Broker
from broker.testing import BrokerProcess
from tests.conftest import make_config, session_keys
from tests.e2e.harness import Running


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


@pytest.fixture
async def running(start_broker: Callable[..., Any]) -> Running:
    """A broker with token auth on a loopback port."""
    result: Running = await start_broker()
    return result


@pytest.fixture
async def cars() -> AsyncIterator[Callable[..., Any]]:
    """`await cars(running, "car-1", **agent kwargs)`: a connected VehicleAgent (it
    succeeds at unlock, lock and climate unless given `handlers`), stopped at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def connect(on: Running, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        kwargs.setdefault("handlers", dict.fromkeys(("unlock", "lock", "climate"), succeed))
        agent = on.agent(vehicle_id, **kwargs)
        tasks.append(asyncio.create_task(agent.run()))
        await asyncio.wait_for(agent.connected.wait(), 5)
        return agent

    yield connect
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`spawn(**BrokerProcess kwargs)`: a started broker subprocess, SIGKILLed at teardown.

    It requires tokens signed by the session's keys unless told otherwise (`keys=None`:
    insecure-dev).
    """
    started: list[BrokerProcess] = []
    counter = itertools.count(1)

    def start(data_dir: Path | None = None, **kwargs: Any) -> BrokerProcess:
        kwargs.setdefault("keys", session_keys())
        log_path = tmp_path / f"broker-{next(counter)}.log"
        process = BrokerProcess(data_dir or tmp_path / "data", log_path, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()
        print(f"--- {process.target} logs ---\n{process.logs()}")  # shown when a test fails
