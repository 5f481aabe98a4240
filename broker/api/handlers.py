"""The one wrapper every gRPC method goes through: authenticate, parse, map errors.

Each servicer method is written as `request, principal -> response`; `unary`,
`server_stream` and `bidi` turn it into a grpc method handler that

* counts the call against its peer address's open calls (`PeerStreams`),
* authenticates the call's metadata (and checks the method's scope) as soon as its
  HEADERS arrive, and waits at most `first_message_timeout_s` for the request message
  (unary methods are served as request-streaming handlers for that: grpc.aio would run a
  unary handler only once the message arrived, however long that took; see
  broker/api/limits.py),
* parses the request bytes itself, so a malformed message is INVALID_ARGUMENT rather
  than grpc's INTERNAL,
* ends the call with the status a `BrokerError` names, its retry hint as the
  `grpc-retry-pushback-ms` trailer, and anything unexpected as INTERNAL, logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from broker.api.limits import PeerStreams, first_message
from broker.core.errors import BrokerError, InvalidArgument, PermissionDenied
from broker.security import tls
from broker.security.auth import Authenticator, Principal
from broker.wire import PUSHBACK_KEY

logger = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
#: the part of a caller's deadline kept for the reply to reach it
DEADLINE_MARGIN_S = 0.05


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...


def parse(message_type: Callable[..., Request], raw: bytes) -> Request:
    try:
        return message_type.FromString(raw)  # type: ignore[attr-defined, no-any-return]
    except Exception:  # protobuf's DecodeError, or worse for hostile bytes
        name = message_type.DESCRIPTOR.name  # type: ignore[attr-defined]
        raise InvalidArgument(f"malformed {name} message") from None


def serialize(message: Message) -> bytes:
    return bytes(message.SerializeToString())


async def abort(context: Context, error: BrokerError) -> None:
    """End the call with the error's status; a retry hint travels as the pushback trailer."""
    if error.retry_after_ms is not None:
        context.set_trailing_metadata(((PUSHBACK_KEY, str(error.retry_after_ms)),))
    await context.abort(grpc.StatusCode[error.code], error.message)


async def fail(context: Context, error: Exception, what: str) -> None:
    """End the call for what its method raised: a `BrokerError` with the status it
    names, anything else as INTERNAL (logged once). Every handler's `except` calls this.

    (Not a context manager: one would keep a generator frame alive per vehicle stream,
    measured at ~1 KB a car.)"""
    if isinstance(error, BrokerError):
        await abort(context, error)
        return
    logger.error("unexpected error in %s", what, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")


def deadline_s(context: Context) -> float:
    """The caller's deadline on our monotonic clock (0: none), less a margin for the
    reply's way back: work finished after it is work the caller gave up on."""
    remaining_s = context.time_remaining()
    if remaining_s is None:
        return 0.0
    return time.monotonic() + remaining_s - DEADLINE_MARGIN_S


class Handlers:
    """Builds method handlers around one `Authenticator`.

    `peer_certificates`: the port verifies client certificates (mTLS). A car's identity
    then comes from its certificate (`vehicle_identity`), and a car's certificate cannot
    call the command service, whatever token it sends."""

    def __init__(
        self,
        auth: Authenticator,
        *,
        peer_certificates: bool = False,
        first_message_timeout_s: float = 10.0,
        peers: PeerStreams | None = None,
    ) -> None:
        self.auth = auth
        self.peer_certificates = peer_certificates
        self.first_message_timeout_s = first_message_timeout_s
        self.peers = peers or PeerStreams(0)

    def peer(self, context: Context) -> tuple[str, str] | None:
        """("vehicle" | "service", name) from the verified client certificate, or None."""
        if not self.peer_certificates:
            return None
        return tls.peer_identity(context.auth_context())

    def principal(self, context: Context, scope: str | None) -> Principal:
        if scope is not None:
            peer = self.peer(context)
            if peer is not None and peer[0] == "vehicle":
                raise PermissionDenied(
                    f"a vehicle certificate ({peer[1]!r}) cannot call the command service"
                )
        principal = self.auth.authenticate(context.invocation_metadata())
        if scope is not None:
            principal.require(scope)
        return principal

    def unary(
        self,
        method: Callable[[Request, Principal, float], Awaitable[Message]],
        scope: str,
        request_type: Callable[..., Request],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        what = method.__name__

        async def handle(requests: AsyncIterator[bytes], context: Context) -> Message | None:
            host = None
            try:
                host = self.peers.enter(context)
                principal = self.principal(context, scope)
                raw = await first_message(context, self.first_message_timeout_s)
                return await method(parse(request_type, raw), principal, deadline_s(context))
            except Exception as exc:
                await fail(context, exc, what)
                return None  # not reached: fail() ends the call
            finally:
                if host is not None:
                    self.peers.leave(host)

        return grpc.stream_unary_rpc_method_handler(handle, response_serializer=serialize)

    def server_stream(
        self,
        method: Callable[[Request, Principal], AsyncIterator[Message]],
        scope: str,
        request_type: Callable[..., Request],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        what = method.__name__

        async def handle(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[Message]:
            host = None
            try:
                host = self.peers.enter(context)
                principal = self.principal(context, scope)
                raw = await first_message(context, self.first_message_timeout_s)
                async for item in method(parse(request_type, raw), principal):
                    yield item
            except Exception as exc:
                await fail(context, exc, what)
            finally:
                if host is not None:
                    self.peers.leave(host)

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=serialize)

    def bidi(self, method: Callable[[Context], Awaitable[None]]) -> grpc.RpcMethodHandler[Any, Any]:
        """A stream whose method reads and writes through the context itself (it
        authenticates with `principal`, since what it needs depends on the caller)."""
        what = method.__name__

        async def handle(requests: AsyncIterator[bytes], context: Context) -> None:
            host = None
            try:
                host = self.peers.enter(context)
                await method(context)
            except Exception as exc:
                await fail(context, exc, what)
            finally:
                if host is not None:
                    self.peers.leave(host)

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=serialize)
