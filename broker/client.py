"""Service SDK: an async client for CommandService, and a blocking twin for sync code.

    async with BrokerClient("127.0.0.1:50051", token=TOKEN) as client:
        reply = await client.send_command("car-1", "unlock", wait="result", timeout_s=10)
        print(reply.command.status)

Failures raise `BrokerRpcError`, whose `code` is the gRPC status name.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from broker.config import LANES
from broker.errors import pushback_ms
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t

T = TypeVar("T")
DEFAULT_TARGET = "127.0.0.1:50051"
WAIT_MODES = {"none": svc.WAIT_NONE, "delivered": svc.WAIT_DELIVERED, "result": svc.WAIT_RESULT}
LANE_NAMES = LANES  # lane name -> Lane value


class BrokerRpcError(Exception):
    """A call the broker refused or could not complete; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        #: the broker's `grpc-retry-pushback-ms` hint, when it sent one
        self.retry_after_ms = retry_after_ms


def command_to_dict(command: Any) -> dict[str, Any]:
    """A Command as plain JSON-ready data (status and lane by name)."""
    out: dict[str, Any] = {
        "command_id": command.command_id,
        "vehicle_id": command.vehicle_id,
        "name": command.name,
        "status": t.CommandStatus.Name(command.status),
        "lane": t.Lane.Name(command.lane),
        "attempt": command.attempt,
        "created_at_ms": command.created_at_ms,
        "expires_at_ms": command.expires_at_ms,
        "updated_at_ms": command.updated_at_ms,
    }
    for name in ("delivered_at_ms", "result_deadline_ms"):
        if getattr(command, name):
            out[name] = getattr(command, name)
    for name in ("idempotency_key", "coalesce_key", "status_reason", "result_message"):
        if getattr(command, name):
            out[name] = getattr(command, name)
    if command.payload:
        try:
            out["payload"] = json.loads(command.payload)
        except ValueError:
            out["payload_hex"] = command.payload.hex()
    return out


def _rpc_error(error: grpc.aio.AioRpcError) -> BrokerRpcError:
    return BrokerRpcError(
        error.code().name, error.details() or "", pushback_ms(error.trailing_metadata())
    )


