"""Tokens on a real broker: streams end when their credential expires or is revoked, the
car SDK renews by itself, and malformed credentials are UNAUTHENTICATED, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.sdk.client import BrokerRpcError
from broker.security.keys import key_id, load_private_key
from broker.security.tokens import TokenMinter, b64encode
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from tests.conftest import eventually, session_keys
from tests.e2e.harness import Running


async def _watch_error(running: Running, token: str) -> BrokerRpcError:
    with pytest.raises(BrokerRpcError) as info:
        async for _ in running.client(token=token).watch_commands(["car-1"]):
            pass
    return info.value


async def test_revoked_tokens_end_open_streams_and_are_refused(
    start_broker: Callable[..., Any], cars: Callable[..., Any], tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# none yet\n")
    running: Running = await start_broker(auth_revocation_file=str(revoked))
    car_token = session_keys().vehicle_token("car-1", token_id="car-1-token")
    watch_token = running.service_token("read", token_id="watch-token")
    agent = await cars(running, "car-1", token=car_token)
    watch = asyncio.create_task(_watch_error(running, watch_token))
    await eventually(lambda: running.broker.auth.held, lambda held: held == 2, what="2 holds")

    revoked.write_text("# leaked\ncar-1-token\nwatch-token\n")
    changed_at = time.monotonic()
    error = await asyncio.wait_for(watch, 3)
    assert (error.code, "revoked" in error.message) == ("UNAUTHENTICATED", True)
    await eventually(lambda: agent.last_error, what="the car's stream to end", timeout_s=3)
    assert agent.last_error is not None
    assert agent.last_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (agent.last_error.details() or "")
    assert time.monotonic() - changed_at < 2.5
    refused = await _watch_error(running, watch_token)  # and refused from now on
    assert refused.code == "UNAUTHENTICATED"


async def test_expiry_ends_the_stream_and_the_car_renews_its_token(
    running: Running, cars: Callable[..., Any]
) -> None:
    minter = TokenMinter(session_keys().vehicle_key, vehicle="car-1", ttl_s=2)
    agent = await cars(running, "car-1", token=minter)
    first_session = agent.session_id
    await eventually(lambda: agent.renewals, timeout_s=5, what="a renewal after expiry")
    assert agent.last_error is not None
    assert agent.last_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (agent.last_error.details() or "")
    await eventually(lambda: agent.connected.is_set() and agent.session_id != first_session)
    assert minter.minted >= 2
    reply = await running.client().send_command("car-1", "unlock", wait="result", timeout_s=5)
    assert reply.command.status == t.SUCCEEDED


async def test_expiry_ends_a_watch(running: Running) -> None:
    short = running.service_token("read", ttl_s=1)
    started = time.monotonic()
    error = await asyncio.wait_for(_watch_error(running, short), 4)
    assert error.code == "UNAUTHENTICATED" and "expired" in error.message
    assert time.monotonic() - started < 2.5


def _forged(claims: bytes) -> str:
    """Claims signed by the session's service key: what only a key holder can send."""
    key = load_private_key(session_keys().service_key)
    body = f"v2.{b64encode(key_id(key.public_key()) + claims)}"
    return f"{body}.{b64encode(key.sign(body.encode()))}"


def _claims(**changes: Any) -> bytes:
    now = int(time.time())
    claims = {"sub": "app", "kind": "service", "scopes": ["send", "read"], "iat": now,
              "exp": now + 600, "jti": "x"}  # fmt: skip
    claims.update(changes)
    return json.dumps({k: v for k, v in claims.items() if v is not None}).encode()


async def test_every_malformed_credential_is_unauthenticated_without_a_traceback(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    good = running.service_token()
    body, signature = good.split(".")[1:]
    now = int(time.time())
    tokens = [
        f"v2.{b64encode(b'k' * 8 + b'[' * 2500)}.{signature}",  # unsigned nested claims
        _forged(b"[" * 2500),  # signed nested claims
        f"v2.{body}.{signature}!!",  # junk after the signature
        f"v2.{body}.{signature[:40]}*{signature[41:]}",
        _forged(_claims(exp=float("inf")).replace(b"Infinity", b"1e999")),
        _forged(_claims(exp=1e300)),
        _forged(b'{"sub":"app","kind":"service","iat":1,"jti":"x","exp":NaN}'),
        _forged(_claims(iat=now + 30 * 86400, exp=now + 30 * 86400 + 60)),
        _forged(_claims(sub=None)),
        "v1.e30.abc",
        "x" * 5000,
    ]
    caplog.set_level(logging.DEBUG)
    hello = link.VehicleFrame(hello=link.Hello()).SerializeToString()
    for token in tokens:
        client = running.client(token=token)
        with pytest.raises(BrokerRpcError) as info:
            await client.get_command("nope")
        assert info.value.code == "UNAUTHENTICATED", (token[:60], info.value)
        async with grpc.aio.insecure_channel(running.target) as channel:
            call = channel.stream_stream("/broker.v1.VehicleLink/Connect")(
                metadata=(("authorization", f"Bearer {token}"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.write(hello)
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert logged == []
