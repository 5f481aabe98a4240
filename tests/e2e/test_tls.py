"""TLS and mTLS over loopback with certificates the test makes (broker/security/tls.py).

mTLS: a car is who its certificate says (URI SAN `urn:vehicle:<id>`), and nothing it
types changes that; no certificate, or one from another CA, is no connection at all.
TLS: services reach the broker encrypted, with their token. Certificates reload for new
connections without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.sdk.vehicle import VehicleAgent, succeed
from broker.security import tls
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker.v1 import vehicle_link_pb2_grpc
from tests.conftest import eventually
from tests.e2e.harness import Running


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, two cars, a service; and a second CA."""
    folder = tmp_path_factory.mktemp("pki")
    tls.create_ca(folder)
    tls.issue_certificate(folder, "server", server_hosts=["localhost", "127.0.0.1"])
    for car in ("car-a", "car-b"):
        tls.issue_certificate(folder, car, vehicle_id=car)
    tls.issue_certificate(folder, "app", service="app")
    other = folder / "other"
    tls.create_ca(other)
    tls.issue_certificate(other, "car-a", vehicle_id="car-a")
    return folder


def mtls(pki: Path) -> dict[str, Any]:
    return {
        "tls_cert_file": str(pki / "server.pem"),
        "tls_key_file": str(pki / "server.key"),
        "tls_client_ca_file": str(pki / "ca.pem"),
    }


def creds(pki: Path, name: str | None = None, *, ca: Path | None = None) -> Any:
    if name is None:
        return tls.channel_credentials(ca or pki / "ca.pem")
    return tls.channel_credentials(ca or pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")


async def connect_status(target: str, credentials: Any, claimed: str | None = None) -> Any:
    """Open a vehicle stream, say Hello and read: the status code the broker ends it
    with (or grpc's, if the TLS handshake fails), or the first frame it sends."""
    metadata = (("x-vehicle-id", claimed),) if claimed else ()
    async with grpc.aio.secure_channel(target, credentials) as channel:
        call = vehicle_link_pb2_grpc.VehicleLinkStub(channel).Connect(metadata=metadata, timeout=5)
        try:
            await call.write(link.VehicleFrame(hello=link.Hello()))
            return (await call.read()).WhichOneof("kind")
        except grpc.aio.AioRpcError as error:
            return error.code()
        finally:
            call.cancel()


async def test_a_car_is_who_its_certificate_says(
    start_broker: Callable[..., Any], pki: Path
) -> None:
    running: Running = await start_broker(**mtls(pki))
    agent = VehicleAgent(
        running.target, "car-a", credentials=creds(pki, "car-a"), handlers={"unlock": succeed}
    )
    task = asyncio.create_task(agent.run())
    client = BrokerClient(
        running.target, token=running.service_token(), credentials=creds(pki, "app")
    )
    try:
        reply = await client.send_command("car-a", "unlock", wait="result", timeout_s=10)
        assert reply.command.status == t.SUCCEEDED
        # a certificate for car-a cannot open car-b, whatever the metadata says
        denied = await connect_status(running.target, creds(pki, "car-a"), claimed="car-b")
        assert denied == grpc.StatusCode.PERMISSION_DENIED
        assert await connect_status(running.target, creds(pki, "car-b")) == "welcome"
        # a car's certificate cannot call the command service, with any token
        car_client = BrokerClient(
            running.target, token=running.service_token(), credentials=creds(pki, "car-a")
        )
        with pytest.raises(BrokerRpcError) as refused:
            await car_client.get_command("0123456789ab0123456789ab")
        assert refused.value.code == "PERMISSION_DENIED"
        await car_client.close()
        # a service's certificate cannot open a vehicle stream
        assert await connect_status(running.target, creds(pki, "app"), claimed="car-a") == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    finally:
        await client.close()
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_no_certificate_or_an_untrusted_one_gets_no_connection(
    start_broker: Callable[..., Any], pki: Path
) -> None:
    running: Running = await start_broker(**mtls(pki))
    no_cert = await connect_status(running.target, creds(pki))
    untrusted = tls.channel_credentials(
        pki / "ca.pem", pki / "other" / "car-a.pem", pki / "other" / "car-a.key"
    )
    assert no_cert == grpc.StatusCode.UNAVAILABLE
    assert await connect_status(running.target, untrusted) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(running.target) as plaintext:
        stub = vehicle_link_pb2_grpc.VehicleLinkStub(plaintext)
        call = stub.Connect(metadata=(("x-vehicle-id", "car-a"),), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_services_over_tls_with_their_token(
    start_broker: Callable[..., Any], pki: Path
) -> None:
    running: Running = await start_broker(
        tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key")
    )
    async with BrokerClient(
        running.target, token=running.service_token(), credentials=creds(pki)
    ) as client:
        reply = await client.send_command("car-9", "unlock")
        assert reply.command.status == t.QUEUED
    async with BrokerClient(
        running.target, token=running.service_token(), max_retries=0, reconnect_wait_s=0
    ) as plaintext:
        with pytest.raises(BrokerRpcError) as failed:
            await plaintext.send_command("car-9", "unlock", timeout_s=2)
        assert failed.value.code == "UNAVAILABLE"


async def test_certificates_reload_for_new_connections_without_a_restart(
    start_broker: Callable[..., Any], pki: Path, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        (live / name).write_bytes((pki / name).read_bytes())
    running: Running = await start_broker(
        tls_cert_file=str(live / "server.pem"), tls_key_file=str(live / "server.key")
    )
    token = running.service_token()
    async with BrokerClient(running.target, token=token, credentials=creds(pki)) as client:
        await client.send_command("car-1", "lock")
    renewed = tmp_path / "renewed"
    tls.create_ca(renewed)
    tls.issue_certificate(renewed, "server", server_hosts=["127.0.0.1"])
    for name in ("server.key", "server.pem"):
        (live / name).write_bytes((renewed / name).read_bytes())
    later = time.time() + 5  # a different mtime even on a coarse-clock filesystem
    for name in ("server.key", "server.pem"):
        os.utime(live / name, (later, later))

    async def new_connection_trusts(ca: Path) -> bool:
        async with BrokerClient(
            running.target, token=token, credentials=tls.channel_credentials(ca),
            max_retries=0, reconnect_wait_s=0,
        ) as fresh:  # fmt: skip
            try:
                await fresh.send_command("car-1", "lock", timeout_s=2)
            except BrokerRpcError:
                return False
            return True

    await eventually(lambda: new_connection_trusts(renewed / "ca.pem"), timeout_s=15,
                     what="a new connection served the renewed certificate")  # fmt: skip
    assert not await new_connection_trusts(pki / "ca.pem")


def test_the_dev_ca_helper_writes_private_keys_0600(tmp_path: Path) -> None:
    tls.create_ca(tmp_path)
    cert, key = tls.issue_certificate(tmp_path, "car-7", vehicle_id="car-7")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert key.stat().st_mode & 0o777 == 0o600
    identity = tls.peer_identity({"x509_pem_cert": [cert.read_bytes()]})
    assert identity == ("vehicle", "car-7")
    assert tls.peer_identity({}) is None