class BrokerClient:
    """Async CommandService client. Create it inside the running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
        timeout_s: float = 30.0,
        max_pushback_retries: int = 3,
    ) -> None:
        """`max_pushback_retries`: how often a call refused with UNAVAILABLE and a pushback
        hint is retried after the hinted delay (0 disables). Retries are safe: the broker
        sends that hint only with refusals made before anything was written."""
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._owns_channel = channel is None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s
        self._max_pushback_retries = max_pushback_retries
        #: calls refused with a pushback hint, and retries made because of one
        self.pushbacks = 0

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _unary(
        self, method: str, request: Any, response_type: Any, timeout_s: float | None = None
    ) -> Any:
        call = self._channel.unary_unary(
            f"/broker.v1.CommandService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        retries = 0
        while True:
            try:
                return await call(
                    request, metadata=self._metadata, timeout=deadline - time.monotonic()
                )
            except grpc.aio.AioRpcError as error:
                refusal = _rpc_error(error)
            if refusal.code != "UNAVAILABLE" or refusal.retry_after_ms is None:
                raise refusal
            self.pushbacks += 1
            delay_s = refusal.retry_after_ms / 1000
            if retries >= self._max_pushback_retries or time.monotonic() + delay_s >= deadline:
                raise refusal
            retries += 1
            await asyncio.sleep(delay_s)

    async def send_command(
        self,
        vehicle_id: str,
        name: str,
        payload: bytes | dict[str, Any] | None = None,
        *,
        lane: str | None = None,
        ttl_s: float | None = None,
        idempotency_key: str = "",
        coalesce_key: str = "",
        wait: str = "none",
        timeout_s: float | None = None,
    ) -> Any:
        """Send one command; with `wait`, return the status reached within `timeout_s`."""
        request = build_request(
            vehicle_id, name, payload, lane=lane, ttl_s=ttl_s,
            idempotency_key=idempotency_key,
            coalesce_key=coalesce_key, wait=wait, timeout_s=timeout_s,
        )  # fmt: skip
        rpc_timeout = (timeout_s or 30.0) + self._timeout_s if wait != "none" else None
        return await self._unary("SendCommand", request, svc.SendCommandResponse, rpc_timeout)

    async def send_commands(self, requests: Iterable[Any]) -> Any:
        """Send a batch of `SendCommandRequest`s (see `build_request`) in one durable write."""
        batch = svc.SendCommandsRequest(commands=list(requests))
        return await self._unary("SendCommands", batch, svc.SendCommandsResponse)

    async def get_command(self, command_id: str) -> Any:
        return await self._unary(
            "GetCommand", svc.GetCommandRequest(command_id=command_id), t.Command
        )

    async def cancel_command(self, command_id: str) -> Any:
        return await self._unary(
            "CancelCommand", svc.CancelCommandRequest(command_id=command_id), t.Command
        )

    async def list_commands(self, vehicle_id: str, limit: int = 100) -> list[Any]:
        reply = await self._unary(
            "ListCommands",
            svc.ListCommandsRequest(vehicle_id=vehicle_id, limit=limit),
            svc.ListCommandsResponse,
        )
        return list(reply.commands)

    async def get_vehicle_state(self, vehicle_id: str) -> Any:
        return await self._unary(
            "GetVehicleState", svc.GetVehicleStateRequest(vehicle_id=vehicle_id), svc.VehicleState
        )

    async def watch_commands(
        self, vehicle_ids: Iterable[str] = (), command_ids: Iterable[str] = ()
    ) -> AsyncIterator[Any]:
        """Status changes as the broker records them, until the caller stops iterating."""
        call = self._channel.unary_stream(
            "/broker.v1.CommandService/WatchCommands",
            request_serializer=svc.WatchCommandsRequest.SerializeToString,
            response_deserializer=t.Command.FromString,
        )
        stream = call(
            svc.WatchCommandsRequest(vehicle_ids=list(vehicle_ids), command_ids=list(command_ids)),
            metadata=self._metadata,
        )
        try:
            async for command in stream:
                yield command
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error) from None
        finally:
            stream.cancel()


def build_request(
    vehicle_id: str,
    name: str,
    payload: bytes | dict[str, Any] | None = None,
    *,
    lane: str | None = None,
    ttl_s: float | None = None,
    idempotency_key: str = "",
    coalesce_key: str = "",
    wait: str = "none",
    timeout_s: float | None = None,
) -> Any:
    """A SendCommandRequest from friendly arguments (JSON-encodes a dict payload)."""
    if isinstance(payload, dict):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {sorted(WAIT_MODES)}")
    if lane is not None and lane not in LANE_NAMES:
        raise ValueError(f"lane must be one of {sorted(LANE_NAMES)}")
    return svc.SendCommandRequest(
        vehicle_id=vehicle_id,
        name=name,
        payload=payload or b"",
        lane=LANE_NAMES[lane] if lane else t.LANE_UNSPECIFIED,  # type: ignore[arg-type]
        ttl_ms=_whole_ms(ttl_s),
        idempotency_key=idempotency_key,
        coalesce_key=coalesce_key,
        wait=WAIT_MODES[wait],
        wait_timeout_ms=_whole_ms(timeout_s),
    )


def _whole_ms(seconds: float | None) -> int:
    """Seconds as wire milliseconds, never rounding a positive value down to 0 ("default")."""
    if not seconds:
        return 0
    if seconds < 0:
        raise ValueError("durations must be positive")
    return max(1, math.ceil(seconds * 1000))


class SyncBrokerClient:
    """Blocking twin of `BrokerClient` for sync code: runs one on a private loop thread."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> BrokerClient:
            return BrokerClient(target, token=token)

        self._client = self._run(make)

    def _run(self, factory: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await factory()

        future: Future[T] = asyncio.run_coroutine_threadsafe(call(), self._loop)
        return future.result()

    def __enter__(self) -> SyncBrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._client.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def send_command(self, vehicle_id: str, name: str, payload: Any = None, **kw: Any) -> Any:
        return self._run(lambda: self._client.send_command(vehicle_id, name, payload, **kw))

    def send_commands(self, requests: Iterable[Any]) -> Any:
        return self._run(lambda: self._client.send_commands(requests))

    def get_command(self, command_id: str) -> Any:
        return self._run(lambda: self._client.get_command(command_id))

    def cancel_command(self, command_id: str) -> Any:
        return self._run(lambda: self._client.cancel_command(command_id))

    def list_commands(self, vehicle_id: str, limit: int = 100) -> list[Any]:
        return self._run(lambda: self._client.list_commands(vehicle_id, limit))

    def get_vehicle_state(self, vehicle_id: str) -> Any:
        return self._run(lambda: self._client.get_vehicle_state(vehicle_id))
