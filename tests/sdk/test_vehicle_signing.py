"""The car SDK with a CommandVerifier, fed crafted frames by a fake VehicleLink relay (a
broker that tampers: it can put anything in a frame, but holds no signing key)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.core.clock import now_ms
from broker.sdk.vehicle import HandlerResult, VehicleAgent
from broker.security.keys import key_id
from broker.security.signing import CommandSigner, CommandVerifier
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually

SENDER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
FAR_MS = 10**13  # the frame's own (unsigned) expiry: far away unless a test says otherwise


class FakeLink:
    """A VehicleLink server that welcomes each stream, writes the frames it is given and
    records every result the car sends."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.results: list[Any] = []
        self.hellos: list[Any] = []
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            self._connect,
            request_deserializer=link.VehicleFrame.FromString,
            response_serializer=link.BrokerFrame.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("broker.v1.VehicleLink", {"Connect": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _connect(self, requests: Any, context: Any) -> None:
        self.hellos.append((await context.read()).hello)
        await context.write(
            link.BrokerFrame(welcome=link.Welcome(session_id="s", server_time_ms=now_ms()))
        )
        reader = asyncio.ensure_future(self._read(context))
        try:
            while True:
                frame = await self.outbox.get()
                if frame is None:  # end this stream (the car reconnects)
                    return
                await context.write(link.BrokerFrame(command=frame))
        finally:
            reader.cancel()

    async def _read(self, context: Any) -> None:
        while True:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                return
            if frame.WhichOneof("kind") == "result":
                self.results.append(frame.result)

    async def result(self, command_id: str, count: int = 1) -> Any:
        """The `count`th result the car sent for `command_id`."""
        found = await eventually(
            lambda: [r for r in self.results if r.command_id == command_id],
            lambda rs: len(rs) >= count,
            timeout_s=5,
            what=f"result {count} of {command_id}",
        )
        return found[count - 1]


@pytest.fixture
async def relay() -> AsyncIterator[FakeLink]:
    fake = FakeLink()
    await fake.server.start()
    yield fake
    await fake.server.stop(0)


class Car:
    """A VehicleAgent with a verifier on the fake relay, and what its handlers were given."""

    def __init__(self, agent: VehicleAgent) -> None:
        self.agent = agent
        self.calls: list[tuple[str, bytes]] = []


@pytest.fixture
async def car(relay: FakeLink) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[asyncio.Task[None]] = []
    agents: list[VehicleAgent] = []

    async def start(**kwargs: Any) -> Car:
        verifier_kwargs = kwargs.pop("verifier_kwargs", {})
        verifier = CommandVerifier(
            {key_id(SENDER.public_key()): (SENDER.public_key(), None)}, **verifier_kwargs
        )
        holder: list[Car] = []

        def handler(name: str) -> Any:
            async def handle(payload: bytes) -> HandlerResult:
                holder[0].calls.append((name, payload))
                return True, f"{name} done", b""

            return handle

        agent = VehicleAgent(
            f"127.0.0.1:{relay.port}",
            "car-1",
            handlers={name: handler(name) for name in ("unlock", "lock")},
            verifier=verifier,
            backoff_base_s=0.02,
            backoff_cap_s=0.1,
            ack_delay_s=0,
            **kwargs,
        )
        holder.append(Car(agent))
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run()))
        await asyncio.wait_for(agent.connected.wait(), 5)
        return holder[0]

    yield start
    for agent in agents:
        await agent.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def signed_frame(
    vehicle_id: str = "car-1",
    name: str = "unlock",
    payload: bytes = b'{"door":"all"}',
    *,
    key: Ed25519PrivateKey = SENDER,
    command_id: str | None = None,
    ttl_s: float = 30,
) -> Any:
    envelope = CommandSigner(key).sign(
        vehicle_id, name, payload, ttl_s=ttl_s, command_id=command_id
    )
    body = t.CommandBody.FromString(envelope.body)
    return link.CommandFrame(
        command_id=body.command_id,
        name=name,
        payload=payload,
        attempt=1,
        expires_at_ms=FAR_MS,
        issued_at_ms=body.issued_at_ms,
        signed=envelope,
    )


