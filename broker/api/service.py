"""The gRPC face: servicers that translate protobuf <-> domain calls, nothing more.

Every method goes through one wrapper (`_unary` / `_server_stream` / `_bidi`) that
authenticates, parses the request bytes itself (so a malformed message is
INVALID_ARGUMENT, not grpc's INTERNAL), and maps `BrokerError`s to their status.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from broker.config import Config
from broker.core.admission import Admission, Overloaded
from broker.core.clock import now_ms
from broker.core.dispatch import Dispatcher
from broker.core.errors import (
    BrokerError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
    Unavailable,
    retry_hint_ms,
)
from broker.core.events import EventHub
from broker.core.sessions import CLOSE, Session, StreamGate
from broker.core.state import VehicleStates, check_signals
from broker.core.telemetry import TelemetryGuard, TelemetryPolicyValues, Verdict
from broker.security.auth import Authenticator, Principal
from broker.storage.lmdb_store import TERMINAL, NewCommand, Store
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker.wire import PUSHBACK_KEY, VEHICLE_ID_HEADER

logger = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
KEY_MAX = 128
DELIVERED_OR_LATER = frozenset({t.DELIVERED, t.ACKED}) | TERMINAL
LANES = frozenset(t.Lane.values())
WAIT_MODES = frozenset(svc.WaitMode.values())


def check_id(what: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{what} must be 1-64 characters of letters, digits and _.:- (got {value[:80]!r})"
        )
    return value


def _parse(message_type: Any, raw: bytes) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"malformed {message_type.DESCRIPTOR.name} message") from None


class Servicer:
    """CommandService and VehicleLink over the domain objects."""

    def __init__(
        self,
        config: Config,
        auth: Authenticator,
        store: Store,
        dispatcher: Dispatcher,
        events: EventHub,
        states: VehicleStates,
        stream_gate: StreamGate,
        guard: TelemetryGuard,
        admission: Admission,
    ) -> None:
        self._admission = admission
        self._config = config
        self._stream_gate = stream_gate
        self._guard = guard
        self._auth = auth
        self._store = store
        self._dispatcher = dispatcher
        self._events = events
        self._states = states

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(
                "broker.v1.CommandService",
                {
                    "SendCommand": self._unary(self.send_command, "send", svc.SendCommandRequest),
                    "SendCommands": self._unary(
                        self.send_commands, "send", svc.SendCommandsRequest
                    ),
                    "GetCommand": self._unary(self.get_command, "read", svc.GetCommandRequest),
                    "CancelCommand": self._unary(
                        self.cancel_command, "send", svc.CancelCommandRequest
                    ),
                    "ListCommands": self._unary(
                        self.list_commands, "read", svc.ListCommandsRequest
                    ),
                    "WatchCommands": self._server_stream(
                        self.watch_commands, "read", svc.WatchCommandsRequest
                    ),
                    "GetVehicleState": self._unary(
                        self.get_vehicle_state, "read", svc.GetVehicleStateRequest
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "broker.v1.VehicleLink",
                {
                    "Connect": grpc.stream_stream_rpc_method_handler(
                        self._connect_entry, response_serializer=_serialize
                    )
                },
            ),
        ]

    # -- the one wrapper -------------------------------------------------------------------

    def _principal(self, context: Context, scope: str | None) -> Principal:
        principal = self._auth.authenticate(context.invocation_metadata())
        if scope is not None:
            principal.require(scope)
        return principal

    def _unary(
        self,
        method: Callable[[Any, Principal, float], Awaitable[Any]],
        scope: str,
        request_type: Any,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(raw: bytes, context: Context) -> Any:
            try:
                principal = self._principal(context, scope)
                remaining_s = context.time_remaining()
                # The caller's deadline on our clock (0: none), less a margin for the
                # reply's way back: work finished after it is work the caller gave up on.
                deadline_s = (
                    time.monotonic() + remaining_s - DEADLINE_MARGIN_S
                    if remaining_s is not None
                    else 0.0
                )
                return await method(_parse(request_type, raw), principal, deadline_s)
            except BrokerError as exc:
                await _abort(context, exc)
            except Exception:
                logger.exception("unexpected error in %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=_serialize)

    def _server_stream(
        self,
        method: Callable[[Any, Principal], AsyncIterator[Any]],
        scope: str,
        request_type: Any,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(raw: bytes, context: Context) -> AsyncIterator[Any]:
            try:
                principal = self._principal(context, scope)
                async for item in method(_parse(request_type, raw), principal):
                    yield item
            except BrokerError as exc:
                await _abort(context, exc)
            except Exception:
                logger.exception("unexpected error in %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=_serialize)

    # -- CommandService ----------------------------------------------------------------------

    def _new_command(self, request: Any, principal: Principal, deadline_s: float) -> NewCommand:
        check_id("vehicle_id", request.vehicle_id)
        if not NAME_PATTERN.fullmatch(request.name):
            raise InvalidArgument(
                f"name must be 1-64 characters of a-z, 0-9 and _.- starting with a letter "
                f"(got {request.name[:80]!r})"
            )
        if len(request.payload) > self._config.max_payload_bytes:
            raise InvalidArgument(
                f"payload is {len(request.payload)} bytes; the limit is "
                f"{self._config.max_payload_bytes}"
            )
        for what, key in (("idempotency_key", request.idempotency_key),
                          ("coalesce_key", request.coalesce_key)):  # fmt: skip
            if len(key.encode()) > KEY_MAX:  # LMDB keys are bytes, at most 511 of them
                raise InvalidArgument(f"{what} is longer than {KEY_MAX} bytes")
        policy = self._config.policy(request.name)
        lane = request.lane
        if lane == t.LANE_UNSPECIFIED:
            lane = policy.lane
        elif lane not in LANES:
            raise InvalidArgument(f"unknown lane {lane}; use BULK, INTERACTIVE or CRITICAL")
        elif lane > policy.lane and not (principal.kind == "dev" or "admin" in principal.scopes):
            raise PermissionDenied(
                f"{request.name!r} runs on the {t.Lane.Name(policy.lane)} lane; raising it to "
                f"{t.Lane.Name(lane)} needs the admin scope"
            )
        max_ttl_s = (
            self._config.critical_max_ttl_s if lane == t.CRITICAL else self._config.max_ttl_s
        )
        ttl_ms = request.ttl_ms or int(min(policy.ttl_s, max_ttl_s) * 1000)
        if ttl_ms > max_ttl_s * 1000:
            raise InvalidArgument(
                f"ttl of {ttl_ms / 1000:g}s is above the {max_ttl_s:g}s allowed on the "
                f"{t.Lane.Name(lane)} lane"
            )
        if request.wait not in WAIT_MODES:
            raise InvalidArgument(f"unknown wait mode {request.wait}")
        commit_by_s = deadline_s
        if lane == t.CRITICAL:
            bound_s = time.monotonic() + self._config.critical_commit_wait_s
            commit_by_s = min(commit_by_s, bound_s) if commit_by_s else bound_s
        if commit_by_s and commit_by_s <= time.monotonic():
            raise DeadlineExceeded("the call's deadline leaves no time to make it durable")
        return NewCommand(
            vehicle_id=request.vehicle_id,
            name=request.name,
            payload=request.payload,
            lane=lane,
            ttl_ms=ttl_ms,
            idempotency_key=request.idempotency_key,
            idempotency_scope=f"{principal.kind}:{principal.name}",
            coalesce_key=request.coalesce_key,
            commit_by_s=commit_by_s,
        )

    async def send_command(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        item = self._new_command(request, principal, deadline_s)
        wait_s = (request.wait_timeout_ms / 1000) or self._config.default_wait_timeout_s
        if wait_s > self._config.max_wait_timeout_s:
            raise InvalidArgument(f"wait_timeout_ms is above {self._config.max_wait_timeout_s}s")
        self._check_queue_budget(item.lane)
        async with self._admission.slot(item.lane, vehicle_id=item.vehicle_id):
            (result,) = await self._dispatcher.submit([item])
        if isinstance(result, BrokerError):
            raise result
        response = svc.SendCommandResponse(command=result.command, deduplicated=result.deduplicated)
        if request.wait == svc.WAIT_NONE:
            return response
        wanted = TERMINAL if request.wait == svc.WAIT_RESULT else DELIVERED_OR_LATER
        command, timed_out = await self._wait(result.command, wanted, wait_s)
        response.command.CopyFrom(command)
        response.wait_timed_out = timed_out
        return response

    def _check_queue_budget(self, lane: int) -> None:
        """Degrade by lane as the durable queue fills: bulk is refused first, critical never
        for depth. Short of disk or map room, every lane is refused (critical last)."""
        problem = self._store.space_problem(critical=lane == t.CRITICAL)
        if problem is not None:
            raise StoreUnavailable(
                f"new commands are refused: {problem}; nothing accepted is lost",
                retry_after_ms=retry_hint_ms(2.0, 10.0),
            )
        budget = self._config.durable_queue_budget
        pending = self._dispatcher.pending_total
        if lane == t.CRITICAL or pending < budget * (0.8 if lane == t.BULK else 1.0):
            return
        raise Overloaded(
            f"the durable queue holds {pending} commands (budget {budget}); "
            f"{t.Lane.Name(lane)} commands are refused until it drains",
            retry_after_ms=int(random.uniform(500, 2000)),
        )

    async def _wait(
        self, command: Any, wanted: frozenset[int], timeout_s: float
    ) -> tuple[Any, bool]:
        """Wait for `command` to reach a status in `wanted`; a timeout is an answer too."""
        if command.status in wanted:
            return command, False
        future = self._events.waiter(command.command_id, lambda c: c.status in wanted)
        try:
            # The status may have moved on between the store write and the waiter.
            current = self._dispatcher.current(command.vehicle_id, command.command_id)
            if current is None:  # no longer pending in memory: terminal, ask the store
                current = await self._store.get(command.command_id)
            if current.status in wanted:
                return current, False
            reached = await asyncio.wait_for(future, timeout_s)
            if reached is not None:
                return reached, False
            # Shutting down: answer now with where the command is (it is durable).
            latest = self._dispatcher.current(command.vehicle_id, command.command_id)
            return latest or current, True
        except TimeoutError:
            return await self._store.get(command.command_id), True
        finally:
            self._events.forget(command.command_id, future)

    async def send_commands(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        count = len(request.commands)
        if count == 0 or count > self._config.max_batch:
            raise InvalidArgument(
                f"a batch holds 1 to {self._config.max_batch} commands, not {count}"
            )
        # Items are built in place in the reply (a list handed to the constructor would be
        # copied item by item).
        response = svc.SendCommandsResponse()
        items = response.items
        valid: list[tuple[Any, NewCommand]] = []
        take_quota = self._admission.take_critical_quota
        for sub in request.commands:
            slot = items.add()
            try:
                if sub.wait != svc.WAIT_NONE:
                    raise InvalidArgument("wait modes are not allowed in a batch; use SendCommand")
                item = self._new_command(sub, principal, deadline_s)
                self._check_queue_budget(item.lane)
                if item.lane == t.CRITICAL:
                    take_quota(item.vehicle_id)
                valid.append((slot, item))
            except BrokerError as exc:
                slot.error.code = exc.code
                slot.error.message = exc.message
        if not valid:
            return response
        # One durable write, admitted once, in the highest lane it carries.
        async with self._admission.slot(max(item.lane for _, item in valid)):
            results = await self._dispatcher.submit([item for _, item in valid])
        for (slot, _), result in zip(valid, results, strict=True):
            if isinstance(result, BrokerError):
                slot.error.code = result.code
                slot.error.message = result.message
            else:
                accepted = slot.accepted
                accepted.command.CopyFrom(result.command)
                accepted.command.ClearField("payload")  # keep replies small
                accepted.deduplicated = result.deduplicated
        return response

    # Reads are admitted like commands (polling floods are shed before they can delay
    # an unlock's durable write): single reads on the interactive lane, listings on bulk.

    async def get_command(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        command_id = self._command_id(request.command_id)
        async with self._admission.slot(t.INTERACTIVE):
            return await self._store.get(command_id)

    async def cancel_command(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        return await self._dispatcher.cancel(self._command_id(request.command_id))

    def _command_id(self, command_id: str) -> str:
        if not command_id or len(command_id) > 64:
            raise InvalidArgument("command_id must be 1-64 characters")
        if not ID_PATTERN.fullmatch(command_id):
            raise NotFound(f"no command {command_id[:80]!r}")
        return command_id

    async def list_commands(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        check_id("vehicle_id", request.vehicle_id)
        limit = request.limit or 100
        if limit > 1000:
            raise InvalidArgument("limit is at most 1000")
        async with self._admission.slot(t.BULK):
            commands = await self._store.list_vehicle(request.vehicle_id, limit=limit)
        return svc.ListCommandsResponse(commands=commands)

    async def watch_commands(self, request: Any, principal: Principal) -> AsyncIterator[Any]:
        for vehicle_id in request.vehicle_ids:
            check_id("vehicle_ids", vehicle_id)
        if len(request.vehicle_ids) + len(request.command_ids) > 10_000:
            raise InvalidArgument("watch at most 10000 vehicles and commands in one stream")
        async for command in self._events.watch(request.vehicle_ids, request.command_ids):
            yield command

    async def get_vehicle_state(self, request: Any, principal: Principal, deadline_s: float) -> Any:
        check_id("vehicle_id", request.vehicle_id)
        async with self._admission.slot(t.INTERACTIVE):
            return await self._states.get(request.vehicle_id)

    # -- VehicleLink ---------------------------------------------------------------------------

    async def _connect_entry(self, requests: AsyncIterator[bytes], context: Context) -> None:
        try:
            await self._connect(context)
        except BrokerError as exc:
            await _abort(context, exc)
        except Exception:
            logger.exception("unexpected error on a vehicle stream")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")

    async def _connect(self, context: Context) -> None:
        session = await self._handshake(context)
        if session is None:
            return
        try:
            reader = asyncio.create_task(self._read_frames(context, session))
            try:
                await self._write_frames(context, session)
            finally:
                reader.cancel()
        finally:
            await self._release(session)
        if session.close_error is not None:
            raise session.close_error

    async def _release(self, session: Session) -> None:
        vehicle_id = session.vehicle_id
        if self._dispatcher.disconnect(session):  # no stream left for this car
            leftover = self._guard.forget(vehicle_id)
            if leftover:
                self._states.report(vehicle_id, leftover, now_ms())
        await self._states.detach(vehicle_id)

    async def _handshake(self, context: Context) -> Session | None:
        """Hello in, Welcome out, the car's queue on its way; None if the car hung up.

        A function of its own so that what the handshake parsed and built is freed before
        the stream settles down for hours (every byte here is multiplied by the fleet).
        """
        metadata = context.invocation_metadata() or ()
        principal = self._principal(context, None)
        claimed = next((str(v) for k, v in metadata if k == VEHICLE_ID_HEADER), None)
        vehicle_id = check_id("vehicle id", self._auth.vehicle_identity(principal, claimed))
        try:
            first = await asyncio.wait_for(context.read(), self._config.hello_timeout_s)
        except TimeoutError:
            raise InvalidArgument(
                f"no Hello frame within {self._config.hello_timeout_s}s"
            ) from None
        if first is grpc.aio.EOF:
            return None
        hello_frame = _parse(link.VehicleFrame, first)
        if hello_frame.WhichOneof("kind") != "hello":
            raise InvalidArgument("the first frame on a vehicle stream must be Hello")
        # Admitted after the Hello, so a token is never spent on a stream that dies first.
        self._stream_gate.admit()
        session = Session(vehicle_id, now_ms=now_ms())
        session.task = asyncio.current_task()
        session.heartbeats = hello_frame.hello.sends_heartbeats
        await self._states.attach(vehicle_id)
        try:
            self._states.seen(vehicle_id, session.connected_since_ms)
            policy = self._guard.welcome_policy(vehicle_id, time.monotonic())
            welcome = link.Welcome(
                session_id=session.session_id,
                server_time_ms=now_ms(),
                telemetry_policy=link.TelemetryPolicy(**policy._asdict()),
                window=self._config.window,
                heartbeat_interval_ms=int(self._config.heartbeat_interval_s * 1000),
                liveness_timeout_ms=int(self._config.liveness_timeout_s * 1000),
            )
            await context.write(link.BrokerFrame(welcome=welcome))
        except BaseException:
            await self._release(session)
            raise
        self._dispatcher.connect(session, hello_frame.hello.recent_command_ids)
        return session

    def _take_telemetry(self, session: Session, raw: bytes, received_ms: int) -> Verdict:
        """Judge a telemetry/state batch before parsing it (a shed batch costs a counter,
        not a parse); apply it now, buffer it for the next flush, or drop it."""
        vehicle_id = session.vehicle_id
        verdict, policy = self._guard.offer(vehicle_id, len(raw), time.monotonic())
        if verdict is Verdict.ADMIT or verdict is Verdict.COALESCE:
            frame = _parse(link.VehicleFrame, raw)
            kind = frame.WhichOneof("kind")
            signals = frame.telemetry.signals if kind == "telemetry" else frame.state.fields
            if verdict is Verdict.ADMIT:
                self._states.report(vehicle_id, signals, received_ms)
            else:
                check_signals(signals)
                self._guard.coalesce(vehicle_id, signals, received_ms)
        if policy is not None:
            session.send(telemetry_control(policy))
        return verdict

    async def _write_frames(self, context: Context, session: Session) -> None:
        while True:
            frames = await session.outbox.take(OUTBOX_BATCH)
            # The commands among them are recorded as delivered in one durable write; every
            # frame keeps its place in the stream's order.
            commands = [f.command for f in frames if f is not CLOSE and f.HasField("command")]
            recorded = session.recorded or set()  # created DELIVERED: nothing to record
            to_record = [c for c in commands if c.command_id not in recorded]
            sendable = await self._dispatcher.deliver(session, to_record) if to_record else ()
            for frame in frames:
                if frame is CLOSE:
                    return
                if frame.HasField("command"):
                    command_id = frame.command.command_id
                    if command_id in recorded:
                        recorded.discard(command_id)
                    elif command_id not in sendable:
                        continue  # canceled, superseded or expired meanwhile, or closing
                    if frame.command.expires_at_ms <= now_ms():
                        continue  # a slow write held it past its TTL: never on the wire
                await context.write(frame)

    async def _read_frames(self, context: Context, session: Session) -> None:
        vehicle_id = session.vehicle_id
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    session.close()
                    return
                received = now_ms()
                session.last_heard_s = time.monotonic()
                self._states.seen(vehicle_id, received)
                if raw == HEARTBEAT:
                    continue
                if raw[:1] in TELEMETRY_TAGS:
                    if self._take_telemetry(session, raw, received) is not Verdict.ADMIT:
                        # Over its budget: read it no faster than the budget refills, so
                        # HTTP/2 flow control slows the car's writes (see read_pause_s).
                        pause_s = self._guard.read_pause_s(vehicle_id)
                        if pause_s > 0:
                            await asyncio.sleep(pause_s)
                    continue
                frame = _parse(link.VehicleFrame, raw)
                kind = frame.WhichOneof("kind")
                if kind == "ack":
                    self._dispatcher.acked(vehicle_id, check_id("command_id", frame.ack.command_id))
                elif kind == "result":
                    result = frame.result
                    check_id("command_id", result.command_id)
                    if len(result.message) > 1024 or len(result.detail) > 16384:
                        raise InvalidArgument("result message/detail too large")
                    self._dispatcher.result(
                        vehicle_id,
                        result.command_id,
                        success=result.success,
                        message=result.message,
                        detail=result.detail,
                    )
                elif kind == "heartbeat":
                    pass  # one with fields a newer car added: heard, nothing else to do
                elif kind == "hello":
                    raise InvalidArgument("Hello is only allowed as the first frame")
                else:
                    raise InvalidArgument("empty or unknown vehicle frame")
        except BrokerError as exc:
            session.close(exc)
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError) as exc:
            logger.debug("vehicle %s stream read ended: %r", vehicle_id, exc)  # car vanished
            session.close()
        except Exception:
            logger.exception("vehicle %s: unexpected error reading its stream", vehicle_id)
            session.close(Unavailable("internal error on this stream (logged); reconnect"))


#: at most this many queued frames are taken (and their deliveries recorded) at once
OUTBOX_BATCH = 64
#: first byte of a serialized VehicleFrame holding `telemetry` (field 4) or `state` (field 5)
TELEMETRY_TAGS = (b"\x22", b"\x2a")
#: a serialized VehicleFrame holding an empty Heartbeat (field 6): nothing to parse
HEARTBEAT = link.VehicleFrame(heartbeat=link.Heartbeat()).SerializeToString()
#: the part of a caller's deadline kept for the reply to reach it
DEADLINE_MARGIN_S = 0.05


def telemetry_control(policy: TelemetryPolicyValues) -> Any:
    return link.BrokerFrame(
        control=link.Control(telemetry_policy=link.TelemetryPolicy(**policy._asdict()))
    )


async def _abort(context: Context, error: BrokerError) -> None:
    """End the call with the error's status; a retry hint travels as the pushback trailer."""
    if error.retry_after_ms is not None:
        context.set_trailing_metadata(((PUSHBACK_KEY, str(error.retry_after_ms)),))
    await context.abort(grpc.StatusCode[error.code], error.message)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
