"""A vehicle stream's protocol without I/O: frames in, actions out.

The gRPC adapter (broker/api/vehicle_link.py) only moves bytes: it hands every frame the
car sends to `VehicleStream.received` and writes what `VehicleStream.outgoing` yields.
Everything the protocol decides lives here, testable without a server:

* Hello first (`parse_hello`), answered by `welcome`.
* Inbound: heartbeats and telemetry batches are recognised from their first bytes (a
  shed batch costs a counter, not a parse); acks and results go to the dispatcher;
  anything else is a protocol error (`InvalidArgument`, which ends the stream).
* Outbound: the session's outbox holds `CommandOut`s, ready frames (control) and
  `CLOSE`. Commands are recorded as on the wire, in one durable write per batch
  (`to_record`), *before* they are written; a command the store would not put on the
  wire (canceled, superseded or expired meanwhile) or past its TTL is never written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

from broker.config import Config
from broker.core.clock import now_ms
from broker.core.commands import check_id
from broker.core.dispatch import Dispatcher
from broker.core.errors import InvalidArgument
from broker.core.sessions import CLOSE, CommandOut, Session, StreamGate
from broker.core.state import VehicleStates, check_signals
from broker.core.telemetry import TelemetryGuard, TelemetryPolicyValues, Verdict
from broker.v1 import vehicle_link_pb2 as link

#: at most this many queued frames are taken (and their deliveries recorded) at once
OUTBOX_BATCH = 64
#: first byte of a serialized VehicleFrame holding `telemetry` (field 4) or `state` (field 5)
TELEMETRY_TAGS = (b"\x22", b"\x2a")
#: a serialized VehicleFrame holding an empty Heartbeat (field 6): nothing to parse
HEARTBEAT = link.VehicleFrame(heartbeat=link.Heartbeat()).SerializeToString()
#: result texts a car may send, at most
RESULT_MESSAGE_MAX = 1024
RESULT_DETAIL_MAX = 16384
#: sent to every car when the broker shuts down: reconnect (with backoff) elsewhere
DRAIN = link.BrokerFrame(control=link.Control(drain=True))


def parse_frame(raw: bytes) -> link.VehicleFrame:
    try:
        return link.VehicleFrame.FromString(raw)
    except Exception:  # protobuf's DecodeError, or worse for hostile bytes
        raise InvalidArgument("malformed VehicleFrame message") from None


#: what a Hello may say about the car (kept in its vehicle state)
HELLO_TEXT_MAX = 128
CAPABILITIES_MAX = 64


def parse_hello(raw: bytes) -> link.Hello:
    """The stream's first frame, which must be Hello."""
    frame = parse_frame(raw)
    if frame.WhichOneof("kind") != "hello":
        raise InvalidArgument("the first frame on a vehicle stream must be Hello")
    hello = frame.hello
    if len(hello.firmware) > HELLO_TEXT_MAX:
        raise InvalidArgument(f"Hello.firmware is longer than {HELLO_TEXT_MAX} characters")
    if len(hello.capabilities) > CAPABILITIES_MAX or any(
        len(c) > HELLO_TEXT_MAX for c in hello.capabilities
    ):
        raise InvalidArgument(
            f"Hello.capabilities holds at most {CAPABILITIES_MAX} names of at most "
            f"{HELLO_TEXT_MAX} characters"
        )
    return hello


def welcome(session: Session, policy: TelemetryPolicyValues, config: Config) -> link.BrokerFrame:
    """The broker's answer to Hello: the session, its clock, window and policies."""
    return link.BrokerFrame(
        welcome=link.Welcome(
            session_id=session.session_id,
            server_time_ms=now_ms(),
            telemetry_policy=link.TelemetryPolicy(**policy._asdict()),
            window=config.window,
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            liveness_timeout_ms=int(config.liveness_timeout_s * 1000),
        )
    )


def telemetry_control(policy: TelemetryPolicyValues) -> link.BrokerFrame:
    """A Control frame telling a car its new telemetry policy."""
    return link.BrokerFrame(
        control=link.Control(telemetry_policy=link.TelemetryPolicy(**policy._asdict()))
    )


def command_frame(out: CommandOut, attempt: int) -> link.BrokerFrame:
    command = out.command
    return link.BrokerFrame(
        command=link.CommandFrame(
            command_id=command.command_id,
            name=command.name,
            payload=command.payload,
            attempt=attempt,
            expires_at_ms=command.expires_at_ms,
            issued_at_ms=command.created_at_ms,
            signed=command.signed if command.HasField("signed") else None,
        )
    )


