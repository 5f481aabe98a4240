"""The domain's test desk: `Commands` over the in-memory store, and a request helper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.admission import Admission, Gradient2Limit
from broker.core.commands import Commands
from broker.core.dispatch import Dispatcher
from broker.core.events import EventHub
from broker.core.sessions import SessionRegistry
from broker.core.state import VehicleStates
from broker.storage.memory import MemoryStore
from broker.v1 import command_service_pb2 as svc
from tests.conftest import make_config


class Desk:
    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.config = make_config(tmp_path, **overrides)
        self.store = MemoryStore()
        self.sessions = SessionRegistry()
        self.events = EventHub()
        self.dispatcher = Dispatcher(self.store, self.sessions, self.events, self.config)
        self.admission = Admission(Gradient2Limit(initial_limit=64))
        self.commands = Commands(
            self.config,
            self.store,
            self.dispatcher,
            self.events,
            VehicleStates(self.store, self.sessions, max_fields=16),
            self.admission,
        )


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    built = Desk(tmp_path)
    built.store.start(asyncio.get_running_loop())
    yield built
    await built.store.close()


def request(**fields: Any) -> svc.SendCommandRequest:
    fields.setdefault("vehicle_id", "car-1")
    fields.setdefault("name", "unlock")
    return svc.SendCommandRequest(**fields)
