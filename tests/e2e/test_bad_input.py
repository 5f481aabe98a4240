"""Bad input gets a clear status and harms no other stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.sdk.client import BrokerRpcError, build_request
from broker.sdk.vehicle import VehicleAgent, succeed
from broker.security.tokens import issue_token
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import session_keys
from tests.e2e.harness import Running


@pytest.fixture
async def bystander(running: Running) -> AsyncIterator[VehicleAgent]:
    """A healthy connected car: every test checks it still works afterwards."""
    agent = running.agent("bystander", handlers={"unlock": succeed})
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 5)
    yield agent
    reply = await running.client().send_command("bystander", "unlock", wait="result", timeout_s=5)
    assert reply.command.status == t.SUCCEEDED, "a bad caller harmed another stream"
    assert agent.connects == 1, "the healthy car's stream was dropped"
    task.cancel()


async def _raw_unary(target: str, method: str, body: bytes, token: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/broker.v1.CommandService/{method}")
        try:
            await call(body, metadata=(("authorization", f"Bearer {token}"),), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def _expect(code: str, coro: Any) -> BrokerRpcError:
    with pytest.raises(BrokerRpcError) as info:
        await coro
    assert info.value.code == code, info.value
    assert info.value.message  # always a clear message
    return info.value


async def test_malformed_and_oversized_requests(running: Running, bystander: Any) -> None:
    token = running.service_token()
    garbage = b"\xff\xff\xff\xff\x0f"
    assert await _raw_unary(running.target, "SendCommand", garbage, token) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    huge = svc.SendCommandRequest(vehicle_id="car-1", name="unlock", payload=b"x" * (2 << 20))
    assert await _raw_unary(running.target, "SendCommand", huge.SerializeToString(), token) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"vehicle_id": ""}, "vehicle_id"),
        ({"vehicle_id": "c" * 65}, "vehicle_id"),
        ({"vehicle_id": "car 1"}, "vehicle_id"),
        ({"name": ""}, "name"),
        ({"name": "Unlock!"}, "name"),
        ({"lane": 7}, "lane"),
        ({"payload": b"x" * 20000}, "payload"),
        ({"idempotency_key": "k" * 129}, "idempotency_key"),
        ({"wait": 9}, "wait"),
        ({"wait": svc.WAIT_RESULT, "wait_timeout_ms": 10_000_000}, "wait_timeout"),
    ],
)
async def test_invalid_fields(running: Running, kwargs: dict[str, Any], needle: str) -> None:
    request = svc.SendCommandRequest(vehicle_id="car-1", name="unlock")
    for key, value in kwargs.items():
        setattr(request, key, value)
    client = running.client()
    error = await _expect(
        "INVALID_ARGUMENT", client._unary("SendCommand", request, svc.SendCommandResponse)
    )
    assert needle in error.message


async def test_auth_failures(running: Running, bystander: Any) -> None:
    anonymous = running.client(token="")
    await _expect("UNAUTHENTICATED", anonymous.send_command("car-1", "unlock"))
    forged = issue_token(Ed25519PrivateKey.generate(), service="x", scopes=["send"])
    await _expect("UNAUTHENTICATED", running.client(token=forged).send_command("car-1", "lock"))
    expired = session_keys().service_token("send", name="x", ttl_s=-1)
    await _expect("UNAUTHENTICATED", running.client(token=expired).send_command("car-1", "lock"))
    await _expect("UNAUTHENTICATED", running.client(token="v1.garbage").get_command("x"))
    reader = running.client("read")
    await _expect("PERMISSION_DENIED", reader.send_command("car-1", "unlock"))
    assert (await reader.list_commands("car-1")) == []
    car_token = session_keys().vehicle_token("car-1")
    await _expect("PERMISSION_DENIED", running.client(token=car_token).get_command("x"))
    await _expect(
        "PERMISSION_DENIED",
        running.client().send_command("car-1", "data_request", lane="critical"),
    )
    admin = running.client("admin")
    raised = await admin.send_command("car-1", "data_request", lane="critical")
    assert raised.command.lane == t.CRITICAL
    lowered = await running.client().send_command("car-1", "unlock", lane="bulk")
    assert lowered.command.lane == t.BULK


async def _connect_status(
    target: str, metadata: tuple[tuple[str, str], ...], frames: list[bytes]
) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream("/broker.v1.VehicleLink/Connect")(metadata=metadata)
        try:
            for frame in frames:
                await call.write(frame)
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
        return await call.code()


def _bearer(token: str, vehicle: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [("authorization", f"Bearer {token}")]
    if vehicle is not None:
        metadata.append(("x-vehicle-id", vehicle))
    return tuple(metadata)


async def test_vehicle_stream_rejections(running: Running, bystander: Any) -> None:
    hello = link.VehicleFrame(hello=link.Hello()).SerializeToString()
    car1 = session_keys().vehicle_token("car-1")
    cases: list[tuple[tuple[tuple[str, str], ...], list[bytes], grpc.StatusCode]] = [
        ((), [hello], grpc.StatusCode.UNAUTHENTICATED),
        (_bearer(car1, "car-2"), [hello], grpc.StatusCode.PERMISSION_DENIED),
        (_bearer(running.service_token("admin")), [hello], grpc.StatusCode.PERMISSION_DENIED),
        (_bearer(car1), [b"\xff\xff\xff"], grpc.StatusCode.INVALID_ARGUMENT),
        (
            _bearer(car1),
            [link.VehicleFrame(ack=link.CommandAck(command_id="x")).SerializeToString()],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (_bearer(car1), [hello, b"\xff\xff\xff"], grpc.StatusCode.INVALID_ARGUMENT),
        (_bearer(car1), [hello, hello], grpc.StatusCode.INVALID_ARGUMENT),
        (_bearer(car1), [hello, b""], grpc.StatusCode.INVALID_ARGUMENT),
        (_bearer(car1), [hello, b"x" * (2 << 20)], grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for metadata, frames, expected in cases:
        got = await _connect_status(running.target, metadata, frames)
        assert got == expected, (metadata, frames[:1], got)


async def test_silent_car_is_dropped_after_hello_timeout(start_broker: Callable[..., Any]) -> None:
    running = await start_broker(hello_timeout_s=0.2)
    car = session_keys().vehicle_token("car-1")
    assert await _connect_status(running.target, _bearer(car), []) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_batch_limits(running: Running) -> None:
    client = running.client()
    await _expect("INVALID_ARGUMENT", client.send_commands([]))
    too_many = [build_request("car-1", "lock")] * 1001
    await _expect("INVALID_ARGUMENT", client.send_commands(too_many))
