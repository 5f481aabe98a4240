"""What a peer may hold before it has proved anything: streams per peer address, and how
long a call may wait for its first message.

grpc.aio runs a unary handler only once the request message has arrived, so a peer that
sends HEADERS and never DATA held each such stream (and ~20 KB with it) for as long as it
liked, unauthenticated. The broker's own methods are therefore served by request-streaming
handlers (`Handlers`, broker/api/handlers.py) that check the credential when the HEADERS
arrive and read the message with `first_message`; `within` does the same for handlers
the broker does not write (health). grpc.aio has no per-connection or per-peer hook before
a handler runs: per connection, `grpc.max_concurrent_streams` is core's
(broker/server/broker.py); per peer address, `PeerStreams` counts the streams in handlers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from broker.core.errors import InvalidArgument, Unavailable

Context = grpc.aio.ServicerContext[Any, Any]
#: how soon a peer refused for its stream count is told to come back
PEER_RETRY_MS = 1000


async def first_message(context: Context, timeout_s: float) -> bytes:
    """The call's request message, or INVALID_ARGUMENT if it is not there within
    `timeout_s` (or the call was half-closed without one)."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await context.read()
    except TimeoutError:
        raise InvalidArgument(f"no request message within {timeout_s:g}s") from None
    if raw is grpc.aio.EOF:
        raise InvalidArgument("the call ended without a request message")
    return raw  # type: ignore[no-any-return]


def peer_host(peer: str) -> str:
    """The address part of grpc's peer string: "ipv4:10.0.0.7:5123" -> "10.0.0.7",
    "ipv6:[::1]:5123" -> "[::1]"; anything else (a unix socket) as it is."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer[5:].rpartition(":")[0]
    return peer


class PeerStreams:
    """Open calls per peer address (every method: car streams, service calls, watches).

    Past `limit` (0: no limit) a new call is refused with UNAVAILABLE and a retry hint
    before anything else runs. Behind a proxy every call has the proxy's address, so
    there the limit belongs in the proxy (docs/operations.md).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self.refused = 0

    def enter(self, context: Context) -> str:
        """Count one more call for the caller's address; returns the key to `leave`."""
        host = peer_host(context.peer() or "")
        count = self._open.get(host, 0)
        if self.limit and count >= self.limit:
            self.refused += 1
            raise Unavailable(
                f"too many open calls from {host} ({self.limit}); retry later",
                retry_after_ms=PEER_RETRY_MS,
            )
        self._open[host] = count + 1
        return host

    def leave(self, host: str) -> None:
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
        else:
            self._open.pop(host, None)

    def open_calls(self, host: str) -> int:
        return self._open.get(host, 0)


def within(handler: grpc.RpcMethodHandler[Any, Any], timeout_s: float) -> Any:
    """`handler` (unary request) served as a request-streaming handler whose message must
    arrive within `timeout_s`; request-streaming handlers are returned as they are."""
    if handler.request_streaming:
        return handler
    deserialize: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)

    async def request(context: Context) -> Any:
        try:
            return deserialize(await first_message(context, timeout_s))
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

    if not handler.response_streaming:
        unary: Any = handler.unary_unary

        async def unary_handler(requests: Any, context: Context) -> Any:
            return await unary(await request(context), context)

        return grpc.stream_unary_rpc_method_handler(
            unary_handler, response_serializer=handler.response_serializer
        )
    streaming: Any = handler.unary_stream

    async def streaming_handler(requests: Any, context: Context) -> AsyncIterator[Any]:
        result = streaming(await request(context), context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:
            await result  # writes through the context itself

    return grpc.stream_stream_rpc_method_handler(
        streaming_handler, response_serializer=handler.response_serializer
    )


def health_handler(servicer: Any, timeout_s: float) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health (open to everyone, so bounded like the rest) over `servicer`."""
    methods = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {name: within(h, timeout_s) for name, h in methods.items()}
    )
