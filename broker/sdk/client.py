"""Service SDK: an async client for CommandService, and a blocking twin for sync code.

    async with BrokerClient("127.0.0.1:50051", token=TOKEN) as client:
        reply = await client.send_command("car-1", "unlock", wait="result", timeout_s=10)
        print(reply.command.status)

Failures raise `BrokerRpcError`, whose `code` is the gRPC status name.

Retries are safe by default. Every send carries an idempotency key (one is generated per
logical send unless the caller gives one), so the SDK retries a send that failed in
transit — UNAVAILABLE (the broker restarting, a connection lost, a stream refused), or
CANCELLED by the server (grpc sheds requests still pending when a burst exceeds its
limits: they never reached the broker's code) — with the broker's
pushback hint or a jittered backoff — until the call's timeout, and the broker answers a
retry that reaches a command it already has with that command (`deduplicated`), never a
second one. A call that still fails with UNAVAILABLE or DEADLINE_EXCEEDED may have been
accepted: send again with the same `idempotency_key` (within the broker's idempotency
window, 24 h by default) to learn what became of it.

Signed commands: given a `signer` (`broker.security.signing.CommandSigner`, the sender's
own Ed25519 key), the client signs every command it sends (`send_command` and each item
of `send_commands`) for the car to check (docs/security.md). The signed expiry is `ttl_s`
from now, or `DEFAULT_SIGNED_TTL_S` (60 s) when no TTL is given: the client does not know
the broker's per-command policy, and a short expiry bounds how long a broker can hold a
command back. It must be within the lane's TTL cap or the broker refuses the send. Each
logical send is signed once; its retries resend the same envelope (the broker
deduplicates it by the signed command id, the one `reply.command.command_id` shows).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from broker.core import lanes
from broker.security.signing import CommandSigner
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.wire import TokenSource, bearer, pushback_ms

T = TypeVar("T")
DEFAULT_TARGET = "127.0.0.1:50051"
WAIT_MODES = {"none": svc.WAIT_NONE, "delivered": svc.WAIT_DELIVERED, "result": svc.WAIT_RESULT}
#: the signed expiry of a command sent with a signer and no TTL (the critical lane's TTL)
DEFAULT_SIGNED_TTL_S = 60.0


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
    if command.HasField("signed"):
        out["signed"] = True
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


#: refusals the SDK retries (see the module docstring); a call the caller cancels raises
#: asyncio.CancelledError, never CANCELLED, so that is only ever the server's
RETRIED = frozenset({"UNAVAILABLE", "CANCELLED"})


class BrokerClient:
    """Async CommandService client. Create it inside the running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: TokenSource = None,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 8,
        reconnect_wait_s: float = 15.0,
        signer: CommandSigner | None = None,
    ) -> None:
        """`max_retries`: how often a call that failed with UNAVAILABLE is retried, after
        the broker's pushback hint or a jittered backoff, within its timeout (0
        disables). Safe: reads change nothing, sends carry an idempotency key.
        `reconnect_wait_s`: how long a call lost in transit waits for the broker to be
        reachable again (a restart), within its timeout; 0 fails at once.
        `signer`: sign every command sent (see the module docstring)."""
        # TLS: `credentials` trust the broker's CA (and carry a client certificate for
        # mTLS): broker.security.tls.channel_credentials.
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        # A provider is asked before each call; a call refused UNAUTHENTICATED (the token
        # ran out) is tried once more if the provider then has another token.
        self._token = token
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._reconnect_wait_s = reconnect_wait_s
        self.signer = signer
        #: calls refused with a pushback hint
        self.pushbacks = 0
        #: retries made (after a pushback hint or a failure in transit)
        self.retries = 0

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _unary(
        self,
        method: str,
        request: Any,
        response_type: Any,
        timeout_s: float | None = None,
        retried: list[BrokerRpcError] | None = None,
    ) -> Any:
        """One call with the retries the module docstring describes; the refusals that
        were retried are appended to `retried` when given."""
        call = self._channel.unary_unary(
            f"/broker.v1.CommandService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        retries = 0
        renewed = False
        while True:
            metadata = bearer(self._token)
            try:
                return await call(request, metadata=metadata, timeout=deadline - time.monotonic())
            except grpc.aio.AioRpcError as error:
                refusal = _rpc_error(error)
            if refusal.code == "UNAUTHENTICATED" and not renewed and self._renews(metadata):
                renewed = True
                continue
            if refusal.code not in RETRIED or retries >= self._max_retries:
                raise refusal
            if refusal.retry_after_ms is not None:
                self.pushbacks += 1
                delay_s = refusal.retry_after_ms / 1000
                if time.monotonic() + delay_s >= deadline:
                    raise refusal
                await asyncio.sleep(delay_s)
            else:
                # Lost in transit (the broker restarting, a connection gone): wait for
                # the channel to be ready again, up to `reconnect_wait_s`; the retry
                # then has the rest of the call's time.
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**retries)))
                wait_s = min(self._reconnect_wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise refusal
                try:
                    await asyncio.wait_for(self._channel.channel_ready(), wait_s)
                except TimeoutError:
                    raise BrokerRpcError(
                        "UNAVAILABLE", f"the broker is unreachable ({refusal.message})"
                    ) from None
            retries += 1
            self.retries += 1
            if retried is not None:
                retried.append(refusal)

    def _renews(self, refused: tuple[tuple[str, str], ...]) -> bool:
        """Whether the token provider now has a token other than the refused one."""
        return callable(self._token) and bearer(self._token) != refused

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
        """Send one command; with `wait`, return the status reached within `timeout_s`.

        Without an `idempotency_key` one is generated (see the module docstring)."""
        request = build_request(
            vehicle_id, name, payload, lane=lane, ttl_s=ttl_s,
            idempotency_key=idempotency_key or new_idempotency_key(),
            coalesce_key=coalesce_key, wait=wait, timeout_s=timeout_s,
        )  # fmt: skip
        if self.signer is not None:
            sign_request(request, self.signer)
        rpc_timeout = (timeout_s or 30.0) + self._timeout_s if wait != "none" else None
        return await self._unary("SendCommand", request, svc.SendCommandResponse, rpc_timeout)

    async def send_commands(self, requests: Iterable[Any]) -> Any:
        """Send a batch of `SendCommandRequest`s (see `build_request`) in one durable write;
        an item without an idempotency key gets one generated, and with a signer every
        item not signed yet is signed (`sign_request`; on a copy: yours is untouched)."""
        batch = svc.SendCommandsRequest(commands=list(requests))
        for item in batch.commands:
            if not item.idempotency_key:
                item.idempotency_key = new_idempotency_key()
            if self.signer is not None and not item.HasField("signed"):
                sign_request(item, self.signer)
        return await self._unary("SendCommands", batch, svc.SendCommandsResponse)

    async def get_command(self, command_id: str) -> Any:
        return await self._unary(
            "GetCommand", svc.GetCommandRequest(command_id=command_id), t.Command
        )

    async def cancel_command(self, command_id: str) -> Any:
        """Cancel a command not yet delivered. A retry that finds it CANCELED already
        (the first attempt's reply was lost) returns it rather than failing."""
        retried: list[BrokerRpcError] = []
        try:
            return await self._unary(
                "CancelCommand",
                svc.CancelCommandRequest(command_id=command_id),
                t.Command,
                retried=retried,
            )
        except BrokerRpcError as error:
            if error.code != "FAILED_PRECONDITION" or not retried:
                raise
            command = await self.get_command(command_id)
            if command.status != t.CANCELED:
                raise
            return command

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
        """Status changes as the broker records them, until the caller stops iterating.

        The broker ends a watch with UNAUTHENTICATED (`BrokerRpcError`) when the token it
        was opened with expires or is revoked: watch again (with a token provider, the
        new watch takes the provider's current token), and re-read current status, as
        changes between the two watches are not replayed."""
        call = self._channel.unary_stream(
            "/broker.v1.CommandService/WatchCommands",
            request_serializer=svc.WatchCommandsRequest.SerializeToString,
            response_deserializer=t.Command.FromString,
        )
        stream = call(
            svc.WatchCommandsRequest(vehicle_ids=list(vehicle_ids), command_ids=list(command_ids)),
            metadata=bearer(self._token),
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
    if lane is not None and lane not in lanes.VALUES:
        raise ValueError(f"lane must be one of {sorted(lanes.VALUES)}")
    return svc.SendCommandRequest(
        vehicle_id=vehicle_id,
        name=name,
        payload=payload or b"",
        lane=lanes.VALUES[lane] if lane else t.LANE_UNSPECIFIED,  # type: ignore[arg-type]
        ttl_ms=_whole_ms(ttl_s),
        idempotency_key=idempotency_key,
        coalesce_key=coalesce_key,
        wait=WAIT_MODES[wait],
        wait_timeout_ms=_whole_ms(timeout_s),
    )


def sign_request(
    request: Any, signer: CommandSigner, default_ttl_s: float = DEFAULT_SIGNED_TTL_S
) -> Any:
    """Sign a SendCommandRequest in place: its vehicle, name and payload go into a signed
    body expiring `ttl_ms` from now (`default_ttl_s` when 0), and `ttl_ms` becomes 0 (the
    expiry is signed). The payload is left to the body alone; vehicle id and name stay
    (equal to the body's, as the broker requires). Returns the request."""
    ttl_s = request.ttl_ms / 1000 if request.ttl_ms else default_ttl_s
    request.signed.CopyFrom(
        signer.sign(request.vehicle_id, request.name, request.payload, ttl_s=ttl_s)
    )
    request.ttl_ms = 0
    request.payload = b""
    return request


def new_idempotency_key() -> str:
    """A fresh key for one logical send: 12 hex digits of milliseconds, then 80 random
    bits. Time first, so a batch's keys land side by side in the broker's key index
    (random keys dirtied a page each: batches of 512 were a third slower)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def _whole_ms(seconds: float | None) -> int:
    """Seconds as wire milliseconds, never rounding a positive value down to 0 ("default")."""
    if not seconds:
        return 0
    if seconds < 0:
        raise ValueError("durations must be positive")
    return max(1, math.ceil(seconds * 1000))


class SyncBrokerClient:
    """Blocking twin of `BrokerClient` for sync code: runs one on a private loop thread."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: TokenSource = None,
        signer: CommandSigner | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> BrokerClient:
            return BrokerClient(target, token=token, signer=signer)

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