async def test_an_honest_signed_command_runs_the_bodys_name_and_payload(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    one: Car = await car()
    frame = signed_frame()
    frame.name, frame.payload = "lock", b"evil"  # the unsigned copies, tampered
    await relay.outbox.put(frame)
    result = await relay.result(frame.command_id)
    assert (result.success, result.message) == (True, "unlock done")
    assert one.calls == [("unlock", b'{"door":"all"}')]
    assert one.agent.executed == [frame.command_id]


def _altered(frame: Any, **changes: Any) -> Any:
    body = t.CommandBody.FromString(frame.signed.body)
    for name, value in changes.items():
        setattr(body, name, value)
    frame.signed.body = body.SerializeToString()  # the signature stays the sender's
    return frame


def _unsigned() -> Any:
    frame = signed_frame()
    frame.ClearField("signed")
    return frame


def _new_id_old_envelope() -> Any:
    frame = signed_frame()
    frame.command_id = "another-id"
    return frame


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_unsigned, "unsigned: this car requires a signature for 'unlock'"),
        (lambda: _altered(signed_frame(), payload=b'{"door":"trunk"}'), "bad signature"),
        (lambda: _altered(signed_frame(), vehicle_id="car-1", name="lock"), "bad signature"),
        (lambda: _altered(signed_frame(), expires_at_ms=FAR_MS), "bad signature"),  # re-dated
        (lambda: signed_frame("car-2"), "signed for vehicle 'car-2', not this one ('car-1')"),
        (lambda: signed_frame(key=STRANGER), "unknown signing key"),
        (_new_id_old_envelope, "command id mismatch"),
    ],
)
async def test_tampered_frames_are_refused_and_never_run(
    relay: FakeLink, car: Callable[..., Any], tamper: Callable[[], Any], reason: str
) -> None:
    one: Car = await car()
    frame = tamper()
    await relay.outbox.put(frame)
    result = await relay.result(frame.command_id)
    assert result.success is False
    assert result.message.startswith(f"refused: {reason}"), result.message
    assert one.calls == [] and one.agent.executed == []
    assert [cid for cid, _ in one.agent.refused] == [frame.command_id]


async def test_the_cars_clock_decides_expiry_whatever_the_frame_says(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    # The broker held it back past its signed expiry (the frame claims it is still good).
    one: Car = await car(verifier_kwargs={"clock": lambda: now_ms() + 31_000})
    frame = signed_frame(ttl_s=30)
    await relay.outbox.put(frame)
    result = await relay.result(frame.command_id)
    assert result.message.startswith("refused: expired"), result.message
    assert one.calls == []


async def test_a_redelivered_command_is_answered_again_not_run_again(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    one: Car = await car()
    frame = signed_frame()
    await relay.outbox.put(frame)
    first = await relay.result(frame.command_id)
    await relay.outbox.put(frame)  # the broker's retry (or a replay of the same frame)
    again = await relay.result(frame.command_id, count=2)
    assert (again.success, again.message) == (first.success, first.message) == (True, "unlock done")
    assert one.calls == [("unlock", b'{"door":"all"}')]
    assert list(one.agent.refused) == []


async def test_after_a_reconnect_the_same_id_gets_its_first_answer(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    one: Car = await car()
    frame = signed_frame()
    await relay.outbox.put(frame)
    await relay.result(frame.command_id)
    session = len(relay.hellos)
    await relay.outbox.put(None)  # the stream ends; the car comes back
    await eventually(lambda: len(relay.hellos) > session, what="a reconnect")
    assert frame.command_id in relay.hellos[-1].recent_command_ids
    await relay.outbox.put(frame)
    again = await relay.result(frame.command_id, count=3)  # the resend after Welcome, then ours
    assert again.success is True
    assert len(one.calls) == 1


async def test_a_replay_the_agent_no_longer_remembers_is_refused_by_the_verifier(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    one: Car = await car(remember_results=1)
    first, second = signed_frame(), signed_frame(name="lock")
    for frame in (first, second):  # the second pushes the first out of the agent's memory
        await relay.outbox.put(frame)
        await relay.result(frame.command_id)
    await relay.outbox.put(first)
    replayed = await relay.result(first.command_id, count=2)
    assert replayed.success is False
    assert (
        replayed.message == f"refused: replayed: command {first.command_id!r} was already executed"
    )
    assert [name for name, _ in one.calls] == ["unlock", "lock"]


async def test_names_that_need_no_signature_run_unsigned(
    relay: FakeLink, car: Callable[..., Any]
) -> None:
    one: Car = await car(verifier_kwargs={"require_signatures": {"unlock"}})
    lock = link.CommandFrame(command_id="plain-lock", name="lock", expires_at_ms=FAR_MS)
    unlock = link.CommandFrame(command_id="plain-unlock", name="unlock", expires_at_ms=FAR_MS)
    for frame in (lock, unlock):
        await relay.outbox.put(frame)
    assert (await relay.result("plain-lock")).success is True
    refused = await relay.result("plain-unlock")
    assert refused.message.startswith("refused: unsigned")
    assert one.calls == [("lock", b"")]
