"""Vehicle SDK: the car side of VehicleLink, for real agents and simulators.

    agent = VehicleAgent("127.0.0.1:50051", "car-1", token=TOKEN,
                         handlers={"unlock": unlock_doors})
    await agent.run()   # holds the stream, reconnecting with backoff, until stop()

A handler takes the payload bytes and returns True/False, or `(success, message, detail)`.
The agent acks each command on receipt, never executes one after its `expires_at`, and
executes each command id at most once: a re-sent id gets its first result repeated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from broker.auth import VEHICLE_ID_HEADER
from broker.clock import now_ms
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link

logger = logging.getLogger(__name__)

HandlerResult = bool | tuple[bool, str, bytes] | None
Handler = Callable[[bytes], Awaitable[HandlerResult]]
SignalValue = float | int | str | bool


def to_value(value: SignalValue) -> Any:
    if isinstance(value, bool):
        return t.Value(flag=value)
    if isinstance(value, int | float):
        return t.Value(number=float(value))
    return t.Value(text=str(value))


def signals(values: Mapping[str, SignalValue], at_ms: int) -> list[Any]:
    return [link.Signal(name=k, value=to_value(v), reported_at_ms=at_ms) for k, v in values.items()]


def full_jitter_backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """AWS-style "full jitter": uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


class VehicleAgent:
    """One car's connection to the broker."""

    def __init__(
        self,
        target: str,
        vehicle_id: str,
        *,
        token: str | None = None,
        handlers: Mapping[str, Handler] | None = None,
        channel: grpc.aio.Channel | None = None,
        firmware: str = "sdk",
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 30.0,
        remember_results: int = 1024,
    ) -> None:
        self.vehicle_id = vehicle_id
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._owns_channel = channel is None
        metadata = [(VEHICLE_ID_HEADER, vehicle_id)]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(metadata)
        self._firmware = firmware
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._remember = remember_results
        #: command_id -> its result frame, for ids already executed (dedup).
        self._results: OrderedDict[str, Any] = OrderedDict()
        self._call: Any = None
        self._stopping = False
        self._clock_offset_ms = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connected = asyncio.Event()
        self.session_id = ""
        self.executed: list[str] = []  # ids whose handler actually ran, in order
        self.telemetry_policy: Any = link.TelemetryPolicy()
        self.last_error: grpc.aio.AioRpcError | None = None
        self.connects = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the stream until `stop()`, reconnecting with exponential full-jitter backoff."""
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            delay_hint_s = 0.0
            try:
                delay_hint_s = await self.connect_once()
            except grpc.aio.AioRpcError as error:
                self.last_error = error
                if error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    logger.error("vehicle %s refused: %s", self.vehicle_id, error.details())
                    raise
            if self._stopping:
                break
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            backoff = full_jitter_backoff(failures, self._backoff_base_s, self._backoff_cap_s)
            await asyncio.sleep(max(backoff, delay_hint_s * random.uniform(1.0, 1.5)))

    async def connect_once(self) -> float:
        """One session: Hello, Welcome, then frames until the stream ends.

        Returns a reconnect-after hint in seconds (0 if none); raises AioRpcError when the
        broker ends the stream with an error status.
        """
        connect = self._channel.stream_stream(
            "/broker.v1.VehicleLink/Connect",
            request_serializer=link.VehicleFrame.SerializeToString,
            response_deserializer=link.BrokerFrame.FromString,
        )
        call = connect(metadata=self._metadata)
        self._call = call
        reconnect_after_s = 0.0
        try:
            await call.write(
                link.VehicleFrame(
                    hello=link.Hello(
                        firmware=self._firmware,
                        capabilities=sorted(self.handlers),
                        recent_command_ids=list(self._results)[-64:],
                    )
                )
            )
            while True:
                frame: Any = await call.read()
                if frame is grpc.aio.EOF:
                    break
                kind = frame.WhichOneof("kind")
                if kind == "welcome":
                    self._clock_offset_ms = frame.welcome.server_time_ms - now_ms()
                    self.session_id = frame.welcome.session_id
                    self.telemetry_policy = frame.welcome.telemetry_policy
                    self.connects += 1
                    self.connected.set()
                elif kind == "command":
                    self._spawn(self._on_command(call, frame.command))
                elif kind == "control":
                    control = frame.control
                    which = control.WhichOneof("kind")
                    if which == "telemetry_policy":
                        self.telemetry_policy = control.telemetry_policy
                    elif which == "reconnect_after_ms":
                        reconnect_after_s = control.reconnect_after_ms / 1000
                        break
                    elif which == "drain":
                        break
        finally:
            self.connected.clear()
            self._call = None
            call.cancel()
        return reconnect_after_s

    async def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._owns_channel:
            await self._channel.close()

    # -- reports -----------------------------------------------------------------------------

    async def report_state(self, values: Mapping[str, SignalValue]) -> None:
        await self._send(
            link.VehicleFrame(state=link.StateReport(fields=signals(values, now_ms())))
        )

    async def send_telemetry(self, batch: Iterable[Any]) -> None:
        await self._send(link.VehicleFrame(telemetry=link.TelemetryBatch(signals=list(batch))))

    async def _send(self, frame: Any) -> None:
        call = self._call
        if call is None or not self.connected.is_set():
            raise ConnectionError(f"vehicle {self.vehicle_id} is not connected")
        await call.write(frame)

    # -- commands ----------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_command(self, call: Any, command: Any) -> None:
        try:
            await call.write(link.VehicleFrame(ack=link.CommandAck(command_id=command.command_id)))
            cached = self._results.get(command.command_id)
            if cached is None:
                cached = await self._execute(command)
            await call.write(link.VehicleFrame(result=cached))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            logger.debug(
                "vehicle %s could not answer %s: %r", self.vehicle_id, command.command_id, exc
            )

    async def _execute(self, command: Any) -> Any:
        server_now = now_ms() + self._clock_offset_ms
        handler = self.handlers.get(command.name)
        if server_now >= command.expires_at_ms:
            outcome: HandlerResult = (False, "expired before execution; not executed", b"")
        elif handler is None:
            outcome = (False, f"unsupported command {command.name!r}", b"")
        else:
            self.executed.append(command.command_id)
            try:
                outcome = await handler(command.payload)
            except Exception as exc:
                outcome = (False, f"handler error: {exc}", b"")
        if outcome is None or isinstance(outcome, bool):
            success, message, detail = outcome is not False, "", b""
        else:
            success, message, detail = outcome
        result = link.CommandResult(
            command_id=command.command_id, success=success, message=message, detail=detail
        )
        self._results[command.command_id] = result
        while len(self._results) > self._remember:
            self._results.popitem(last=False)
        return result