class Links:
    """Opens and closes vehicle streams: the handshake's domain side and the release."""

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        guard: TelemetryGuard,
        states: VehicleStates,
        stream_gate: StreamGate,
    ) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._guard = guard
        self._states = states
        self._stream_gate = stream_gate

    async def open(
        self, vehicle_id: str, hello: link.Hello
    ) -> tuple[VehicleStream, link.BrokerFrame]:
        """A car said Hello: admit its stream (storm control) and build the Welcome.

        Admitted only after the Hello, so a token is never spent on a stream that dies
        first. Call `connected` once the Welcome is written, and `close` in any case.
        """
        self._stream_gate.admit(vehicle_id)
        session = Session(vehicle_id, now_ms=now_ms())
        session.heartbeats = hello.sends_heartbeats
        await self._states.attach(vehicle_id)
        stream = VehicleStream(session, self._dispatcher, self._guard, self._states)
        try:
            self._states.seen(vehicle_id, session.connected_since_ms)
            self._states.hello(vehicle_id, hello.firmware, hello.capabilities)
            policy = self._guard.welcome_policy(vehicle_id, time.monotonic())
            return stream, welcome(session, policy, self._config)
        except BaseException:
            await self.close(stream)
            raise

    def connected(self, stream: VehicleStream, hello: link.Hello) -> None:
        """The Welcome is on its way: make this the car's live stream, send its queue."""
        self._dispatcher.connect(stream.session, hello.recent_command_ids)

    async def deliver(self, session: Session, outs: Sequence[CommandOut]) -> dict[str, int]:
        """Record commands as on the wire before they are written (see `Dispatcher.deliver`)."""
        return await self._dispatcher.deliver(session, outs)

    async def close(self, stream: VehicleStream) -> None:
        """The stream ended: hand its commands back to the queue, keep what it reported."""
        session = stream.session
        vehicle_id = session.vehicle_id
        if self._dispatcher.disconnect(session):  # no stream left for this car
            leftover = self._guard.forget(vehicle_id)
            if leftover:
                self._states.report(vehicle_id, leftover, now_ms())
        await self._states.detach(vehicle_id)


class VehicleStream:
    """One car's stream after its handshake: the protocol's decisions, no I/O."""

    __slots__ = ("_dispatcher", "_guard", "_states", "session")

    def __init__(
        self,
        session: Session,
        dispatcher: Dispatcher,
        guard: TelemetryGuard,
        states: VehicleStates,
    ) -> None:
        self.session = session
        self._dispatcher = dispatcher
        self._guard = guard
        self._states = states

    # -- inbound -----------------------------------------------------------------------------

    def received(self, raw: bytes) -> float:
        """Take one frame from the car. Returns how long to wait before reading the next
        (a car over its telemetry budget is read no faster than the budget refills, so
        HTTP/2 flow control slows its writes); raises InvalidArgument on a protocol error."""
        session = self.session
        vehicle_id = session.vehicle_id
        received_ms = now_ms()
        session.last_heard_s = time.monotonic()
        self._states.seen(vehicle_id, received_ms)
        if raw == HEARTBEAT:
            return 0.0
        if raw[:1] in TELEMETRY_TAGS:
            if self._take_telemetry(raw, received_ms) is Verdict.ADMIT:
                return 0.0
            return self._guard.read_pause_s(vehicle_id)
        frame = parse_frame(raw)
        kind = frame.WhichOneof("kind")
        if kind == "ack":
            self._dispatcher.acked(vehicle_id, check_id("command_id", frame.ack.command_id))
        elif kind == "result":
            result = frame.result
            check_id("command_id", result.command_id)
            if len(result.message) > RESULT_MESSAGE_MAX or len(result.detail) > RESULT_DETAIL_MAX:
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
        return 0.0

    def _take_telemetry(self, raw: bytes, received_ms: int) -> Verdict:
        """Judge a telemetry/state batch before parsing it; apply it now, buffer it for the
        next flush, or drop it."""
        session = self.session
        vehicle_id = session.vehicle_id
        verdict, policy = self._guard.offer(vehicle_id, len(raw), time.monotonic())
        if verdict is Verdict.ADMIT or verdict is Verdict.COALESCE:
            frame = parse_frame(raw)
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

    # -- outbound ----------------------------------------------------------------------------

    @staticmethod
    def to_record(batch: Sequence[object]) -> list[CommandOut]:
        """The commands in an outbox batch whose delivery must be recorded before they
        are written (those created DELIVERED are recorded already)."""
        return [item for item in batch if type(item) is CommandOut and not item.recorded]

    @staticmethod
    def outgoing(
        batch: Sequence[object], attempts: Mapping[str, int], *, now: int | None = None
    ) -> Iterator[link.BrokerFrame | None]:
        """The frames of an outbox batch to write, in order; None means "end the stream"
        (nothing after it is written). `attempts` holds the recorded attempt of every
        command `to_record` returned that the store put on the wire."""
        at = now_ms() if now is None else now
        for item in batch:
            if item is CLOSE:
                yield None
                return
            if type(item) is CommandOut:
                command = item.command
                if item.recorded:
                    attempt = item.attempt
                else:
                    found = attempts.get(command.command_id)
                    if found is None:
                        continue  # canceled, superseded or expired meanwhile, or closing
                    attempt = found
                if command.expires_at_ms <= at:
                    continue  # a slow write held it past its TTL: never on the wire
                yield command_frame(item, attempt)
            else:
                yield item  # type: ignore[misc]  # a ready frame (control)
