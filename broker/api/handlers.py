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
  `grpc-retry-pushback-ms` trailer, and anything unexpected as INTERNAL, logged once,
* records every refusal (`DENIALS`) in the audit trail: who (the principal, or the
  peer's address before it proved anything), which method, which status and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from broker.api.limits import PeerStreams, first_message, peer_host
from broker.core.audit import AuditTrail, NullAuditTrail
from broker.core.errors import (
    BrokerError,
    InvalidArgument,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)
from broker.security import tls
from broker.security.auth import Authenticator, Principal
from broker.wire import PUSHBACK_KEY

logger = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
#: the part of a caller's deadline kept for the reply to reach it
DEADLINE_MARGIN_S = 0.05
#: the refusals the audit trail records as `deny`: no or a bad credential, no right, the
#: caller's quota, overload (shed, stream gate, store short of room, too many calls)
DENIALS = (Unauthenticated, PermissionDenied, QuotaExceeded, Unavailable)


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


def rpc_name(what: str) -> str:
    """The RPC a servicer method serves: send_command -> SendCommand."""
    return "".join(part.capitalize() for part in what.split("_"))


class Call:
    """Who a stream turned out to be, as far as it got (for the audit record of its
    refusal): the method fills it in once it knows."""

    __slots__ = ("principal", "vehicle_id")

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.vehicle_id = ""


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
        audit: AuditTrail | None = None,
    ) -> None:
        self.auth = auth
        self.peer_certificates = peer_certificates
        self.first_message_timeout_s = first_message_timeout_s
        self.peers = peers or PeerStreams(0)
        self.audit = audit or NullAuditTrail()

    def peer(self, context: Context) -> tuple[str, str] | None:
        """("vehicle" | "service", name) from the verified client certificate, or None."""
        if not self.peer_certificates:
            return None
        return tls.peer_identity(context.auth_context())

    def principal(self, context: Context, scope: str | None) -> Principal:
        principal = self.identify(context, scope)
        if scope is not None:
            principal.require(scope)
        return principal

    def identify(self, context: Context, scope: str | None) -> Principal:
        """Who calls (its scope not checked yet)."""
        if scope is not None:
            peer = self.peer(context)
            if peer is not None and peer[0] == "vehicle":
                raise PermissionDenied(
                    f"a vehicle certificate ({peer[1]!r}) cannot call the command service"
                )
        return self.auth.authenticate(context.invocation_metadata())

    def denied(
        self,
        context: Context,
        error: Exception,
        method: str,
        principal: Principal | None = None,
        request: object = None,
        vehicle_id: str = "",
    ) -> None:
        """Record a refusal (`DENIALS`) in the audit trail; anything else is not one.
        The actor is the principal, else the client certificate's name, else
        `peer:<address>` (a token that did not verify names no one)."""
        if not isinstance(error, DENIALS):
            return
        try:
            peer = context.peer() or ""
            if principal is not None:
                actor = principal.actor
            else:
                certificate = self.peer(context)
                actor = f"{certificate[0]}:{certificate[1]}" if certificate else ""
                actor = actor or f"peer:{peer_host(peer)}"
            command_id = ""
            if request is not None:
                vehicle_id = vehicle_id or _text(getattr(request, "vehicle_id", ""))
                command_id = _text(getattr(request, "command_id", ""))
            self.audit.deny(
                actor, error.code, method, peer=peer, reason=error.message,
                vehicle_id=vehicle_id, command_id=command_id,
            )  # fmt: skip
        except Exception:  # the audit trail never fails a call
            logger.exception("could not record a refusal of %s", method)

    def unary(
        self,
        method: Callable[[Request, Principal, float], Awaitable[Message]],
        scope: str,
        request_type: Callable[..., Request],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        what = method.__name__
        rpc = rpc_name(what)

        async def handle(requests: AsyncIterator[bytes], context: Context) -> Message | None:
            host = None
            principal: Principal | None = None
            request: object = None
            try:
                host = self.peers.enter(context)
                principal = self.identify(context, scope)
                principal.require(scope)
                raw = await first_message(context, self.first_message_timeout_s)
                request = parsed = parse(request_type, raw)
                return await method(parsed, principal, deadline_s(context))
            except Exception as exc:
                self.denied(context, exc, rpc, principal, request)
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
        rpc = rpc_name(what)

        async def handle(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[Message]:
            host = None
            principal: Principal | None = None
            request: object = None
            try:
                host = self.peers.enter(context)
                principal = self.identify(context, scope)
                principal.require(scope)
                raw = await first_message(context, self.first_message_timeout_s)
                request = parsed = parse(request_type, raw)
                async for item in method(parsed, principal):
                    yield item
            except Exception as exc:
                self.denied(context, exc, rpc, principal, request)
                await fail(context, exc, what)
            finally:
                if host is not None:
                    self.peers.leave(host)

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=serialize)

    def bidi(
        self, method: Callable[[Context, Call], Awaitable[None]]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A stream whose method reads and writes through the context itself (it
        authenticates with `principal`, since what it needs depends on the caller, and
        says who it was in the `Call` for the audit record of a refusal)."""
        what = method.__name__
        rpc = rpc_name(what)

        async def handle(requests: AsyncIterator[bytes], context: Context) -> None:
            host = None
            call = Call()
            try:
                host = self.peers.enter(context)
                await method(context, call)
            except Exception as exc:
                self.denied(context, exc, rpc, call.principal, vehicle_id=call.vehicle_id)
                await fail(context, exc, what)
            finally:
                if host is not None:
                    self.peers.leave(host)

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=serialize)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
