"""The vehicle stream protocol without a server: frames in, actions out.

Inbound frames go through `VehicleStream.received` and reach a real dispatcher over the
in-memory store; outbound, `to_record` and `outgoing` decide what is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.clock import now_ms
from broker.core.dispatch import Dispatcher
from broker.core.errors import InvalidArgument
from broker.core.events import EventHub
from broker.core.sessions import CLOSE, CommandOut, SessionRegistry, StreamGate
from broker.core.state import VehicleStates
from broker.core.store import NewCommand
from broker.core.stream import (
    DRAIN,
    HEARTBEAT,
    Links,
    VehicleStream,
    parse_hello,
    telemetry_control,
)
from broker.core.telemetry import TelemetryGuard
from broker.storage.memory import MemoryStore
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually, make_config


class Parts:
    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.config = make_config(tmp_path, **overrides)
        self.store = MemoryStore()
        self.sessions = SessionRegistry()
        self.events = EventHub()
        self.dispatcher = Dispatcher(self.store, self.sessions, self.events, self.config)
        self.states = VehicleStates(self.store, self.sessions, max_fields=256)
        self.guard = TelemetryGuard(
            car_msgs_per_s=2,
            car_bytes_per_s=4096,
            fleet_msgs_per_s=5000,
            fleet_bytes_per_s=4_000_000,
            hold_s=30,
            max_signals_per_car=256,
        )
        self.links = Links(
            self.config, self.dispatcher, self.guard, self.states, StreamGate(1000, 1000)
        )

    async def open(self, vehicle_id: str, **hello: Any) -> VehicleStream:
        frame = link.VehicleFrame(hello=link.Hello(**hello)).SerializeToString()
        parsed = parse_hello(frame)
        stream, welcome = await self.links.open(vehicle_id, parsed)
        assert welcome.welcome.session_id == stream.session.session_id
        assert welcome.welcome.window == self.config.window
        self.links.connected(stream, parsed)
        return stream

    async def send(self, vehicle_id: str, name: str = "unlock") -> t.Command:
        item = NewCommand(vehicle_id=vehicle_id, name=name, payload=b"{}", lane=t.CRITICAL,
                          ttl_ms=60_000)  # fmt: skip
        (created,) = await self.dispatcher.submit([item])
        assert not isinstance(created, Exception)
        return created.command


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    built = Parts(tmp_path)
    built.store.start(asyncio.get_running_loop())
    yield built
    await built.store.close()


def frame(**kind: Any) -> bytes:
    return link.VehicleFrame(**kind).SerializeToString()


async def written(stream: VehicleStream, links: Links) -> list[link.BrokerFrame | None]:
    """One turn of the writer: take the outbox, record, and list what goes out."""
    batch = await stream.session.outbox.take(64)
    to_record = stream.to_record(batch)
    attempts = await links.deliver(stream.session, to_record) if to_record else {}
    return list(stream.outgoing(batch, attempts))


def test_the_first_frame_must_be_hello() -> None:
    assert parse_hello(frame(hello=link.Hello(firmware="1.2"))).firmware == "1.2"
    with pytest.raises(InvalidArgument, match="must be Hello"):
        parse_hello(HEARTBEAT)
    with pytest.raises(InvalidArgument, match="malformed VehicleFrame"):
        parse_hello(b"\xff\xff\xff")
    with pytest.raises(InvalidArgument, match="firmware is longer than 128"):
        parse_hello(frame(hello=link.Hello(firmware="x" * 129)))
    with pytest.raises(InvalidArgument, match="at most 64 names"):
        parse_hello(frame(hello=link.Hello(capabilities=["c"] * 65)))


async def test_a_command_goes_out_once_recorded_and_its_ack_and_result_are_taken(
    parts: Parts,
) -> None:
    stream = await parts.open("car-1")
    command = await parts.send("car-1")
    # Created DELIVERED (the window was free) or ACCEPTED (the car's queue was still
    # loading): either way it goes out as attempt 1, recorded before it is written.
    assert command.status in (t.DELIVERED, t.ACCEPTED)
    (out,) = await written(stream, parts.links)
    assert out is not None and out.command.command_id == command.command_id
    assert out.command.attempt == 1
    assert stream.received(frame(ack=link.CommandAck(command_id=command.command_id))) == 0.0
    await eventually(
        lambda: parts.dispatcher.current("car-1", command.command_id).status == t.ACKED
    )
    result = link.CommandResult(command_id=command.command_id, success=True, message="ok")
    stream.received(frame(result=result))

    async def settled() -> bool:
        return (await parts.store.get(command.command_id)).status == t.SUCCEEDED

    await eventually(settled)


async def test_a_queued_command_is_recorded_before_it_is_written(parts: Parts) -> None:
    offline = [await parts.send("car-2") for _ in range(2)]
    assert all(c.status == t.QUEUED for c in offline)
    stream = await parts.open("car-2")
    batch = await stream.session.outbox.take(64)
    to_record = stream.to_record(batch)
    assert [o.command.command_id for o in to_record] == [c.command_id for c in offline]
    attempts = await parts.links.deliver(stream.session, to_record)
    frames = list(stream.outgoing(batch, attempts))
    assert [f.command.command_id for f in frames if f is not None] == [
        c.command_id for c in offline
    ]
    assert [(await parts.store.get(c.command_id)).status for c in offline] == [t.DELIVERED] * 2


def test_outgoing_never_writes_an_expired_or_unrecorded_command_and_stops_at_close() -> None:
    now = now_ms()
    live = t.Command(command_id="a", name="unlock", expires_at_ms=now + 60_000)
    expired = t.Command(command_id="b", name="unlock", expires_at_ms=now - 1)
    refused = t.Command(command_id="c", name="unlock", expires_at_ms=now + 60_000)
    control = telemetry_control(
        TelemetryGuard(
            car_msgs_per_s=2, car_bytes_per_s=4096, fleet_msgs_per_s=10, fleet_bytes_per_s=1e6,
            hold_s=30, max_signals_per_car=8,
        ).welcome_policy("x", 0.0)
    )  # fmt: skip
    batch: list[object] = [
        CommandOut(live, 1, recorded=False),
        control,
        CommandOut(expired, 1, recorded=True),
        CommandOut(refused, 1, recorded=False),
        CLOSE,
        DRAIN,
    ]
    assert [o.command.command_id for o in VehicleStream.to_record(batch)] == ["a", "c"]
    frames = list(VehicleStream.outgoing(batch, {"a": 3}, now=now))
    assert frames[0] is not None and frames[0].command.attempt == 3  # the recorded attempt
    assert frames[1] is control
    assert frames[2:] == [None]  # b expired, c refused by the store, nothing after CLOSE


async def test_protocol_errors_end_the_stream_with_invalid_argument(parts: Parts) -> None:
    stream = await parts.open("car-3")
    for bad, match in (
        (frame(hello=link.Hello()), "only allowed as the first frame"),
        (b"", "empty or unknown"),
        (b"\x0a\xff", "malformed"),
        (frame(ack=link.CommandAck(command_id="no spaces allowed")), "command_id"),
        (
            frame(result=link.CommandResult(command_id="x", message="m" * 1025)),
            "too large",
        ),
    ):
        with pytest.raises(InvalidArgument, match=match):
            stream.received(bad)


async def test_heartbeats_are_heard_and_telemetry_over_budget_is_read_slower(
    parts: Parts,
) -> None:
    stream = await parts.open("car-4", sends_heartbeats=True)
    stream.session.last_heard_s = 0.0
    assert stream.received(HEARTBEAT) == 0.0
    assert stream.session.last_heard_s > 0
    batch = frame(
        telemetry=link.TelemetryBatch(
            signals=[link.Signal(name="speed", value=t.Value(number=1.0))]
        )
    )
    pauses = [stream.received(batch) for _ in range(50)]  # budget: 2 a second, burst small
    assert pauses[0] == 0.0
    assert any(p > 0 for p in pauses)
    assert parts.guard.counters.offered_msgs == 50


async def test_closing_requeues_what_the_car_never_acknowledged(parts: Parts) -> None:
    stream = await parts.open("car-5")
    command = await parts.send("car-5")
    await written(stream, parts.links)
    stream.session.close()
    await parts.links.close(stream)

    async def requeued() -> bool:
        return (await parts.store.get(command.command_id)).status == t.QUEUED

    await eventually(requeued)
    again = await parts.open("car-5")
    (out,) = await written(again, parts.links)
    assert out is not None and out.command.attempt == 2
