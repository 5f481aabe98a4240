"""VehicleLink.Connect over gRPC: moves a car's frames between the stream and
`broker.core.stream` (which decides everything about them)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from broker.api.handlers import Call, Context, Handlers
from broker.config import Config
from broker.core.commands import check_id
from broker.core.errors import BrokerError, InvalidArgument, PermissionDenied, Unavailable
from broker.core.stream import OUTBOX_BATCH, Links, VehicleStream, parse_hello
from broker.security.auth import Hold, Principal
from broker.v1 import vehicle_link_pb2 as link
from broker.wire import VEHICLE_ID_HEADER

logger = logging.getLogger(__name__)

SERVICE = link.DESCRIPTOR.services_by_name["VehicleLink"].full_name


class VehicleLink:
    def __init__(self, config: Config, handlers: Handlers, links: Links) -> None:
        self._config = config
        self._handlers = handlers
        self._links = links

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Connect": self._handlers.bidi(self.connect)}
        )

    async def connect(self, context: Context, call: Call) -> None:
        opened = await self._handshake(context, call)
        if opened is None:
            return
        stream, hold = opened
        session = stream.session
        try:
            reader = asyncio.create_task(self._read(context, stream))
            try:
                await self._write(context, stream)
            finally:
                reader.cancel()
        finally:
            hold.release()
            await self._links.close(stream)
        if session.close_error is not None:
            raise session.close_error

    async def _handshake(self, context: Context, call: Call) -> tuple[VehicleStream, Hold] | None:
        """Hello in, Welcome out, the car's queue on its way; None if the car hung up first.
        The hold ends the stream (UNAUTHENTICATED) when the car's token expires or is revoked.

        A function of its own so that what the handshake parsed and built is freed before
        the stream settles down for hours (every byte here is multiplied by the fleet).
        """
        metadata = context.invocation_metadata() or ()
        claimed = next((str(v) for k, v in metadata if k == VEHICLE_ID_HEADER), None)
        vehicle_id, principal = self._identity(context, claimed, call)
        check_id("vehicle id", vehicle_id)
        call.vehicle_id = vehicle_id
        timeout_s = self._config.hello_timeout_s
        try:
            first = await asyncio.wait_for(context.read(), timeout_s)
        except TimeoutError:
            raise InvalidArgument(f"no Hello frame within {timeout_s}s") from None
        if first is grpc.aio.EOF:
            return None
        hello = parse_hello(first)
        stream, welcome = await self._links.open(vehicle_id, hello)
        hold = self._handlers.auth.hold(principal, stream.session.close)
        try:
            await context.write(welcome)
            stream.session.task = asyncio.current_task()
            self._links.connected(stream, hello)
        except BaseException:
            hold.release()
            await self._links.close(stream)
            raise
        return stream, hold

    def _identity(self, context: Context, claimed: str | None, call: Call) -> tuple[str, Principal]:
        """The car's id: from its verified certificate on an mTLS port (a different id
        claimed in metadata is refused), else from its token (or, in insecure-dev mode,
        the metadata); and the principal whose credential the stream holds (in `call`
        as soon as it is known, for the audit record of a refusal)."""
        peer = self._handlers.peer(context)
        if peer is None:
            call.principal = principal = self._handlers.principal(context, None)
            return self._handlers.auth.vehicle_identity(principal, claimed), principal
        kind, name = peer
        if kind != "vehicle":
            raise PermissionDenied(f"a {kind} certificate ({name!r}) cannot open a vehicle stream")
        if claimed is not None and claimed != name:
            raise PermissionDenied(
                f"this certificate is for vehicle {name!r}; it cannot open {claimed[:80]!r}"
            )
        call.principal = principal = Principal("vehicle", name)
        return name, principal

    async def _write(self, context: Context, stream: VehicleStream) -> None:
        session = stream.session
        deliver = self._links.deliver
        while True:
            batch = await session.outbox.take(OUTBOX_BATCH)
            # The commands among them are recorded as delivered in one durable write;
            # every frame keeps its place in the stream's order.
            to_record = stream.to_record(batch)
            attempts = await deliver(session, to_record) if to_record else {}
            for frame in stream.outgoing(batch, attempts):
                if frame is None:
                    return
                await context.write(frame)

    async def _read(self, context: Context, stream: VehicleStream) -> None:
        session = stream.session
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    session.close()
                    return
                pause_s = stream.received(raw)
                if pause_s > 0:
                    await asyncio.sleep(pause_s)
        except BrokerError as exc:
            session.close(exc)
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError) as exc:
            logger.debug("vehicle %s stream read ended: %r", session.vehicle_id, exc)
            session.close()  # the car vanished
        except Exception:
            logger.exception("vehicle %s: unexpected error reading its stream", session.vehicle_id)
            session.close(Unavailable("internal error on this stream (logged); reconnect"))
